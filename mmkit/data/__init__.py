"""Builtin datasets, registered as the plugin ``mmkit.data``."""

from mmkit.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    from mmkit.data.shapes import SyntheticShapes
    from mmkit.data.sounds import SyntheticAudio

    register("synthetic_shapes", SyntheticShapes)
    register("synthetic_audio", SyntheticAudio)
