"""The transformers-backed encoders, `hf` (text) and `hf_audio`, on tiny models saved to disk:
what they give is what the transformers model itself gives, and they load offline by path."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from mmkit import build
from mmkit.errors import MMKitError
from mmkit.samples import Waveform

from conftest import run_mmkit
from test_cli import unreachable_hub
from tiny_hf import tiny_ast_dir, tiny_bert_dir, tiny_gpt2_dir, tiny_hubert_dir, tiny_wav2vec2_dir, tiny_whisper_dir

CAPTIONS = ["a large red circle in the top left", "a quiet low tone"]


def text_encoder(folder, **settings):
    return build("text_encoders", "hf", model=str(folder), **{"max_length": 16, **settings})


def audio_encoder(folder, **settings):
    return build("audio_encoders", "hf_audio", model=str(folder), **settings)


def tone(seconds: float, rate: int, hz: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return 0.5 * torch.sin(2 * math.pi * hz * t)


def test_text_is_tokenized_by_the_models_tokenizer_padded_and_masked():
    from transformers import AutoTokenizer

    encoder = text_encoder(tiny_bert_dir())
    own = AutoTokenizer.from_pretrained(tiny_bert_dir())(CAPTIONS[0])["input_ids"]  # [CLS] ... [SEP]
    tokenized = encoder.preprocess(CAPTIONS[0])
    ids, attention = tokenized["input_ids"], tokenized["attention_mask"]
    assert ids.dtype == attention.dtype == torch.long
    assert ids.tolist() == own + [encoder.pad_id] * (16 - len(own))
    assert attention.tolist() == [1] * len(own) + [0] * (16 - len(own))
    assert encoder.preprocess("red " * 40)["input_ids"].shape == (16,)  # truncated
    out = encoder(default_collate([encoder.preprocess(c) for c in CAPTIONS]))
    assert out.mask[0].tolist() == attention.bool().tolist() and out.grid is None and out.prefix == 0


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_text_pooling_is_computed_from_the_transformers_models_outputs(pooling):
    from transformers import AutoModel

    encoder = text_encoder(tiny_bert_dir(), pooling=pooling).eval()
    batch = default_collate([encoder.preprocess(c) for c in CAPTIONS])
    out = encoder(batch)
    reference = AutoModel.from_pretrained(tiny_bert_dir()).eval()(**batch)
    hidden, real = reference.last_hidden_state, batch["attention_mask"].unsqueeze(-1)
    expected = {"cls": hidden[:, 0], "mean": (hidden * real).sum(1) / real.sum(1),
                "pooler": reference.pooler_output}[pooling]
    assert out.tokens.shape == (2, 16, encoder.dim) and encoder.dim == 32
    assert torch.allclose(out.tokens, hidden, atol=1e-6) and torch.allclose(out.pooled, expected, atol=1e-6)


def test_more_padding_leaves_the_mean_unchanged():
    short, long = (text_encoder(tiny_bert_dir(), max_length=n).eval() for n in (16, 40))
    pooled = [e(default_collate([e.preprocess(c) for c in CAPTIONS])).pooled for e in (short, long)]
    assert torch.allclose(pooled[0], pooled[1], atol=1e-6)


def test_pretrained_loads_the_saved_weights_and_false_initialises_at_random():
    saved = load_file(tiny_bert_dir() / "model.safetensors")
    loaded = text_encoder(tiny_bert_dir(), pooling="pooler").model.state_dict()
    fresh = text_encoder(tiny_bert_dir(), pooling="pooler", pretrained=False).model.state_dict()
    assert loaded.keys() == fresh.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert all(fresh[k].shape == saved[k].shape for k in saved)
    matrices = [k for k in saved if saved[k].ndim == 2]
    assert matrices and not any(torch.equal(fresh[k], saved[k]) for k in matrices)


def test_a_built_encoder_trains_and_every_parameter_gets_a_gradient():
    encoder = text_encoder(tiny_bert_dir(), pooling="mean")
    assert all(m.training for m in encoder.modules())  # transformers loads models in eval mode
    assert encoder.model.pooler is None  # unused: DDP refuses parameters without a gradient
    encoder(default_collate([encoder.preprocess(c) for c in CAPTIONS])).pooled.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_preprocessing_pickles_for_dataloader_workers():
    text = text_encoder(tiny_bert_dir())
    audio = audio_encoder(tiny_whisper_dir())
    clip = Waveform(tone(1.0, 8000), 8000)
    for preprocess, value in ((text.preprocess, CAPTIONS[0]), (audio.preprocess, clip)):
        copy = pickle.loads(pickle.dumps(preprocess))
        assert all(torch.equal(a, b) for a, b in zip(copy(value).values(), preprocess(value).values()))


def test_bin_weights_load_without_unpickling_code(tmp_path):
    saved = load_file(tiny_bert_dir() / "model.safetensors")
    folder = tmp_path / "bin"
    shutil.copytree(tiny_bert_dir(), folder)
    (folder / "model.safetensors").unlink()
    torch.save(saved, folder / "pytorch_model.bin")
    loaded = text_encoder(folder, pooling="pooler").model.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    ran = tmp_path / "ran"
    torch.save({**saved, "payload": RunsCode(str(ran))}, folder / "pytorch_model.bin")
    with pytest.raises(MMKitError, match=r"^hf text encoder '.*': the weights in .* need pickled Python objects"):
        text_encoder(folder)
    assert not ran.exists()


def test_weights_that_leave_layers_at_random_are_refused(tmp_path):
    def without(tiny, prefix):  # a copy of a tiny model folder whose weights lack those under prefix
        folder = tmp_path / prefix.rstrip(".")
        shutil.copytree(tiny, folder)
        saved = load_file(tiny / "model.safetensors")
        save_file({k: v for k, v in saved.items() if not k.startswith(prefix)}, folder / "model.safetensors")
        return folder, saved

    folder, saved = without(tiny_bert_dir(), "encoder.")
    with pytest.raises(MMKitError, match=r"^hf text encoder '.*': the weights in .* do not fit the model, they lack "
                                         r"encoder\.layer\.0\.attention\.output\.LayerNorm\.bias, .* and 13 more; "
                                         r"save the whole model with save_pretrained, or set pretrained = false$"):
        text_encoder(folder)
    folder, saved = without(tiny_bert_dir(), "pooler.")
    with pytest.raises(MMKitError, match=r"they lack pooler\.dense\.bias, pooler\.dense\.weight; "):
        text_encoder(folder, pooling="pooler")
    loaded = text_encoder(folder).model.state_dict()  # mean pooling drops the pooler: it need not be saved
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)
    folder, saved = without(tiny_whisper_dir(), "decoder.")  # only Whisper's encoder is used
    assert audio_encoder(folder).dim == 16


class RunsCode:
    """Unpickling this object creates a file: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("layout", ["", "0_Transformer"], ids=["root", "subfolder"])
