"""open_clip's towers as encoders: the image or text tower of any open_clip model, with its own
preprocessing and tokenizer, and random weights, a pretrained tag or a local checkpoint."""

from __future__ import annotations

import difflib
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from mmkit.encoders.base import Encoded, Encoder, Normalize, PixelTensor, feature_map_cells
from mmkit.encoders.text import TrimPadding, pad_after_end
from mmkit.errors import MMKitError, one_line
from mmkit.hub import hub_file
from mmkit.weights import load_into, load_weights, names_a_file, weights_file

# The files open_clip looks for in a tag's hub repo when its config names none.
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OFFLINE_ADVICE = ("offline, download it once with network access (it is cached), "
                  "or set pretrained to a local checkpoint file")


class OpenClipImageEncoder(Encoder):
    """The image tower of an open_clip model (ViT, ModifiedResNet or timm trunk): pooled is
    open_clip's image embedding (what encode_image gives), tokens its patch or feature-map
    tokens mapped into the same width.

    Args:
        model_name: an open_clip model name, e.g. "ViT-B-32", "RN50", "convnext_base_w"
            (see open_clip.list_models()).
        pretrained: none for random weights; an open_clip pretrained tag, e.g. "laion2b_s34b_b79k"
            (see open_clip.list_pretrained_tags_by_model), fetched once from the Hugging Face hub;
            or a local checkpoint file (.safetensors, or .bin/.pt holding only tensors) of the
            whole model or of its image tower.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None):
        super().__init__()
        what = f"open_clip model {model_name!r}"
        config = model_config(model_name, what)
        path, tag = checkpoint(model_name, pretrained, what) if pretrained else (None, {})
        self.visual = build_tower("visual", config, tag)
        if path is not None:
            load_into(self.visual, tower_weights(load_weights(path, what), "visual"), what)
        self.kind = visual_kind(self.visual, what)
        if self.kind == "vit":
            self.visual.output_tokens = True
        self.dim = config["embed_dim"]
        self.preprocess, self.on_device = image_transform(self.visual, tag, what)
        self.cell = self._cell()

    def _cell(self) -> tuple[int, int, int]:
        """The pixels one token covers: a patch, or the ResNet's stride of 32."""
        if self.kind == "timm":
            from mmkit.encoders.timm_image import timm_cell

            return timm_cell(self.visual.trunk)
        if self.kind == "resnet":
            return 3, 32, 32
        size = self.visual.image_size
        rows, columns = self.visual.grid_size
        height, width = (size, size) if isinstance(size, int) else size
        return 3, height // rows, width // columns

    def forward(self, images: torch.Tensor) -> Encoded:
        pooled, tokens, prefix, grid = getattr(self, f"_{self.kind}")(images)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(tokens=tokens, pooled=pooled, mask=mask, grid=grid, prefix=prefix)

    def _vit(self, images: torch.Tensor) -> tuple:
        """open_clip's own token output: the patches (after the class token where the tower keeps it)."""
        pooled, tokens = self.visual(images)
        rows, columns = self.visual.grid_size
        prefix = tokens.shape[1] - rows * columns
        grid = (rows, columns) if prefix in (0, 1) else None  # attention-pooled queries lie on no grid
        return pooled, project(tokens, self.visual.proj), prefix if grid else 0, grid

    def _resnet(self, images: torch.Tensor) -> tuple:
        """The final feature map's cells through the attention pool's value and output projections
        (the dense reading of CLIP's ResNets, as in MaskCLIP), so they share the pooled width."""
        visual = self.visual
        features = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
        cells, grid = feature_map_cells(features)
        tokens = visual.attnpool.c_proj(visual.attnpool.v_proj(cells))
        return visual.attnpool(features), tokens, 0, grid

    def _timm(self, images: torch.Tensor) -> tuple:
        """The timm trunk's features through the tower's token-wise projection head."""
        from mmkit.encoders.timm_image import timm_tokens

        trunk = self.visual.trunk
        features = trunk.forward_features(images)
        pooled = self.visual.head(trunk.forward_head(features))
        tokens, prefix, grid = timm_tokens(trunk, features, images.shape[-2:])
        return pooled, self.visual.head(tokens), prefix, grid


