"""Builtin datasets, registered as the plugin ``mmkit.data``."""

from mmkit.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    from mmkit.data.diagnosis import SyntheticDiagnosis
    from mmkit.data.image_folder import ImageFolder
    from mmkit.data.manifest import Manifest
    from mmkit.data.shapes import SyntheticShapes
    from mmkit.data.shards import WebDataset
    from mmkit.data.sounds import SyntheticAudio

    register("synthetic_shapes", SyntheticShapes)
    register("synthetic_audio", SyntheticAudio)
    register("synthetic_diagnosis", SyntheticDiagnosis)
    register("manifest", Manifest)
    register("image_folder", ImageFolder)
    register("webdataset", WebDataset)
