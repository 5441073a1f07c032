"""synthetic_audio: short clips of tones, chirps, noise and rhythms, with captions."""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
import torch

from mmkit.data.synthetic import SyntheticSet
from mmkit.samples import DatasetInfo, Waveform

SOUNDS = (
    "low tone", "middle tone", "high tone", "rising chirp", "falling chirp",
    "hiss of noise", "low rumble", "slow rhythm of clicks", "fast rhythm of clicks",
)
LOUDNESS = {"quiet": 0.12, "loud": 0.6}
TIMING = ("at the start", "at the end", "throughout")
COMBINATIONS = list(itertools.product(SOUNDS, LOUDNESS, TIMING))
TONES = {"low tone": 220.0, "middle tone": 660.0, "high tone": 1760.0}


class SyntheticAudio(SyntheticSet):
    """Short clips, captioned "a loud rising chirp at the start".

    Nine kinds of sound (tones, chirps, noise, click rhythms), two loudness levels and
    three timings make 54 captions. Deterministic from the seed, with disjoint splits.

    Args:
        num_samples: clips in this split.
        split: "train" or "val".
        sample_rate: samples per second of the generated clips; at least 8000 (chirps reach 3 kHz).
        clip_seconds: length of every clip; at least 0.1.
        seed: selects the whole set.
    """

    def __init__(self, num_samples: int = 2000, split: Literal["train", "val"] = "train",
                 sample_rate: int = 16000, clip_seconds: float = 1.0, seed: int = 0):
        super().__init__(num_samples, split, seed)
        if sample_rate < 8000 or clip_seconds < 0.1:
            raise ValueError(f"need sample_rate >= 8000 and clip_seconds >= 0.1, got {sample_rate} and {clip_seconds}")
        self.sample_rate = sample_rate
        self.clip_seconds = clip_seconds

    info = DatasetInfo(keys=("id", "audio", "text", "label"), label_kind="single",
                       class_names=tuple(f"{loudness} {sound} {timing}" for sound, loudness, timing in COMBINATIONS))

    def draw(self, rng: np.random.Generator) -> dict[str, Any]:
        label = int(rng.integers(len(COMBINATIONS)))
        sound, loudness, timing = COMBINATIONS[label]
        samples = render_clip(rng, self.sample_rate, self.clip_seconds, sound, loudness, timing)
        return {
            "audio": Waveform(torch.from_numpy(samples), self.sample_rate),
            "text": f"a {loudness} {sound} {timing}",
            "label": label,
        }


def render_clip(rng: np.random.Generator, rate: int, seconds: float, sound: str, loudness: str,
                timing: str) -> np.ndarray:
    """The sound at its loudness and place in the clip, over background noise of random level."""
    n = int(rate * seconds)
    length = n if timing == "throughout" else n // 2
    t = np.arange(length) / rate
    wobble = rng.uniform(0.95, 1.05)
    if sound in TONES:
        event = np.sin(2 * np.pi * TONES[sound] * wobble * t)
    elif sound.endswith("chirp"):
        f0, f1 = (300.0, 3000.0) if sound.startswith("rising") else (3000.0, 300.0)
        duration = length / rate
        phase = 2 * np.pi * wobble * (f0 * t + (f1 - f0) * t**2 / (2 * duration))
        event = np.sin(phase)
    elif sound == "hiss of noise":
        event = rng.uniform(-1, 1, length)
    elif sound == "low rumble":
        event = np.convolve(rng.uniform(-1, 1, length), np.ones(64) / 8, mode="same")
    else:  # click rhythms
        period = int(rate * (0.25 if sound.startswith("slow") else 0.08) * wobble)
        event = np.zeros(length)
        for start in range(0, length, period):
            event[start : start + 80] = rng.uniform(-1, 1, min(80, length - start))
    event = event / (np.abs(event).max() + 1e-8) * LOUDNESS[loudness] * rng.uniform(0.9, 1.1)
    clip = rng.normal(0, rng.uniform(0.005, 0.1), n)  # noise floor up to the quiet level
    offset = 0 if timing != "at the end" else n - length
    clip[offset : offset + length] += event
    return clip.astype(np.float32)
