"""Tiny Hugging Face models saved to temporary folders, built offline from configs with
random weights (seeded): each function returns the folder, made once per test session and
removed at exit."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from mmkit.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES
from mmkit.data.sounds import LOUDNESS, SOUNDS, TIMING

SMALL_AUDIO = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
# Two conv layers striding 10 and 8: a frame per 5 ms at 16 kHz; no layer skipped in training.
FRAMES = dict(conv_dim=(8, 8), conv_stride=(10, 8), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
              num_conv_pos_embedding_groups=2, layerdrop=0.0)


def caption_words() -> list[str]:
    """Every word of the synthetic datasets' captions."""
    phrases = [*COLOURS, *SHAPES, *SIZES, *POSITIONS, *SOUNDS, *LOUDNESS, *TIMING, "a in the"]
    return sorted({word for phrase in phrases for word in phrase.split()})


@functools.cache
def scratch() -> Path:
    """The session's temporary folder, removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="mmkit-tiny-hf-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def new_folder() -> Path:
    """A new empty folder inside the session's one."""
    return Path(tempfile.mkdtemp(dir=scratch()))


def save(*parts: Any) -> Path:
    """Save a model with its tokenizer or feature extractor into a new folder."""
    folder = new_folder()
    for part in parts:
        part.save_pretrained(folder)
    return folder


def seeded(build: Callable[[], Path]) -> Callable[[], Path]:
    """Build once, with torch's generator seeded (the same weights in every session),
    leaving the caller's random stream as it was."""

    @functools.wraps(build)
    def built() -> Path:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build()

    return functools.cache(built)


@seeded
def tiny_bert_dir() -> Path:
    """A one-layer BERT (width 32, with a pooler) and a WordPiece tokenizer over the caption words."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = new_folder()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *caption_words()]) + "\n")
    tokenizer = BertTokenizer.from_pretrained(vocab)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                        vocab_size=len(tokenizer), max_position_embeddings=64)
    return save(BertModel(config), tokenizer)


@seeded
def tiny_gpt2_dir() -> Path:
    """A one-layer GPT-2 with a byte-level tokenizer (one token per byte, no merges): it has
    an end-of-text token but no pad or mask token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GPT2Config, GPT2Model, GPT2Tokenizer

    files = new_folder()
    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    (files / "vocab.json").write_text(json.dumps(vocab))
    (files / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = GPT2Tokenizer.from_pretrained(files)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=len(vocab),
                        bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    return save(GPT2Model(config), tokenizer)


@seeded
def tiny_wav2vec2_dir() -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    return save(Wav2Vec2Model(Wav2Vec2Config(**SMALL_AUDIO, **FRAMES)), Wav2Vec2FeatureExtractor())


@seeded
def tiny_hubert_dir() -> Path:
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    return save(HubertModel(HubertConfig(**SMALL_AUDIO, **FRAMES)), Wav2Vec2FeatureExtractor())


@seeded
def tiny_whisper_dir() -> Path:
    """Whisper with a 1 s window (100 mel frames of 16 bands, 50 encoder positions), not 30 s."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=20, decoder_ffn_dim=20, num_mel_bins=16,
                           max_source_positions=50, max_target_positions=8, vocab_size=16, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=3, suppress_tokens=None,
                           begin_suppress_tokens=None)
    return save(WhisperModel(config), WhisperFeatureExtractor(feature_size=16, chunk_length=1))


@seeded
def tiny_ast_dir() -> Path:
    """AST over 1 s (100 frames) of 26 mel bands: 2 x 9 patches of 16, strided by 10."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    config = ASTConfig(**SMALL_AUDIO, num_mel_bins=26, max_length=100, patch_size=16, frequency_stride=10,
                       time_stride=10)
    return save(ASTModel(config), ASTFeatureExtractor(num_mel_bins=26, max_length=100))
