"""Image encoders from torchvision: any classification model by name (ResNet, ConvNeXt, ViT, ...)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn

from mmkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoded, Encoder, Normalize, feature_map_cells, resize_crop
from mmkit.errors import MMKitError, one_line
from mmkit.hub import reachable
from mmkit.weights import load_into, load_weights, names_a_file, weights_file

# torchvision's DenseNet files name some layers the old way ("norm.1" for "norm1"); its own loader renames them.
OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


class TorchvisionImageEncoder(Encoder):
    """Any torchvision classification model without its classifier; tokens are the last feature
    map's cells row by row (CNNs) or the class token then the patches (ViTs), pooled is the
    model's own pre-logits feature.

    Args:
        model_name: a torchvision.models name, e.g. "resnet18", "convnext_tiny", "efficientnet_b0", "vit_b_16".
        weights: none for random weights; a weights name of the model ("DEFAULT", "IMAGENET1K_V1"),
            downloaded once into torch.hub's cache; or a local weights file (.safetensors, or .pth/.pt
            holding only tensors).
        image_size: side in pixels that images are resized and center-cropped to (with ImageNet's
            mean and std) and that a ViT is built for, unless a weights name brings its own transforms.
    """

    def __init__(self, model_name: str = "resnet18", weights: str | None = None, image_size: int = 224):
        super().__init__()
        what = f"torchvision model {model_name!r}"
        check_model_name(model_name)
        published = published_weights(model_name, weights, what)
        state = load_weights(weights_path(published, weights, what), what) if weights else None
        self.model = build_model(model_name, published, image_size, pretrained=state is not None)
        self.vit = is_vit(self.model)
        self.tap = FeatureTap(*token_source(self.model))  # found while the classifier still marks the trunk's end
        classifier, dropped = drop_classifier(self.model, what)
        if state is not None:
            load_into(self.model, renamed(state, dropped), what)
        self.dim = classifier.in_features
        self.preprocess, self.on_device = image_transform(published, image_size)
        self.cell = (3, self.model.patch_size, self.model.patch_size) if self.vit else self._stride()

    @torch.no_grad()
    def _stride(self, side: int = 256) -> tuple[int, int, int]:
        """The pixels one feature-map cell covers: the network's stride, from the map of one
        blank image whose side every power-of-two stride divides."""
        training = self.model.training
        self.model.eval()
        self.model(torch.zeros(1, 3, side, side))
        rows, columns = self.tap.value.shape[-2:]
        self.tap.value = None
        self.model.train(training)
        return 3, side // rows, side // columns

    def forward(self, images: torch.Tensor) -> Encoded:
        pooled = self.model(images)
        features, self.tap.value = self.tap.value, None  # the tap holds no graph between calls
        if self.vit:  # the encoder's tokens: class token, then the patches row by row
            side = self.model.image_size // self.model.patch_size
            tokens, prefix, grid = features, 1, (side, side)
        else:
            (tokens, grid), prefix = feature_map_cells(features), 0
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(tokens=tokens, pooled=pooled, mask=mask, grid=grid, prefix=prefix)


class FeatureTap:
    """Keeps the feature map (or tokens) one module of the model takes or gives during a forward
    pass, so the model's own forward yields both its pooled feature and its tokens."""

    def __init__(self, module: nn.Module, takes_input: bool):
        self.value: torch.Tensor | None = None
        if takes_input:
            module.register_forward_pre_hook(self.keep_input)
        else:
            module.register_forward_hook(self.keep_output)

    def keep_input(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def keep_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.value = output


def check_model_name(name: str) -> None:
    """Refuse names that are not torchvision classification models, suggesting a close one."""
    from torchvision import models

    known = models.list_models(module=models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise MMKitError(f"unknown torchvision model {name!r}; {hint}see torchvision.models.list_models()")


def published_weights(name: str, weights: str | None, what: str) -> Any:
    """The model's weights enum member that ``weights`` names ("IMAGENET1K_V1", "DEFAULT" or
    "ResNet18_Weights.IMAGENET1K_V1"); None for random weights or a local file."""
    from torchvision import models

    if weights is None:
        return None
    enum = models.get_model_weights(name)
    member = weights.removeprefix(f"{enum.__name__}.")
    if member in enum.__members__:
        return enum[member]
    if names_a_file(weights):
        return None
    raise MMKitError(f"{what} has no weights {weights!r}; its weights are {', '.join(enum.__members__)}, "
                     "or set weights to a local weights file")


def weights_path(published: Any, weights: str, what: str) -> Path:
    """The local file, or the published weights' file in torch.hub's cache (downloaded when missing)."""
    if published is None:
        return weights_file(weights, what)
    return torch_hub_file(published.url, f"{what}: weights {weights!r}")


def torch_hub_file(url: str, what: str) -> Path:
    """``url``'s file in torch.hub's cache, where torchvision's own download puts it; fetched when
    missing and the host answers, else a one-line error saying how to use a local copy."""
    import torch.hub

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name
    if path.is_file():
        return path
    if not reachable(url, timeout=3.0):
        raise MMKitError(f"{what} are not in torch.hub's cache ({path}) and {urlsplit(url).hostname} cannot be "
                         "reached; download them once with network access (they are cached), or set weights "
                         "to a local weights file")
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = torch.hub.HASH_REGEX.search(path.name)  # torchvision's file names carry a hash prefix
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=digest.group(1) if digest else None)
    except Exception as error:
        raise MMKitError(f"{what}: download from {url} failed: {one_line(error)}; "
                         "set weights to a local weights file") from None
    return path


def build_model(name: str, published: Any, image_size: int, pretrained: bool) -> nn.Module:
    """The model with random weights, built as torchvision builds it for ``published``: a ViT
    for the weights' input size (else ``image_size``); Inception-style models, when any weights
    load (a local file too, which does not say how it was trained), taking their inputs as
    torchvision's builders do for any weights."""
    from torchvision import models

    size = published.meta["min_size"][0] if published is not None else image_size
    try:
        model = models.get_model(name, image_size=size)
    except TypeError as error:  # only ViTs take an input size
        if "image_size" not in str(error):
            raise
        model = models.get_model(name)
    if pretrained and hasattr(model, "transform_input"):
        model.transform_input = True
    return model


def drop_classifier(model: nn.Module, what: str) -> tuple[nn.Linear, tuple[str, ...]]:
    """Replace the classifier's last layer (and auxiliary classifiers) with nothing, so the
    model returns its pre-logits feature; returns that layer and the dropped names (with a dot)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MMKitError(f"{what} has no linear classifier to take off; pick another model")
    name, classifier = linears[-1]
    head = model.get_submodule(name.split(".")[0])
    if any(isinstance(m, nn.Linear) and m is not classifier and m.in_features != m.out_features
           for m in head.modules()):
        raise MMKitError(f"{what}: its classifier has hidden layers, so its pre-logits feature is not as wide "
                         "as its feature map; pick a model without them (resnet, convnext, efficientnet, "
                         "regnet, swin, vit, ...)")
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, nn.Identity())
    dropped = [name]
    if getattr(model, "aux_logits", False):  # googlenet, inception_v3: classifiers for training only
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if getattr(model, aux, None) is not None:
                setattr(model, aux, None)
                dropped.append(aux)
    return classifier, tuple(f"{n}." for n in dropped)


def renamed(state: dict[str, torch.Tensor], dropped: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A torchvision state dict as the headless model names it: the dropped classifiers' weights
    left out and DenseNet's old names brought up to date."""
    return {OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items() if not k.startswith(dropped)}


def is_vit(model: nn.Module) -> bool:
    from torchvision.models import VisionTransformer

    return isinstance(model, VisionTransformer)


def token_source(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose input (True) or output (False) holds the tokens: a ViT's encoder; a CNN's
    global pooling or, where the model pools with a function, the module before its classifier."""
    if is_vit(model):
        return model.encoder, False
    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if pools:
        return pools[-1], True
    head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1].split(".")[0]
    children = [name for name, _ in model.named_children()]
    return model.get_submodule(children[children.index(head) - 1]), False


def image_transform(published: Any, image_size: int) -> tuple[Any, Normalize]:
    """The weights' own resizing, crop, interpolation, mean and std where a weights name is
    given (what their ``transforms()`` do), else resize, center-crop and ImageNet
    normalisation at ``image_size``; images are made RGB first. Preprocess and on_device."""
    if published is None:
        return resize_crop(image_size), Normalize(IMAGENET_MEAN, IMAGENET_STD)
    preset = published.transforms()
    return (resize_crop(preset.crop_size[0], preset.resize_size[0], preset.interpolation, preset.antialias),
            Normalize(tuple(preset.mean), tuple(preset.std)))
