"""Every registered component, built small: encoders run forward and backward, datasets are
deterministic, tasks train and evaluate. Parametrized over the registry, so a new component
is covered the moment it registers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from mmkit import build
from mmkit.data.loader import Preprocessed
from mmkit.encoders.audio import Waveform
from mmkit.encoders.base import Encoded
from mmkit.errors import MMKitError
from mmkit.plugins import get_registry

# Small settings for builtins; components without an entry are built with their defaults.
TINY = {
    ("image_encoders", "timm"): {"model_name": "test_vit", "image_size": 32},
    ("text_encoders", "transformer"): {"width": 32, "layers": 1, "heads": 2, "context_length": 16},
    ("audio_encoders", "logmel_cnn"): {"channels": 4, "blocks": 2, "dim": 16, "n_mels": 32},
}
MODALITY = {"image_encoders": "image", "text_encoders": "text", "audio_encoders": "audio"}


def components(kind: str) -> list:
    return [pytest.param(c.name, id=c.name) for c in get_registry().components(kind)]


def raw_samples(modality: str) -> list:
    if modality == "image":
        dataset = build("datasets", "synthetic_shapes", num_samples=2, image_size=40)
    elif modality == "audio":
        dataset = build("datasets", "synthetic_audio", num_samples=2)
    else:
        return ["a large red circle in the top left", "a quiet low tone"]
    return [dataset[i][modality] for i in range(2)]


def tiny_encoder(kind: str, name: str):
    return build(kind, name, **TINY.get((kind, name), {}))


@pytest.mark.parametrize("kind", list(MODALITY))
def test_every_encoder_runs_forward_and_backward(kind):
    for name in [c.name for c in get_registry().components(kind)]:
        encoder = tiny_encoder(kind, name)
        batch = torch.stack([encoder.preprocess(v) for v in raw_samples(MODALITY[kind])])
        out = encoder(batch)
        assert isinstance(out, Encoded)
        b, t, d = out.tokens.shape
        assert b == 2 and t >= 1 and out.pooled.shape == (2, encoder.dim) and out.mask.shape == (2, t)
        assert out.mask.dtype == torch.bool and out.mask.any(dim=1).all()
        out.pooled.square().sum().backward()
        grads = [p.grad for p in encoder.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), f"{name}: a parameter got no gradient"
        assert all(torch.isfinite(g).all() for g in grads)


def test_timm_encoder_takes_cnns_too():
    encoder = build("image_encoders", "timm", model_name="test_resnet", image_size=48)
    out = encoder(torch.stack([encoder.preprocess(v) for v in raw_samples("image")]))
    assert out.pooled.shape == (2, encoder.dim) and out.tokens.shape[1] > 1


def test_timm_encoder_freeze_keeps_weights_and_norm_statistics():
    encoder = build("image_encoders", "timm", model_name="test_resnet", image_size=32, freeze=True)
    assert not any(p.requires_grad for p in encoder.parameters())
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.train()
    encoder(torch.randn(4, 3, 32, 32) * 3)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_timm_errors_are_one_line():
    with pytest.raises(MMKitError, match=r"unknown timm model 'vit_tinyy'"):
        build("image_encoders", "timm", model_name="vit_tinyy")
    with pytest.raises(MMKitError, match="pretrained weights file not found: nowhere.safetensors"):
        build("image_encoders", "timm", model_name="test_vit", pretrained="nowhere.safetensors")
    with pytest.raises(MMKitError, match=r"image encoder 'timm': image_size expects int, got '32'"):
        build("image_encoders", "timm", image_size="32")


def test_timm_loads_a_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    source = build("image_encoders", "timm", model_name="test_vit", image_size=32)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, path)
    loaded = build("image_encoders", "timm", model_name="test_vit", image_size=32, pretrained=str(path))
    assert all(torch.equal(a, b) for a, b in zip(source.model.state_dict().values(),
                                                  loaded.model.state_dict().values()))


def test_audio_frontend_resamples_and_fixes_the_length():
    encoder = tiny_encoder("audio_encoders", "logmel_cnn")
    at_16k = encoder.preprocess(Waveform(torch.randn(16000), 16000))
    at_8k_stereo = encoder.preprocess(Waveform(torch.randn(2, 4000), 8000))  # half a second
    assert at_16k.shape == at_8k_stereo.shape == (1, 32, 101)


@pytest.mark.parametrize("name", components("datasets"))
def test_every_dataset_is_deterministic_and_split(name):
    train = build("datasets", name, num_samples=6)
    again = build("datasets", name, num_samples=6)
    val = build("datasets", name, num_samples=6, split="val")
    assert len(train) == 6
    first, second = train[3], again[3]
    assert first.keys() == second.keys() and {"id", "text", "label"} <= set(first)
    assert _as_array(first) == _as_array(second)
    assert [_as_array(train[i]) for i in range(6)] != [_as_array(val[i]) for i in range(6)]
    with pytest.raises(IndexError):
        train[6]


def _as_array(sample: dict) -> bytes:
    for key in ("image", "audio"):
        if key in sample:
            value = sample[key]
            return np.asarray(value.samples if key == "audio" else value).tobytes()
    return sample["text"].encode()


def test_shapes_captions_name_what_is_drawn():
    sample = build("datasets", "synthetic_shapes", num_samples=1, image_size=64)[0]
    pixels = np.asarray(sample["image"]).reshape(-1, 3).astype(int)
    colour = sample["text"].split()[2]
    from mmkit.data.shapes import COLOURS

    distance = np.abs(pixels - np.array(COLOURS[colour])).sum(axis=1)
    assert (distance < 80).mean() > 0.02  # a visible patch of the captioned colour


@pytest.mark.parametrize("name", components("tasks"))
def test_every_task_trains_and_evaluates(name):
    encoders = {"image": tiny_encoder("image_encoders", "timm"),
                "text": tiny_encoder("text_encoders", "transformer")}
    task = build("tasks", name, encoders=encoders)
    dataset = Preprocessed(build("datasets", "synthetic_shapes", num_samples=8, image_size=32),
                           {m: e.preprocess for m, e in encoders.items()})
    batch = default_collate([dataset[i] for i in range(8)])
    losses = task.training_step(batch)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    task.eval()
    metrics = task.evaluate([batch, default_collate([dataset[i] for i in range(4)])])
    assert metrics and all(np.isfinite(v) for v in metrics.values())


def test_clip_retrieval_counts_captions_as_the_same_only_when_their_text_is():
    text = tiny_encoder("text_encoders", "transformer")  # context_length 16: long reports truncate
    task = build("tasks", "clip_retrieval", encoders={"image": tiny_encoder("image_encoders", "timm"),
                                                      "text": text})
    opening = "frontal chest radiograph shows clear lungs with no focal consolidation and a heart of normal size"
    captions = [f"{opening}; impression: normal", f"{opening}; impression: small left effusion",
                "a red circle", "a red circle"]
    assert torch.equal(text.preprocess(captions[0]), text.preprocess(captions[1]))  # same tokens
    samples = [{"image": torch.rand(3, 32, 32), "text": text.preprocess(c), "raw_text": c} for c in captions]
    task.eval()
    _, relevant = task.embed_all([default_collate(samples)])
    assert relevant.tolist() == [[True, False, False, False], [False, True, False, False],
                                 [False, False, True, True], [False, False, True, True]]
