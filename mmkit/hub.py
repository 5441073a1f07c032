"""Downloads from the Hugging Face hub that fail fast, instead of retrying for a minute, offline."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator
from urllib.parse import urlsplit

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@contextlib.contextmanager
def cached_only_if_unreachable(timeout: float = 3.0) -> Iterator[None]:
    """Inside, huggingface_hub serves only cached files when its endpoint cannot be reached,
    so a missing download fails in a second and cached weights still load."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or reachable(constants.ENDPOINT, timeout):
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to ``url``'s host opens; behind a proxy, assume it does."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False
