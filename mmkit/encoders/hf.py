"""Encoders backed by Hugging Face transformers: any AutoModel text or audio backbone, with
its own tokenizer or feature extractor, from a local folder or a hub id."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmkit.encoders.audio import FitClip
from mmkit.encoders.base import Encoded, Encoder, masked_mean
from mmkit.encoders.text import TrimPadding
from mmkit.errors import MMKitError, one_line
from mmkit.hub import hub_snapshot
from mmkit.samples import Waveform

HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
# What a model folder needs from a hub repo: configs, tokenizer and feature-extractor files;
# the weights are added as safetensors, or as pytorch_model.bin where a repo has no safetensors.
HUB_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]
HUB_ADVICE = ("offline, download it once with network access (it is cached) or set model to a local "
              "folder (one saved with save_pretrained)")
AST_MODEL_TYPE = "audio-spectrogram-transformer"


class HFTextEncoder(Encoder):
    """Any Hugging Face transformers text model (BERT, RoBERTa, MiniLM, GPT-2, ...) with its own tokenizer.

    A sentence-transformers folder loads by its path too. Weights are read from safetensors, or
    from pytorch_model.bin with torch.load(weights_only=True): never unpickled code.

    Args:
        model: a hub id ("sentence-transformers/all-MiniLM-L6-v2") or a local folder saved with
            save_pretrained or by sentence-transformers.
        pretrained: load the saved weights; false: random init from the model's config (its
            tokenizer is still used).
        pooling: "mean" over the real tokens, "cls" (the first token) or "pooler" (the model's
            pooler output, e.g. BERT's).
        max_length: tokens per text at most; longer texts are truncated, a batch is padded to its longest.
    """

    def __init__(self, model: str, pretrained: bool = True,
                 pooling: Literal["cls", "mean", "pooler"] = "mean", max_length: int = 64):
        super().__init__()
        from transformers import AutoTokenizer

        what = f"hf text encoder {model!r}"
        folder = model_folder(model, what)
        backbone = load_model(folder, pretrained, what, optional=() if pooling == "pooler" else ("pooler.",))
        tokenizer = from_folder(AutoTokenizer, folder, what)
        add_pad_and_mask_tokens(tokenizer, backbone)
        self.model = encoder_only(backbone)
        keep_pooler(self.model, pooling == "pooler", what)
        positions = min(tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None) or 10**9)
        if not 2 <= max_length <= positions:
            raise MMKitError(f"{what}: max_length must be at least 2 and at most the model's "
                             f"{positions} positions, got {max_length}")
        self.pooling = pooling
        self.preprocess = HFTokenize(tokenizer, max_length)
        self.collate = TrimPadding(tokenizer.pad_token_id)
        self.dim = self.model.config.hidden_size
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.pad_id, self.mask_id = tokenizer.pad_token_id, tokenizer.mask_token_id
        self.special_ids = tuple(tokenizer.all_special_ids)

    def words(self, ids: list[int]) -> list[str]:
        return self.preprocess.tokenizer.convert_ids_to_tokens(ids)

    def forward(self, inputs: dict[str, torch.Tensor] | torch.Tensor) -> Encoded:
        """Encode a batch of ``preprocess`` outputs; bare input_ids count every id but pad_id as real."""
        if isinstance(inputs, torch.Tensor):
            inputs = {"input_ids": inputs, "attention_mask": (inputs != self.pad_id).long()}
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        tokens, mask = out.last_hidden_state, inputs["attention_mask"].bool()
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "pooler":
            pooled = out.pooler_output
        else:
            pooled = masked_mean(tokens, mask)
        return Encoded(tokens=tokens, pooled=pooled, mask=mask)


class HFTokenize:
    """Text -> {"input_ids", "attention_mask"} of ``max_length`` tokens, with the model's tokenizer.

    Special tokens written in a text ("[MASK]", "</s>") stay text, so no text tokenizes to the
    mask token; padding goes on the right, so the first token is the class token.
    """

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.max_length = max_length

    def __call__(self, text: str) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(text, padding="max_length", truncation=True, max_length=self.max_length,
                                 split_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return {"input_ids": encoded["input_ids"][0], "attention_mask": encoded["attention_mask"][0]}


class HFAudioEncoder(Encoder):
    """Any Hugging Face transformers audio backbone (wav2vec2, HuBERT, AST, Whisper's encoder)
    with its own feature extractor; clips are resampled to the rate it expects.

    Tokens are frames (a 1 x frames grid) or, for AST, its class and distillation tokens then
    the frequency x time patches. Whisper and AST pad every clip to their fixed window (30 s and
    about 10 s for the released models); the tokens past the clip are masked out.

    Args:
        model: a hub id ("facebook/wav2vec2-base") or a local folder saved with save_pretrained.
        pretrained: load the saved weights; false: random init from the model's config.
        clip_seconds: clips are padded with silence or cut to this length.
        pooling: "mean" over the clip's tokens, or "cls" (the class token: AST only).
    """

    def __init__(self, model: str, pretrained: bool = True, clip_seconds: float = 1.0,
                 pooling: Literal["mean", "cls"] = "mean"):
        super().__init__()
        from transformers import AutoFeatureExtractor

        what = f"hf audio encoder {model!r}"
        if clip_seconds <= 0:
            raise MMKitError(f"{what}: clip_seconds must be positive, got {clip_seconds}")
        folder = model_folder(model, what)
        self.model = encoder_only(load_model(folder, pretrained, what))
        config = self.model.config
        if config.model_type == AST_MODEL_TYPE:  # cls + distillation tokens, then frequency x time patches
            self.prefix, self.rows, self.time_stride = 2, self.model.embeddings.get_shape(config)[0], config.time_stride
        else:  # a sequence of frames
            self.prefix, self.rows, self.time_stride = 0, 1, None
        if pooling == "cls" and self.prefix == 0:
            raise MMKitError(f"{what}: pooling 'cls' needs a class token, which {config.model_type} has not; "
                             "use pooling = 'mean'")
        extractor = from_folder(AutoFeatureExtractor, folder, what)
        self.input_name = extractor.model_input_names[0]
        self.pooling = pooling
        frame_mask = config.model_type in ("whisper", AST_MODEL_TYPE)
        self.preprocess = AudioFeatures(extractor, clip_seconds, frame_mask=frame_mask)
        self.dim = config.hidden_size

    def forward(self, inputs: dict[str, torch.Tensor]) -> Encoded:
        tokens = self.model(inputs[self.input_name]).last_hidden_state
        mask = clip_mask(inputs.get("attention_mask"), tokens, self.prefix, self.rows, self.time_stride)
        pooled = tokens[:, 0] if self.pooling == "cls" else masked_mean(tokens, mask)
        grid = (self.rows, (tokens.shape[1] - self.prefix) // self.rows)
        return Encoded(tokens=tokens, pooled=pooled, mask=mask, grid=grid, prefix=self.prefix)


class AudioFeatures:
    """Waveform -> the feature extractor's inputs for one clip (a dict of tensors): mixed to
    mono, resampled to the extractor's rate, padded with silence or cut to ``clip_seconds``.
    With ``frame_mask`` it also gives which feature frames hold the clip (as "attention_mask":
    Whisper and AST pad every clip to their window)."""

    def __init__(self, extractor: Any, clip_seconds: float, frame_mask: bool):
        self.extractor = extractor
        self.fit = FitClip(extractor.sampling_rate, clip_seconds)
        self.frame_mask = frame_mask

    def __call__(self, clip: Waveform) -> dict[str, torch.Tensor]:
        features = self.extractor(self.fit(clip).numpy(), sampling_rate=self.fit.sample_rate, return_tensors="pt",
                                  return_attention_mask=self.frame_mask)
        features = {name: value[0] for name, value in features.items()}
        if self.frame_mask and "attention_mask" not in features:  # AST's extractor pads without saying where
            frames = fbank_frames(self.fit.length, self.fit.sample_rate)
            features["attention_mask"] = (torch.arange(self.extractor.max_length) < frames).long()
        return features


def fbank_frames(samples: int, rate: int) -> int:
    """How many Kaldi filter-bank frames (25 ms windows every 10 ms, as AST's feature extractor
    takes them) ``samples`` give."""
    window, hop = int(rate * 0.025), int(rate * 0.010)
    return 1 + (samples - window) // hop if samples >= window else 0


def clip_mask(frames: torch.Tensor | None, tokens: torch.Tensor, prefix: int, rows: int,
              stride: int | None) -> torch.Tensor:
    """Which tokens hold the clip: all without a frame mask; else the prefix tokens and, in each of
    the ``rows``, the tokens whose first feature frame does (each token strides over ``stride``
    frames, or over the frames evenly)."""
    if frames is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    columns = (tokens.shape[1] - prefix) // rows
    starts = frames[:, :: stride or frames.shape[1] // columns][:, :columns].bool()
    return torch.cat([starts.new_ones(len(starts), prefix), starts.repeat(1, rows)], dim=1)


def model_folder(model: str, what: str) -> Path:
    """The local folder of ``model``: a directory, or a hub repo's snapshot (downloaded once,
    then cached); inside a sentence-transformers folder, the transformer's own."""
    path = Path(model).expanduser()
    if not path.exists() and not HUB_ID.fullmatch(model):
        raise MMKitError(f"{what}: no such folder: {model}")
    if path.exists() and not path.is_dir():
        raise MMKitError(f"{what}: {model} is a file; give the folder with the model's config, weights "
                         "and tokenizer or feature extractor")
    folder = path if path.exists() else hub_model(model, what)
    return sentence_transformer_module(folder)


def hub_model(repo_id: str, what: str) -> Path:
    """A hub repo's configs, tokenizer and weights: safetensors, or pytorch_model.bin where
    the repo has no safetensors (not every framework's copy of the weights)."""
    folder = hub_snapshot(repo_id, what, HUB_ADVICE, allow_patterns=[*HUB_FILES, "*.safetensors"])
    if not any(folder.rglob("*.safetensors")):
        folder = hub_snapshot(repo_id, what, HUB_ADVICE, allow_patterns=[*HUB_FILES, "*.bin"])
    return folder


def sentence_transformer_module(folder: Path) -> Path:
    """Where a sentence-transformers folder keeps its transformer, as modules.json says: the
    folder itself, or a subfolder (0_Transformer/ in older ones); other folders as they are."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return folder
    paths = [m.get("path", "") for m in json.loads(modules.read_text()) if m.get("type", "").endswith(".Transformer")]
    return folder / paths[0] if paths else folder


def from_folder(auto_class: Any, folder: Path, what: str, **options: Any) -> Any:
    """``auto_class.from_pretrained`` on a local folder only (never the hub), failing in one line."""
    try:
        return auto_class.from_pretrained(folder, local_files_only=True, **options)
    except (OSError, ValueError, KeyError) as error:
        raise MMKitError(f"{what}: cannot load {auto_class.__name__} from {folder}: {one_line(error)}") from None


def load_model(folder: Path, pretrained: bool, what: str, optional: tuple[str, ...] = ()) -> nn.Module:
    """The folder's model in float32 and in training mode, like any freshly built module:
    its saved weights (safetensors, or .bin through torch.load(weights_only=True)), all of them
    but the ``optional`` ones (name prefixes), or without ``pretrained`` a random init from its config."""
    from transformers import AutoConfig, AutoModel

    if pretrained:
        try:
            model, info = from_folder(AutoModel, folder, what, dtype=torch.float32, weights_only=True,
                                      output_loading_info=True)
        except pickle.UnpicklingError:
            raise MMKitError(f"{what}: the weights in {folder} need pickled Python objects to load, which mmkit "
                             "refuses (loading them could run code); save them as model.safetensors") from None
        refuse_missing_weights(model, info["missing_keys"], optional, folder, what)
    else:
        model = AutoModel.from_config(from_folder(AutoConfig, folder, what))
    return model.train()


def refuse_missing_weights(model: nn.Module, missing: Iterable[str], optional: tuple[str, ...], folder: Path,
                           what: str) -> None:
    """Refuse saved weights that leave part of what mmkit uses at random (transformers only prints
    a table): any tensor of the encoder missing, but those named ``optional``."""
    tensors = model.state_dict(keep_vars=True)
    used = {id(tensor) for tensor in encoder_only(model).state_dict(keep_vars=True).values()}
    missing = sorted(k for k in missing if k in tensors and id(tensors[k]) in used and not k.startswith(optional))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MMKitError(f"{what}: the weights in {folder} do not fit the model, they lack {', '.join(missing[:3])}"
                         f"{more}; save the whole model with save_pretrained, or set pretrained = false")


def encoder_only(model: nn.Module) -> nn.Module:
    """The encoder of an encoder-decoder model (Whisper, T5), which is what encodes inputs."""
    return model.get_encoder() if model.config.is_encoder_decoder else model


def add_pad_and_mask_tokens(tokenizer: Any, model: nn.Module) -> None:
    """Give the tokenizer a pad token (its eos token, if it has one) and a mask token of its
    own, growing the model's token embeddings for any token added."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": "[MASK]"})
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def keep_pooler(model: nn.Module, wanted: bool, what: str) -> None:
    """Check a model has the pooler that pooling = "pooler" needs; drop an unused one, whose
    parameters would get no gradient (which DDP refuses)."""
    has_pooler = getattr(model, "pooler", None) is not None
    if wanted and not has_pooler:
        raise MMKitError(f"{what}: the model has no pooler layer; use pooling = 'mean' or 'cls'")
    if has_pooler and not wanted:
        model.pooler = None