def test_a_sentence_transformers_folder_loads_by_path(tmp_path, layout):
    folder = tmp_path / "minilm"
    shutil.copytree(tiny_bert_dir(), folder / layout)  # as sentence-transformers saves it (older: 0_Transformer/)
    modules = [{"idx": 0, "name": "0", "path": layout, "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": False}))
    sentence, plain = text_encoder(folder).eval(), text_encoder(tiny_bert_dir()).eval()
    batch = default_collate([plain.preprocess(c) for c in CAPTIONS])
    assert torch.equal(sentence(batch).pooled, plain(batch).pooled)


def test_a_tokenizer_without_mask_and_pad_tokens_gets_them():
    from transformers import AutoTokenizer

    bytes_only = AutoTokenizer.from_pretrained(tiny_gpt2_dir())
    assert bytes_only.mask_token is None and bytes_only.pad_token is None
    encoder = text_encoder(tiny_gpt2_dir(), max_length=40)
    embeddings = encoder.model.get_input_embeddings().weight
    assert encoder.pad_id == bytes_only.eos_token_id  # padding with end-of-text, as GPT-2 users do
    assert encoder.mask_id == len(bytes_only) and encoder.vocab_size == len(bytes_only) + 1 == embeddings.shape[0]
    saved = load_file(tiny_gpt2_dir() / "model.safetensors")["wte.weight"]
    assert torch.equal(embeddings[: len(bytes_only)], saved)  # the old rows are kept
    ids = encoder.preprocess("a [MASK] in the top left")["input_ids"]
    assert encoder.mask_id not in ids.tolist() and encoder.pad_id in ids.tolist()
    masked = ids.clone()
    masked[2] = encoder.mask_id
    out = encoder.eval()(masked.unsqueeze(0))
    assert torch.isfinite(out.tokens).all() and not torch.equal(out.tokens, encoder(ids.unsqueeze(0)).tokens)


