"""Image encoders from timm: any ViT or CNN by name."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmkit.encoders.base import Encoded, Encoder, freeze as freeze_module
from mmkit.errors import MMKitError, one_line
from mmkit.hub import cached_only_if_unreachable


class TimmImageEncoder(Encoder):
    """Any timm model (ViT or CNN) as an image encoder; tokens are its patches or feature map.

    Args:
        model_name: a timm model name, e.g. "vit_small_patch16_224", "resnet50", "convnext_tiny".
        pretrained: false, true (timm's hub weights, downloaded once) or a local weights file.
        image_size: side in pixels that images are resized and center-cropped to.
        model_args: extra arguments for timm.create_model, e.g. {depth = 4, patch_size = 8}.
        freeze: keep the backbone's weights fixed.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        pretrained: bool | str = False,
        image_size: int = 224,
        model_args: dict[str, Any] | None = None,
        freeze: bool = False,
    ):
        super().__init__()
        self.model = create_timm_model(model_name, pretrained, image_size, model_args or {})
        self.dim = self.model.num_features
        self.preprocess = image_transform(self.model, image_size)
        self.frozen = freeze
        if freeze:
            freeze_module(self.model)

    def train(self, mode: bool = True) -> "TimmImageEncoder":
        """A frozen backbone stays in eval mode, so its batch-norm statistics stay fixed too."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, images: torch.Tensor) -> Encoded:
        features = self.model.forward_features(images)
        pooled = self.model.forward_head(features, pre_logits=True)
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(tokens=tokens, pooled=pooled, mask=mask)


def create_timm_model(name: str, pretrained: bool | str, image_size: int, args: dict[str, Any]) -> nn.Module:
    """timm.create_model with a headless model, the image size where the model takes one,
    and one-line errors for unknown names and unreachable weights."""
    import timm

    overlay = None
    if isinstance(pretrained, str):
        if not Path(pretrained).is_file():
            raise MMKitError(f"pretrained weights file not found: {pretrained}")
        overlay = {"file": str(pretrained)}
    if not timm.is_model(name):
        raise MMKitError(f"unknown timm model {name!r}; see timm.list_models('*{name[:4]}*')")
    kwargs = dict(pretrained=bool(pretrained), pretrained_cfg_overlay=overlay, num_classes=0, **args)
    hub = cached_only_if_unreachable() if pretrained is True else contextlib.nullcontext()
    try:
        with hub:
            try:
                return timm.create_model(name, img_size=image_size, **kwargs)
            except TypeError as error:  # CNNs take any size and have no img_size argument
                if "img_size" not in str(error):
                    raise
                return timm.create_model(name, **kwargs)
    except TypeError as error:
        raise MMKitError(f"timm model {name!r}: bad model_args: {error}") from None
    except Exception as error:
        if not pretrained:
            raise
        raise MMKitError(
            f"timm model {name!r}: pretrained weights could not be loaded ({one_line(error)}); "
            "offline, download them once with network access (they are cached), "
            "set pretrained to a local weights file, or set pretrained = false"
        ) from None


def image_transform(model: nn.Module, image_size: int):
    """Resize, center-crop and normalise with the model's own mean and std."""
    from torchvision import transforms

    config = getattr(model, "pretrained_cfg", {}) or {}
    mean = config.get("mean", (0.485, 0.456, 0.406))
    std = config.get("std", (0.229, 0.224, 0.225))
    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _to_rgb(image):
    return image.convert("RGB")
