"""Builtin fusion heads, registered as the plugin ``mmkit.fusion``."""

from mmkit.hookspecs import hookimpl


@hookimpl
def register_fusion_heads(register):
    from mmkit.fusion.concat import Concat

    register("concat", Concat)