def test_text_errors_are_one_line(tmp_path):
    with pytest.raises(MMKitError, match=r"^hf text encoder '.*': the model has no pooler layer; use pooling"):
        text_encoder(tiny_gpt2_dir(), pooling="pooler")
    with pytest.raises(MMKitError, match=r"^hf text encoder '\./nowhere/bert': no such folder: \./nowhere/bert$"):
        text_encoder("./nowhere/bert")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMKitError, match=r"^hf text encoder '.*': cannot load AutoConfig from .*empty"):
        text_encoder(tmp_path / "empty", pretrained=False)
    with pytest.raises(MMKitError, match="max_length must be at least 2"):
        text_encoder(tiny_bert_dir(), max_length=1)


@pytest.mark.parametrize("tiny", [tiny_wav2vec2_dir, tiny_hubert_dir], ids=["wav2vec2", "hubert"])
def test_frame_models_take_any_rate_mono_or_stereo(tiny):
    from transformers import AutoFeatureExtractor, AutoModel
    import torchaudio

    encoder = audio_encoder(tiny()).eval()
    extractor = AutoFeatureExtractor.from_pretrained(tiny())
    at_8k = encoder.preprocess(Waveform(tone(1.0, 8000), 8000))["input_values"]
    at_16k = encoder.preprocess(Waveform(tone(1.0, 16000), 16000))["input_values"]
    resampled = torchaudio.functional.resample(tone(1.0, 8000), 8000, 16000).numpy()
    expected = extractor(resampled, sampling_rate=16000, return_tensors="pt")["input_values"][0]
    assert at_8k.shape == at_16k.shape == (16000,) and torch.allclose(at_8k, expected, atol=1e-5)

    left, right = tone(1.0, 16000, 300.0), tone(1.0, 16000, 900.0)
    stereo = encoder.preprocess(Waveform(torch.stack([left, right]), 16000))["input_values"]
    assert torch.allclose(stereo, encoder.preprocess(Waveform((left + right) / 2, 16000))["input_values"], atol=1e-6)
    for seconds in (0.5, 2.0):  # padded or cut to clip_seconds
        assert encoder.preprocess(Waveform(tone(seconds, 16000), 16000))["input_values"].shape == (16000,)

    batch = default_collate([encoder.preprocess(Waveform(tone(1.0, 16000, hz), 16000)) for hz in (300, 900)])
    out = encoder(batch)
    hidden = AutoModel.from_pretrained(tiny()).eval()(batch["input_values"]).last_hidden_state
    frames = hidden.shape[1]
    assert (out.prefix, out.grid) == (0, (1, frames)) and out.mask.all() and out.tokens.shape == (2, frames, 16)
    assert torch.allclose(out.tokens, hidden, atol=1e-6) and torch.allclose(out.pooled, hidden.mean(1), atol=1e-6)


