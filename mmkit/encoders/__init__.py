"""Builtin encoders, registered as the plugin ``mmkit.encoders``."""

from mmkit.hookspecs import hookimpl


@hookimpl
def register_image_encoders(register):
    from mmkit.encoders.open_clip import OpenClipImageEncoder
    from mmkit.encoders.timm_image import TimmImageEncoder
    from mmkit.encoders.torchvision_image import TorchvisionImageEncoder

    register("timm", TimmImageEncoder)
    register("torchvision", TorchvisionImageEncoder)
    register("open_clip", OpenClipImageEncoder)


@hookimpl
def register_text_encoders(register):
    from mmkit.encoders.hf import HFTextEncoder
    from mmkit.encoders.open_clip import OpenClipTextEncoder
    from mmkit.encoders.text import TransformerTextEncoder

    register("transformer", TransformerTextEncoder)
    register("hf", HFTextEncoder)
    register("open_clip", OpenClipTextEncoder)


@hookimpl
def register_audio_encoders(register):
    from mmkit.encoders.audio import LogMelCNNEncoder
    from mmkit.encoders.hf import HFAudioEncoder

    register("logmel_cnn", LogMelCNNEncoder)
    register("hf_audio", HFAudioEncoder)
