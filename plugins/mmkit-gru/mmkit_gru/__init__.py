"""mmkit-gru: a bidirectional GRU text encoder, registered through the mmkit entry point."""

from mmkit import hookimpl


@hookimpl
def register_text_encoders(register):
    from mmkit_gru.encoder import GRUTextEncoder

    register("gru", GRUTextEncoder)