def test_whisper_keeps_its_encoder_and_masks_the_window_past_the_clip():
    from transformers import AutoModel

    encoder = audio_encoder(tiny_whisper_dir(), clip_seconds=0.5).eval()  # half of the tiny model's 1 s window
    assert not any(name.startswith("decoder") for name, _ in encoder.named_parameters())
    features = encoder.preprocess(Waveform(tone(0.5, 8000), 8000))
    assert features["input_features"].shape == (16, 100)  # 16 mel bands, the whole window of frames
    batch = default_collate([features, features])
    out = encoder(batch)
    hidden = AutoModel.from_pretrained(tiny_whisper_dir()).eval().encoder(batch["input_features"]).last_hidden_state
    assert torch.allclose(out.tokens, hidden, atol=1e-6)
    assert (out.prefix, out.grid) == (0, (1, 50)) and out.mask[0].tolist() == [True] * 25 + [False] * 25
    assert torch.allclose(out.pooled, hidden[:, :25].mean(1), atol=1e-6)


def test_ast_tokens_are_two_prefix_tokens_then_frequency_by_time_patches():
    encoder = audio_encoder(tiny_ast_dir(), pooling="cls").eval()
    batch = default_collate([encoder.preprocess(Waveform(tone(1.0, 22050), 22050))])
    assert batch["input_values"].shape == (1, 100, 26)  # frames x mel bands
    out = encoder(batch)
    spectrogram = batch["input_values"].unsqueeze(1).transpose(2, 3)  # as AST's patch embedding reads it
    patches = encoder.model.embeddings.patch_embeddings.projection(spectrogram)  # [1, D, frequency, time]
    assert (out.prefix, out.grid, out.tokens.shape[1]) == (2, tuple(patches.shape[-2:]), 20) and out.grid == (2, 9)
    assert torch.equal(out.pooled, out.tokens[:, 0]) and out.mask.all()
    with pytest.raises(MMKitError, match=r"pooling 'cls' needs a class token, which wav2vec2 has not"):
        audio_encoder(tiny_wav2vec2_dir(), pooling="cls")


def test_ast_masks_the_time_patches_past_the_clip():
    encoder = audio_encoder(tiny_ast_dir(), clip_seconds=0.3).eval()  # 28 of the tiny model's 100 frames
    features = encoder.preprocess(Waveform(tone(0.3, 16000), 16000))
    assert features["attention_mask"].tolist() == [1] * 28 + [0] * 72
    out = encoder(default_collate([features]))
    # Time patches start every 10 frames: the first three start inside the clip, in both frequency rows.
    columns = [True] * 3 + [False] * 6
    assert out.grid == (2, 9) and out.mask[0].tolist() == [True, True] + columns + columns
    assert torch.allclose(out.pooled, out.tokens[out.mask].mean(0, keepdim=True), atol=1e-6)


def test_a_hub_id_without_network_fails_in_one_line(tiny_recipe, tmp_path):
    out = run_mmkit("run", tiny_recipe, "model.text={name='hf', model='mmkit-tests/tiny-bert'}",
                    env=unreachable_hub(tmp_path), timeout=30)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mmkit: error: {tiny_recipe}")
    assert lines[0].endswith(
        "model.text: hf text encoder 'mmkit-tests/tiny-bert': mmkit-tests/tiny-bert: not in the cache, and the "
        "hub cannot be reached; offline, download it once with network access (it is cached) or set model to a "
        "local folder (one saved with save_pretrained)")


def test_an_audio_hub_id_offline_names_the_encoder():
    with pytest.raises(MMKitError, match=r"^hf audio encoder 'mmkit-tests/tiny-hubert': mmkit-tests/tiny-hubert: "
                                         r"not in the cache.*set model to a local folder"):
        audio_encoder("mmkit-tests/tiny-hubert")
