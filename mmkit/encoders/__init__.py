"""Builtin encoders, registered as the plugin ``mmkit.encoders``."""

from mmkit.hookspecs import hookimpl


@hookimpl
def register_image_encoders(register):
    from mmkit.encoders.timm_image import TimmImageEncoder

    register("timm", TimmImageEncoder)


@hookimpl
def register_text_encoders(register):
    from mmkit.encoders.text import TransformerTextEncoder

    register("transformer", TransformerTextEncoder)


@hookimpl
def register_audio_encoders(register):
    from mmkit.encoders.audio import LogMelCNNEncoder

    register("logmel_cnn", LogMelCNNEncoder)