class OpenClipTextEncoder(Encoder):
    """The text tower of an open_clip model with its tokenizer: pooled is open_clip's text
    embedding (what encode_text gives), tokens the final-normed token features mapped by the
    tower's projection into the same width. A mask token is added as one more embedding row.

    Args:
        model_name: an open_clip model name, e.g. "ViT-B-32" (see open_clip.list_models()).
        pretrained: none for random weights; an open_clip pretrained tag, e.g. "laion2b_s34b_b79k",
            fetched once from the Hugging Face hub; or a local checkpoint file (.safetensors, or
            .bin/.pt holding only tensors) of the whole model or of its text tower.
        context_length: tokens per text, at most the model's; none for the model's own.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None,
                 context_length: int | None = None):
        super().__init__()
        what = f"open_clip model {model_name!r}"
        config = model_config(model_name, what)
        text_config = config["text_cfg"]
        if "hf_model_name" in text_config:
            raise MMKitError(f"{what}: its text tower is the Hugging Face model {text_config['hf_model_name']!r}, "
                             "which this encoder does not build; see `mmkit list text_encoders`")
        if "hf_tokenizer_name" in text_config or text_config.get("pool_type", "argmax") not in ("argmax", "eos"):
            raise MMKitError(f"{what}: its text tower uses another tokenizer or pools another token than open_clip's "
                             "own BPE end-of-text token (a SigLIP-style tower), which this encoder does not support")
        longest = text_config.get("context_length", 77)
        if context_length is not None and not 2 <= context_length <= longest:
            raise MMKitError(f"{what}: context_length must be between 2 and the model's {longest}, "
                             f"got {context_length}")
        text_config["context_length"] = context_length or longest
        path, tag = checkpoint(model_name, pretrained, what) if pretrained else (None, {})
        tokenizer = open_clip_tokenizer(model_name, text_config["context_length"], what)
        self.text = build_tower("text", config, tag)
        if path is not None:
            load_into(self.text, fit_positions(tower_weights(load_weights(path, what), "text"), self.text), what)
        self.text.output_tokens = True
        if self.text.pool_type == "argmax":
            # open_clip pools at the highest id, the end-of-text token; the mask token added below
            # has a higher id, so pool at the end-of-text token by name, which gives the same for any text.
            self.text.pool_type, self.text.eos_id = "eos", tokenizer.eot_token_id
        self.mask_id, self.pad_id = add_mask_and_pad_tokens(self.text)
        # Batches come cut to their longest text (TrimPadding); open_clip slices its causal mask
        # to a shorter batch only when it also masks padding, which leaves real tokens as they are.
        self.text.use_pad_mask, self.text.pad_id = True, self.pad_id
        self.special_ids = (tokenizer.sot_token_id, tokenizer.eot_token_id)
        self.vocab_size = self.text.vocab_size
        self.dim = self.text.output_dim if self.text.text_projection is not None else self.text.width
        self.preprocess = OpenClipTokenize(tokenizer, self.pad_id)
        # A CoCa class token is appended after the whole context, the position it has in open_clip;
        # a batch cut shorter would move it, so such towers take every batch at full width.
        self.collate = TrimPadding(self.pad_id) if self.text.cls_emb is None else None

    def words(self, ids: list[int]) -> list[str]:
        from mmkit.encoders.text import bpe_words

        return bpe_words(self.preprocess.tokenizer, ids, {self.mask_id: "[mask]", self.pad_id: "[pad]"})

    def forward(self, ids: torch.Tensor) -> Encoded:
        pooled, tokens = self.text(ids)
        return Encoded(tokens=project(tokens, self.text.text_projection), pooled=pooled, mask=ids != self.pad_id)


class OpenClipTokenize:
    """Text -> LongTensor[context_length] with the model's own open_clip tokenizer, padded with
    ``pad_id`` (open_clip pads with 0, which is also the token "!")."""

    def __init__(self, tokenizer: Any, pad_id: int):
        self.tokenizer = tokenizer
        self.pad_id = pad_id

    def __call__(self, text: str) -> torch.Tensor:
        return pad_after_end(self.tokenizer([text])[0], self.tokenizer.eot_token_id, self.pad_id)


def model_config(name: str, what: str) -> dict[str, Any]:
    """open_clip's config for the model (a copy), refusing names it does not know."""
    import open_clip

    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise MMKitError(f"unknown open_clip model {name!r}; {hint}see open_clip.list_models()")
    return open_clip.get_model_config(name)


