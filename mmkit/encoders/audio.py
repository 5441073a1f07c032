"""Audio encoders: a torchaudio log-mel frontend followed by a small CNN."""

from __future__ import annotations

import torch
from torch import nn

from mmkit.encoders.base import Encoded, Encoder
from mmkit.samples import Waveform


class FitClip:
    """Waveform -> mono samples at ``sample_rate``, padded with silence or cut to
    ``clip_seconds``, so clips from any source batch without further work."""

    def __init__(self, sample_rate: int, clip_seconds: float):
        self.sample_rate = sample_rate
        self.length = int(round(sample_rate * clip_seconds))
        self.resamplers: dict[int, nn.Module] = {}  # by source rate: each kernel is built once

    def __call__(self, clip: Waveform) -> torch.Tensor:
        samples = clip.samples.float()
        samples = samples.mean(0) if samples.ndim == 2 else samples
        if clip.sample_rate != self.sample_rate:
            samples = self._resampler(clip.sample_rate)(samples)
        return nn.functional.pad(samples[: self.length], (0, max(0, self.length - samples.shape[-1])))

    def _resampler(self, rate: int) -> nn.Module:
        if rate not in self.resamplers:
            import torchaudio

            self.resamplers[rate] = torchaudio.transforms.Resample(rate, self.sample_rate)
        return self.resamplers[rate]


class LogMel:
    """Waveform -> log-mel spectrogram [1, n_mels, frames] of the fitted clip."""

    def __init__(self, sample_rate: int, clip_seconds: float, n_mels: int, n_fft: int, hop_length: int):
        import torchaudio

        self.fit = FitClip(sample_rate, clip_seconds)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels
        )

    def __call__(self, clip: Waveform) -> torch.Tensor:
        return torch.log(self.mel(self.fit(clip)) + 1e-6).unsqueeze(0)


class LogMelCNNEncoder(Encoder):
    """Log-mel spectrogram (torchaudio) then a small 2-D CNN; tokens are time frames (a 1 x frames grid).

    Args:
        sample_rate: rate the frontend works at; other rates are resampled.
        clip_seconds: clips are padded or cut to this length.
        n_mels: mel bands.
        n_fft: FFT size of the spectrogram.
        hop_length: samples between frames.
        channels: channels of the first conv block; doubled each block.
        blocks: conv blocks, each halving time and frequency.
        dim: output feature width.
    """

    def __init__(self, sample_rate: int = 16000, clip_seconds: float = 1.0, n_mels: int = 64,
                 n_fft: int = 400, hop_length: int = 160, channels: int = 32, blocks: int = 3,
                 dim: int = 256):
        super().__init__()
        self.preprocess = LogMel(sample_rate, clip_seconds, n_mels, n_fft, hop_length)
        self.dim = dim
        layers: list[nn.Module] = [nn.BatchNorm2d(1)]
        width_in = 1
        for i in range(blocks):
            width = channels * 2**i
            layers += [
                nn.Conv2d(width_in, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.GELU(),
                nn.MaxPool2d(2),
            ]
            width_in = width
        self.cnn = nn.Sequential(*layers)
        self.project = nn.Linear(width_in, dim)
        self.norm = nn.LayerNorm(dim)
        self.cell = (1, n_mels, 2**blocks)  # a token: every band of 2**blocks frames

    def forward(self, spectrograms: torch.Tensor) -> Encoded:
        features = self.cnn(spectrograms).mean(dim=2)  # [B, C, frames]: average over frequency
        tokens = self.project(features.transpose(1, 2))
        pooled = self.norm(tokens.mean(dim=1))
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(tokens=tokens, pooled=pooled, mask=mask, grid=(1, tokens.shape[1]))
