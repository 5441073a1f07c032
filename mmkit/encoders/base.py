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
    decoder that reconstructs the input needs. An encoder whose batches are cheaper to finish
    on the device sets ``on_device`` (a batch there -> what ``forward`` takes): image encoders
    preprocess to uint8 pixels, a quarter of the floats' bytes to batch and copy, and scale and
    normalise them there (``Normalize``). ``inputs`` does all of it for a list of raw values.
    """

    dim: int
    preprocess: Callable[[Any], Any]
    collate: Callable[[list[Any]], Any] | None = None
    on_device: Callable[[Any], Any] | None = None
    special_ids: tuple[int, ...] = ()
    cell: tuple[int, int, int] | None = None

    @property
    def token_dim(self) -> int:
        """Width of ``Encoded.tokens``; the pooled width ``dim`` unless the encoder says otherwise
        (a CNN whose head widens its pooled features)."""
        return self.dim

    def forward(self, inputs: Any) -> Encoded:  # pragma: no cover - abstract
        raise NotImplementedError

    def inputs(self, values: list[Any], device: torch.device | str = "cpu") -> Any:
        """Raw values (images, texts, waveforms) as one batch for ``forward`` on ``device``, as
        mmkit's loaders make it: each preprocessed, then collated, moved and finished there."""
        from torch.utils.data import default_collate

        from mmkit.data.loader import to_device

        batch = (self.collate or default_collate)([self.preprocess(value) for value in values])
        batch = to_device(batch, torch.device(device))
        return batch if self.on_device is None else self.on_device(batch)

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


def resize_crop(image_size: int, resize: int | None = None, interpolation: Any = None,
                antialias: bool = True) -> Callable[[Any], torch.Tensor]:
    """PIL image -> RGB, resized (shorter side to ``resize``, default ``image_size``),
    center-cropped to ``image_size``, as uint8 pixels [3, H, W] (``Normalize`` finishes them)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Lambda(to_rgb),
        transforms.Resize(resize or image_size, interpolation or transforms.InterpolationMode.BILINEAR,
                          antialias=antialias),
        transforms.CenterCrop(image_size),
        PixelTensor(),
    ])


class PixelTensor:
    """PIL image -> its uint8 pixels [C, H, W], laid out channel by channel (stacking is then
    one copy). A class, so workers can pickle it."""

    def __call__(self, image: Any) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """A batch of uint8 pixels [B, C, H, W] -> float32 scaled to [0, 1] and normalised by mean
    and std, on the batch's device: the numbers ToTensor + Normalize give each image, bit for
    bit, done where the batch already is (an image encoder's ``on_device``)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            raise TypeError(f"Normalize takes the uint8 pixels an image encoder's preprocess gives, got {pixels.dtype}; "
                            "give a batch already normalised to the encoder itself")
        scale, mean, std = self._stats(pixels.device)
        return pixels.to(torch.float32).div_(scale).sub_(mean).div_(std)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """255, mean and std as [1, C, 1, 1] on ``device``, made once per device (no copy per
        batch). 255 is a tensor there too: CUDA divides by a plain number as a multiplication by
        its reciprocal, which rounds some pixels differently from the CPU's division."""
        if device not in self._on:
            self._on[device] = tuple(torch.tensor(v).view(1, -1, 1, 1).to(device)
                                     for v in ((255.0,), self.mean, self.std))
        return self._on[device]

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
