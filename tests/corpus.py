"""A corpus of good and bad sample payloads, for every file format's tests.

Each format (manifest, image folder, shards) writes these payloads its own way; the bad
ones are one per problem that ``data.on_error`` covers, named by the SampleError kind
they must raise.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile
from PIL import Image

TEST_MAX_PIXELS = 64 * 64  # tests read with data.max_image_pixels at this cap; BIG is over it


def image_bytes(seed: int, side: int = 32, fmt: str = "JPEG") -> bytes:
    """A small noisy RGB image, different for every seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, fmt)
    return out.getvalue()


def audio_bytes(seed: int, frames: int = 1600, rate: int = 16000, fmt: str = "WAV") -> bytes:
    """A short quiet noise clip, different for every seed."""
    samples = np.random.default_rng(seed).uniform(-0.1, 0.1, frames).astype(np.float32)
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt, subtype="FLOAT" if fmt == "WAV" else None)
    return out.getvalue()


def nan_audio_bytes() -> bytes:
    samples = np.zeros(800, dtype=np.float32)
    samples[100] = np.nan
    out = io.BytesIO()
    soundfile.write(out, samples, 16000, format="WAV", subtype="FLOAT")
    return out.getvalue()


def empty_audio_bytes() -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.zeros(0, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    return out.getvalue()


# Bad image files by the kind they must raise; None means "listed but never written".
BAD_IMAGES: dict[str, bytes | None] = {
    "missing file": None,
    "empty file": b"",
    "truncated image": image_bytes(99, side=48)[:300],
    "not an image": b"this is a text file that someone named photo.jpg\n",
    "image too large": image_bytes(98, side=80, fmt="PNG"),  # 6,400 pixels > TEST_MAX_PIXELS
}

BAD_AUDIO: dict[str, bytes | None] = {
    "missing file": None,
    "empty file": b"",
    "unreadable audio": b"RIFF....WAVEjunk" * 4,
    "empty audio": empty_audio_bytes(),
    "nan audio": nan_audio_bytes(),
}

# Bad text values by kind: None is a missing cell (or key), "   " a blank one.
BAD_TEXT: dict[str, str | None] = {"missing text": None, "empty text": "   "}
