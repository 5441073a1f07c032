"""Image encoders from timm: any ViT or CNN by name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmkit.encoders.base import (IMAGENET_MEAN, IMAGENET_STD, Encoded, Encoder, Normalize, PixelTensor,
                                 feature_map_cells, resize_crop, to_rgb)
from mmkit.errors import MMKitError, one_line
from mmkit.hub import hub_file
from mmkit.weights import fit_problems, load_weights, weights_file

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class TimmImageEncoder(Encoder):
    """Any timm model (ViT or CNN) as an image encoder; tokens are its patches or feature map.

    Args:
        model_name: a timm model name, e.g. "vit_small_patch16_224", "resnet50", "convnext_tiny".
        pretrained: false, true (timm's hub weights for the name, downloaded once), a hub repo id
            ("timm/resnet18.a1_in1k") or a local weights file or folder (.safetensors, or .bin/.pt
            holding only tensors).
        image_size: side in pixels that images are resized and center-cropped to (pretrained weights
            resize, crop and normalise as timm's eval transform for them does).
        model_args: extra arguments for timm.create_model, e.g. {depth = 4, patch_size = 8}.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        pretrained: bool | str = False,
        image_size: int = 224,
        model_args: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model = create_timm_model(model_name, pretrained, image_size, model_args or {})
        self.dim = getattr(self.model, "head_hidden_size", None) or self.model.num_features  # what forward_head gives
        self.preprocess, self.on_device = image_transform(self.model, image_size, bool(pretrained), model_name)
        self.cell = timm_cell(self.model)

    @property
    def token_dim(self) -> int:
        return self.model.num_features

    def forward(self, images: torch.Tensor) -> Encoded:
        features = self.model.forward_features(images)
        pooled = self.model.forward_head(features, pre_logits=True)
        tokens, prefix, grid = timm_tokens(self.model, features, images.shape[-2:])
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(tokens=tokens, pooled=pooled, mask=mask, grid=grid, prefix=prefix)


def timm_cell(model: nn.Module) -> tuple[int, int, int]:
    """The pixels one token covers: the stride of the last feature map (a ViT's patch, a CNN's
    or a hierarchical ViT's final reduction); a patch of another height and width as it is."""
    embed = getattr(model, "patch_embed", None)
    stride = int(model.feature_info[-1]["reduction"])
    if embed is not None and getattr(embed, "patch_size", None) is not None and max(embed.patch_size) == stride:
        return (3, *(int(n) for n in embed.patch_size))
    return 3, stride, stride


def timm_tokens(model: nn.Module, features: torch.Tensor,
                size: tuple[int, int]) -> tuple[torch.Tensor, int, tuple[int, int] | None]:
    """Tokens, prefix count and grid of a timm model's forward_features: a CNN's feature-map
    cells, or a ViT's prefix tokens then its patches."""
    if features.ndim == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":  # Swin: channels last
        return features.flatten(1, 2), 0, tuple(features.shape[1:3])
    if features.ndim == 4:
        tokens, grid = feature_map_cells(features)
        return tokens, 0, grid
    prefix = getattr(model, "num_prefix_tokens", 0)
    grid = patch_grid(model, size, features.shape[1] - prefix)
    return features, prefix if grid else 0, grid


def patch_grid(model: nn.Module, size: tuple[int, int], patches: int) -> tuple[int, int] | None:
    """Rows and columns of a ViT's patch tokens for images of ``size``; None for models whose
    tokens are no such grid (pooled or merged tokens)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        return None
    grid = embed.dynamic_feat_size(tuple(size)) if hasattr(embed, "dynamic_feat_size") else embed.grid_size
    grid = tuple(int(n) for n in grid)
    return grid if grid[0] * grid[1] == patches else None


def create_timm_model(name: str, pretrained: bool | str, image_size: int, args: dict[str, Any]) -> nn.Module:
    """timm.create_model with a headless model, the image size where the model takes one,
    weights read by mmkit (never unpickled) and loaded strictly, and one-line errors."""
    import timm

    if not timm.is_model(name):
        raise MMKitError(f"unknown timm model {name!r}; see timm.list_models('*{name[:4]}*')")
    what = f"timm model {name!r}"
    kwargs: dict[str, Any] = dict(num_classes=0, **args)
    if pretrained:
        weights = headless(load_weights(timm_weights(name, pretrained, what), what), name)
        # timm's own load, for its checkpoint filter (a ViT's position embedding resampled to image_size);
        # num_classes 0 in the weights' config too, or timm loads leniently (strict=False) for a new head
        kwargs.update(pretrained=True, pretrained_cfg=hub_tag(name, pretrained),
                      pretrained_cfg_overlay={"state_dict": weights, "num_classes": 0})
    try:
        return sized_model(name, image_size, kwargs)
    except TypeError as error:
        raise MMKitError(f"{what}: bad model_args: {error}") from None
    except RuntimeError as error:  # load_state_dict: names or shapes that do not fit
        if not pretrained:
            raise
        problems = fit_problems(sized_model(name, image_size, {**kwargs, "pretrained": False}), weights)
        raise MMKitError(f"{what}: the pretrained weights do not fit the model: "
                         f"{problems or one_line(error)}") from None


def sized_model(name: str, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model at ``image_size`` where the model takes an img_size argument."""
    import timm

    try:
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as error:  # CNNs take any size and have no img_size argument
        if "img_size" not in str(error):
            raise
        return timm.create_model(name, **kwargs)


def headless(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The weights without the classifier timm names for the model, which the encoder is built without."""
    from timm.models import get_arch_pretrained_cfgs

    heads = next((cfg.classifier for cfg in get_arch_pretrained_cfgs(name).values()), None) or ()
    heads = (heads,) if isinstance(heads, str) else heads
    dropped = {f"{head}.{part}" for head in heads for part in ("weight", "bias")}
    return {k: v for k, v in weights.items() if k not in dropped}


def hub_tag(name: str, pretrained: bool | str) -> str | None:
    """The timm tag of hub weights "timm/<model>.<tag>" for this model, so that the model carries
    their own config (mean, std, resizing) rather than its default tag's; None otherwise."""
    from timm.models import get_arch_pretrained_cfgs, split_model_name_tag

    if not (isinstance(pretrained, str) and pretrained.startswith("timm/") and not Path(pretrained).exists()):
        return None
    tagged = pretrained.removeprefix("timm/")
    tag = split_model_name_tag(tagged)[1]
    return tag if tag and tagged in get_arch_pretrained_cfgs(name) else None


def timm_weights(name: str, pretrained: bool | str, what: str) -> Path:
    """Where the weights are: a local file or folder, a hub repo id ("timm/resnet18.a1_in1k"),
    or for ``true`` the hub repo timm names for the model."""
    import timm

    if isinstance(pretrained, str) and (Path(pretrained).exists() or not HUB_ID.fullmatch(pretrained)):
        if not Path(pretrained).exists():
            raise MMKitError(f"{what}: pretrained weights file not found: {pretrained}")
        return weights_file(pretrained, what)
    repo = pretrained if isinstance(pretrained, str) else getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    if not repo:
        raise MMKitError(f"{what}: timm has no hub weights for it; set pretrained to a local weights file")
    return hub_file(repo, ("model.safetensors", "pytorch_model.bin"), f"{what}: pretrained weights could not be loaded",
                    advice="offline, download them once with network access (they are cached), "
                           "set pretrained to a local weights file, or set pretrained = false")


def image_transform(model: nn.Module, image_size: int, pretrained: bool, name: str) -> tuple[Any, Normalize]:
    """Pretrained weights: timm's eval transform for their config at ``image_size`` (resizing, crop,
    interpolation, mean and std), its resizing to uint8 pixels (preprocess) and its ToTensor +
    Normalize on the device (on_device; the same numbers). Random weights: resize and center-crop."""
    from timm.data import create_transform, resolve_model_data_config
    from torchvision import transforms

    if not pretrained:
        return resize_crop(image_size), model_normalize(model)
    config = resolve_model_data_config(model, args={"img_size": image_size})
    *resize, to_tensor, normalize = steps = create_transform(**config, is_training=False).transforms
    if not (isinstance(normalize, transforms.Normalize) and type(to_tensor).__name__.endswith("ToTensor")):
        raise MMKitError(f"timm model {name!r}: timm's eval transform no longer ends in ToTensor + Normalize "
                         f"({', '.join(type(step).__name__ for step in steps)}); mmkit needs updating for it")
    return (transforms.Compose([transforms.Lambda(to_rgb), *resize, PixelTensor()]),
            Normalize(tuple(normalize.mean.tolist()), tuple(normalize.std.tolist())))


def model_normalize(model: nn.Module) -> Normalize:
    """Normalisation with the model's own mean and std (ImageNet's where it names none)."""
    config = getattr(model, "pretrained_cfg", {}) or {}
    return Normalize(config.get("mean", IMAGENET_MEAN), config.get("std", IMAGENET_STD))
