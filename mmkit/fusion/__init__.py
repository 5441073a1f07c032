"""Builtin fusion heads, registered as the plugin ``mmkit.fusion``."""

from mmkit.hookspecs import hookimpl


@hookimpl
def register_fusion_heads(register):
    from mmkit.fusion.concat import Concat
    from mmkit.fusion.cross_attention import CrossAttention
    from mmkit.fusion.mlm_ae import MlmAe

    register("concat", Concat)
    register("cross_attention", CrossAttention)
    register("mlm_ae", MlmAe)
