"""Every download from the Hugging Face hub goes through here, one call at a time: when the
hub cannot be reached the call asks for cached files only, so it fails in a second (or loads
what an earlier download left) instead of retrying for a minute."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from mmkit.errors import MMKitError, one_line

OFFLINE_ADVICE = "offline, download it once with network access (it is cached) or give a local path"


def hub_file(repo_id: str, filenames: tuple[str, ...], what: str, advice: str = OFFLINE_ADVICE) -> Path:
    """The first of ``filenames`` that the hub repo ``repo_id`` has, downloaded (or cached)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    cached_only = not hub_reachable()
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=cached_only))
        except EntryNotFoundError:  # not in the repo or, asking the cache only, not cached: try the next
            continue
        except Exception as error:
            raise MMKitError(f"{what}: {repo_id}: {one_line(error)}; {advice}") from None
    why = "not in the cache, and the hub cannot be reached" if cached_only else f"it has none of {', '.join(filenames)}"
    raise MMKitError(f"{what}: {repo_id}: {why}; {advice}")


def hub_snapshot(repo_id: str, what: str, advice: str = OFFLINE_ADVICE,
                 allow_patterns: list[str] | None = None) -> Path:
    """A local folder with the hub repo ``repo_id`` (a transformers model: config, weights, tokenizer);
    with ``allow_patterns``, only its files that match one (not every framework's copy of the weights)."""
    from huggingface_hub import snapshot_download

    cached_only = not hub_reachable()
    try:
        return Path(snapshot_download(repo_id, local_files_only=cached_only, allow_patterns=allow_patterns))
    except Exception as error:
        why = "not in the cache, and the hub cannot be reached" if cached_only else one_line(error)
        raise MMKitError(f"{what}: {repo_id}: {why}; {advice}") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether downloads can be tried: not in offline mode, and the endpoint answers."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and reachable(constants.ENDPOINT, timeout)


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