def checkpoint(name: str, pretrained: str, what: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint file ``pretrained`` names and, for a tag, open_clip's settings for it
    (preprocessing, QuickGELU): a known tag is fetched from the hub repo open_clip names."""
    import open_clip

    tag = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag:
        if names_a_file(pretrained):
            return weights_file(pretrained, what), {}
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise MMKitError(f"{what} has no pretrained tag {pretrained!r}; its tags: {tags}; "
                         "or set pretrained to a local checkpoint file")
    if not tag.get("hf_hub"):
        raise MMKitError(f"{what}: open_clip publishes pretrained {pretrained!r} only at {tag.get('url')}, which "
                         "mmkit does not download; download it and set pretrained to the local file")
    repo, filename = tag["hf_hub"].rsplit("/", 1)  # "org/repo/" (open_clip's usual files) or "org/repo/file"
    names = hub_names(filename)
    return hub_file(repo, names, f"{what}: pretrained {pretrained!r}", advice=OFFLINE_ADVICE), tag


def hub_names(filename: str) -> tuple[str, ...]:
    """The files to try in a tag's hub repo: as open_clip does, a safetensors copy first."""
    if not filename or filename == HUB_FILES[1]:
        return HUB_FILES
    if filename.endswith((".bin", ".pth")):
        return str(PurePosixPath(filename).with_suffix(".safetensors")), filename
    return (filename,)


def build_tower(tower: str, config: dict[str, Any], tag: dict[str, Any]) -> nn.Module:
    """One tower, built as open_clip builds it inside its CLIP models, with random weights (no
    timm or Hugging Face download) and QuickGELU where the tag's weights were trained with it."""
    from open_clip.model import _build_text_tower, _build_vision_tower

    quick_gelu = config.get("quick_gelu", False) or tag.get("quick_gelu", False)
    if tower == "visual":
        vision = {**config["vision_cfg"], "timm_model_pretrained": False}
        return _build_vision_tower(config["embed_dim"], vision, quick_gelu)
    return _build_text_tower(config["embed_dim"], config["text_cfg"], quick_gelu)


def tower_weights(state: dict[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    """One tower's weights from a whole-model checkpoint (either of open_clip's layouts: the text
    tower under ``text.`` or at the top level) or from a checkpoint of that tower alone."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    prefix = f"{tower}."
    if any(k.startswith(prefix) for k in state):
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if tower == "visual":
        return state
    return {k: v for k, v in state.items() if not k.startswith(("visual.", "logit_", "text_decoder."))}


def fit_positions(state: dict[str, torch.Tensor], text: nn.Module) -> dict[str, torch.Tensor]:
    """A shorter context keeps the first positions of a longer one: under causal attention their
    features are what the longer context gives them. A CoCa class token keeps its last position,
    where it sees the same unpadded text."""
    positions = state.get("positional_embedding")
    wanted = text.positional_embedding.shape[0]
    if positions is not None and positions.shape[0] > wanted:
        kept = positions[:wanted] if text.cls_emb is None else torch.cat([positions[: wanted - 1], positions[-1:]])
        state = {**state, "positional_embedding": kept}
    return state


def open_clip_tokenizer(name: str, context_length: int, what: str) -> Any:
    import open_clip

    try:
        return open_clip.get_tokenizer(name, context_length=context_length)
    except Exception as error:  # tokenizers other than open_clip's own come from the hub
        raise MMKitError(f"{what}: its tokenizer cannot be loaded: {one_line(error)}") from None


def add_mask_and_pad_tokens(text: nn.Module) -> tuple[int, int]:
    """Grow the token embedding by two rows: a mask token that no text tokenizes to, and
    padding of its own, which starts as open_clip's padding (id 0): open_clip's CoCa mask lets the
    class token see the first padding token; their ids."""
    old = text.token_embedding
    grown = nn.Embedding(old.num_embeddings + 2, old.embedding_dim)
    with torch.no_grad():
        grown.weight[:-2] = old.weight
        nn.init.normal_(grown.weight[-2], std=0.02)  # as open_clip initialises token embeddings
        grown.weight[-1] = old.weight[0]
    text.token_embedding = grown
    text.vocab_size = grown.num_embeddings
    return old.num_embeddings, old.num_embeddings + 1


def visual_kind(visual: nn.Module, what: str) -> str:
    """Which reading of tokens the tower needs; refuses timm towers whose head pools (not token-wise)."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel

    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, TimmModel):
        if "pool" in dict(visual.head.named_children()) or getattr(visual.trunk, "num_classes", 0):
            raise MMKitError(f"{what}: its timm image tower pools with its own head, so its tokens cannot be "
                             "mapped into the embedding's width; pick another model")
        return "timm"
    return "vit"


def project(tokens: torch.Tensor, projection: nn.Module | torch.Tensor | None) -> torch.Tensor:
    """Tokens mapped by a tower's own output projection, so tokens and pooled share one width."""
    if projection is None:
        return tokens
    return projection(tokens) if isinstance(projection, nn.Module) else tokens @ projection


def image_transform(visual: nn.Module, tag: dict[str, Any], what: str) -> tuple[Any, Normalize]:
    """open_clip's eval transform for the tower's input size and the tag's mean, std and
    resizing: its resizing to uint8 pixels (preprocess), its ToTensor + Normalize on the
    device (on_device; the same numbers)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
    from torchvision import transforms

    settings = merge_preprocess_dict(PreprocessCfg(), {**tag, "size": visual.image_size})
    *resize, to_tensor, normalize = steps = image_transform_v2(PreprocessCfg(**settings), is_train=False).transforms
    if not (isinstance(normalize, transforms.Normalize) and type(to_tensor).__name__.endswith("ToTensor")):
        raise MMKitError(f"{what}: open_clip's eval transform no longer ends in ToTensor + Normalize "
                         f"({', '.join(type(step).__name__ for step in steps)}); mmkit needs updating for it")
    return transforms.Compose([*resize, PixelTensor()]), Normalize(normalize.mean, normalize.std)
