"""Downloads from the Hugging Face hub that fail fast, instead of retrying for a minute, offline."""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from typing import Iterator
from urllib.parse import urlsplit


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
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if (proxies.get(parts.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(parts.hostname or ""):
        return True
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False
