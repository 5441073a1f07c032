"""Every registered component, built small: encoders run forward and backward, datasets are
deterministic, tasks train and evaluate. Parametrized over the registry, so a new component
is covered the moment it registers."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from mmkit import build
from mmkit.data.loader import Preprocessed, to_device
from mmkit.engine.loop import total_loss
from mmkit.fusion.base import Modality
from mmkit.encoders.base import Encoded
from mmkit.errors import MMKitError
from mmkit.plugins import get_registry
from mmkit.samples import DatasetInfo, Waveform
from mmkit.tasks.clip_retrieval import same_pair

from tiny_hf import tiny_bert_dir, tiny_wav2vec2_dir
from tiny_vision import tiny_open_clip

# Small settings for builtins; components without an entry are built with their defaults. A
# callable entry returns the settings (e.g. the path of a tiny model it saved), made on first use.
TINY: dict[tuple[str, str], dict | Callable[[], dict]] = {
    ("image_encoders", "timm"): {"model_name": "test_vit", "image_size": 32},
    ("text_encoders", "transformer"): {"width": 32, "layers": 1, "heads": 2, "context_length": 16},
    ("audio_encoders", "logmel_cnn"): {"channels": 4, "blocks": 2, "dim": 16, "n_mels": 32},
    ("text_encoders", "hf"): lambda: {"model": str(tiny_bert_dir()), "max_length": 16},
    ("audio_encoders", "hf_audio"): lambda: {"model": str(tiny_wav2vec2_dir())},
    ("image_encoders", "torchvision"): {"model_name": "resnet18", "image_size": 64},
    ("image_encoders", "open_clip"): tiny_open_clip,
    ("text_encoders", "open_clip"): tiny_open_clip,
}
MODALITY = {"image_encoders": "image", "text_encoders": "text", "audio_encoders": "audio"}


def components(kind: str) -> list:
    return [pytest.param(c.name, id=c.name) for c in get_registry().components(kind)]


def generated_datasets() -> list:
    """The datasets mmkit generates (a size and a split, no files); file datasets have their own tests."""
    return [pytest.param(c.name, id=c.name) for c in get_registry().components("datasets")
            if {"num_samples", "split"} <= set(c.params)]


def raw_samples(modality: str) -> list:
    if modality == "image":
        dataset = build("datasets", "synthetic_shapes", num_samples=2, image_size=40)
    elif modality == "audio":
        dataset = build("datasets", "synthetic_audio", num_samples=2)
    else:
        return ["a large red circle in the top left", "a quiet low tone"]
    return [dataset[i][modality] for i in range(2)]


def tiny_encoder(kind: str, name: str):
    settings = TINY.get((kind, name), {})
    return build(kind, name, **(settings() if callable(settings) else settings))


@pytest.mark.parametrize("kind", list(MODALITY))
def test_every_encoder_runs_forward_and_backward(kind):
    for name in [c.name for c in get_registry().components(kind)]:
        encoder = tiny_encoder(kind, name)
        out = encoder(encoder.inputs(raw_samples(MODALITY[kind])))
        assert isinstance(out, Encoded)
        b, t, d = out.tokens.shape
        assert b == 2 and t >= 1 and out.pooled.shape == (2, encoder.dim) and out.mask.shape == (2, t)
        assert d == encoder.token_dim, name
        assert out.mask.dtype == torch.bool and out.mask.any(dim=1).all()
        if kind == "text_encoders":
            assert out.grid is None and out.prefix == 0
        else:  # image and audio tokens lie on a grid after their prefix tokens
            assert out.grid is not None and out.prefix + out.grid[0] * out.grid[1] == t, name
        out.pooled.square().sum().backward()
        grads = [p.grad for p in encoder.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), f"{name}: a parameter got no gradient"
        assert all(torch.isfinite(g).all() for g in grads)


def test_trim_padding_cuts_after_the_last_position_any_text_uses():
    from mmkit.encoders.text import TrimPadding

    pad = 9
    trim = TrimPadding(pad)
    texts = [torch.tensor([1, 2, 3, pad, pad, pad]), torch.tensor([4, 5, pad, pad, pad, pad])]
    assert trim(texts).tolist() == [[1, 2, 3], [4, 5, pad]]
    full = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, pad, pad, pad])]
    assert trim(full).tolist() == [[1, 2, 3, 4], [5, pad, pad, pad]]
    tokenized = [{"input_ids": torch.tensor([7, 0, 0]), "attention_mask": torch.tensor([1, 0, 0]),
                  "token_type_ids": torch.tensor([0, 0, 0])},
                 {"input_ids": torch.tensor([7, 8, 0]), "attention_mask": torch.tensor([1, 1, 0]),
                  "token_type_ids": torch.tensor([0, 1, 0])}]
    batch = trim(tokenized)  # a tokenizer's mask says what is real, whatever its pad id
    assert batch["input_ids"].tolist() == [[7, 0], [7, 8]] and batch["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0], [0, 1]]


@pytest.mark.parametrize("name", components("text_encoders"))
def test_text_batches_are_cut_to_their_longest_text_and_encode_the_same(name):
    encoder = tiny_encoder("text_encoders", name).eval()
    values = [encoder.preprocess(text) for text in ("a red circle", "a large red circle in the top left")]
    full, cut = default_collate(values), encoder.collate(values)
    full_ids, cut_ids = (b["input_ids"] if isinstance(b, dict) else b for b in (full, cut))
    longest = max(len(encoder(v.unsqueeze(0) if not isinstance(v, dict) else default_collate([v])).mask[0].nonzero())
                  for v in values)
    assert cut_ids.shape == (2, longest) < full_ids.shape and torch.equal(cut_ids, full_ids[:, :longest])
    with torch.no_grad():
        whole, short = encoder(full), encoder(cut)
    assert torch.equal(short.mask, whole.mask[:, :longest]) and not whole.mask[:, longest:].any()
    torch.testing.assert_close(short.pooled, whole.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short.tokens, whole.tokens[:, :longest], atol=1e-5, rtol=1e-5)


def test_timm_encoder_takes_cnns_too():
    encoder = build("image_encoders", "timm", model_name="test_resnet", image_size=64)
    images = encoder.inputs(raw_samples("image"))
    out = encoder(images)
    feature_map = encoder.model.forward_features(images)  # [B, C, H', W']
    assert out.pooled.shape == (2, encoder.dim) and out.prefix == 0 and out.grid == tuple(feature_map.shape[-2:])
    assert torch.equal(out.tokens[:, 1], feature_map[:, :, 0, 1])  # row by row: token 1 is row 0, column 1


@pytest.mark.parametrize("name", ["timm", "torchvision"])
def test_image_preprocess_then_on_device_give_what_to_tensor_and_normalize_give(name):
    """uint8 pixels from the workers, normalised on the device: no number changes, so results
    and resumed runs stay as they were."""
    from torchvision import transforms

    from mmkit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, to_rgb

    encoder = build("image_encoders", name, model_name="resnet18", image_size=32)
    per_image = transforms.Compose([transforms.Lambda(to_rgb), transforms.Resize(32), transforms.CenterCrop(32),
                                    transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    pictures = raw_samples("image") + [raw_samples("image")[0].convert("L")]
    pixels = [encoder.preprocess(picture) for picture in pictures]
    assert all(p.dtype == torch.uint8 and p.shape == (3, 32, 32) and p.is_contiguous() for p in pixels)
    assert torch.equal(encoder.on_device(torch.stack(pixels)), torch.stack([per_image(p) for p in pictures]))
    with pytest.raises(TypeError, match="takes the uint8 pixels an image encoder's preprocess gives, got torch.float32"):
        encoder.on_device(torch.stack(pixels).float())


def test_a_timm_cnn_whose_head_widens_the_pooled_features():
    encoder = build("image_encoders", "timm", model_name="mobilenetv3_small_050", image_size=64)
    out = encoder(torch.randn(2, 3, 64, 64))
    assert (encoder.dim, encoder.token_dim) == (1024, 288)  # conv_head widens 288 channels to 1024
    assert out.pooled.shape == (2, 1024) and out.tokens.shape == (2, 4, 288) and out.grid == (2, 2)


def test_vit_tokens_are_a_prefix_then_the_patch_grid():
    encoder = build("image_encoders", "timm", model_name="vit_tiny_patch16_224", image_size=64,
                    model_args={"depth": 1, "reg_tokens": 2})
    out = encoder(torch.randn(2, 3, 64, 64))
    assert (out.prefix, out.grid, out.tokens.shape[1]) == (3, (4, 4), 19)  # cls + 2 registers, 64 / 16 = 4
    with pytest.raises(ValueError, match="3 prefix tokens and a 4x5 grid do not make the 19 tokens"):
        Encoded(out.tokens, out.pooled, out.mask, grid=(4, 5), prefix=3)


@pytest.mark.parametrize("name", ["transformer", "open_clip"])
def test_open_clips_token_zero_is_text_not_padding(name):
    encoder = tiny_encoder("text_encoders", name)
    ids = encoder.preprocess('wow !"!!')  # byte-pair id 0 is "!" inside a word, a real token
    assert 0 in ids.tolist() and encoder.pad_id != 0
    out = encoder(ids.unsqueeze(0))
    assert out.mask[0].tolist() == [i <= ids.tolist().index(49407) for i in range(len(ids))]


@pytest.mark.parametrize("name", components("text_encoders"))
def test_text_encoders_have_a_real_mask_token(name):
    encoder = tiny_encoder("text_encoders", name)
    pad, mask, vocab = encoder.pad_id, encoder.mask_id, encoder.vocab_size
    assert len({pad, mask}) == 2 and 0 <= pad < vocab and 0 <= mask < vocab
    ids = encoder.preprocess("a quiet low tone at the start")
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    assert mask not in ids.tolist() and pad in ids.tolist()  # text never tokenizes to the mask token
    masked = ids.clone()
    masked[1] = mask  # a masked position embeds like any token
    out = encoder(masked.unsqueeze(0))
    assert out.mask[0, 1] and torch.isfinite(out.tokens).all()


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


@pytest.mark.parametrize("name", generated_datasets())
def test_every_generated_dataset_declares_what_it_gives(name):
    dataset = build("datasets", name, num_samples=5)
    info = dataset.info
    assert all(set(dataset[i]) == set(info.keys) for i in range(5))
    if info.label_kind == "single":
        assert info.num_classes > max(dataset[i]["label"] for i in range(5))
        assert len(set(info.class_names)) == info.num_classes


def test_labelled_data_must_name_its_classes():
    with pytest.raises(ValueError, match="a dataset with single labels gives a 'label' key and names its classes"):
        DatasetInfo(keys=("image", "label"), label_kind="single")
    assert DatasetInfo(keys=("image", "label"), class_names=("cat", "dog"), label_kind="multi").num_classes == 2


@pytest.mark.parametrize("name", generated_datasets())
def test_every_generated_dataset_is_deterministic_and_split(name):
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


@pytest.mark.parametrize("label_by", ["colour", "shape", "size", "position"])
def test_shapes_labelled_by_one_property_name_the_captions_value(label_by):
    everything = build("datasets", "synthetic_shapes", num_samples=12, image_size=32)
    dataset = build("datasets", "synthetic_shapes", num_samples=12, image_size=32, label_by=label_by)
    names = dataset.info.class_names
    for i in range(12):
        sample, same = dataset[i], everything[i]
        assert sample["text"] == same["text"] and sample["image"].tobytes() == same["image"].tobytes()
        caption = same["text"].removeprefix("a ")
        assert (f"in the {names[sample['label']]}" in caption if label_by == "position"
                else names[sample["label"]] in caption.split(" in the ")[0].split())
    assert len(names) == {"colour": 6, "shape": 4, "size": 2, "position": 5}[label_by]


@pytest.mark.parametrize("omit, caption", [
    ([], "a small orange circle in the centre"),
    (["colour"], "a small circle in the centre"),
    (["shape", "position"], "a small orange shape"),
    (["size", "colour", "shape", "position"], "a shape"),
])
def test_captions_leave_out_the_omitted_properties_and_nothing_else(omit, caption):
    full = build("datasets", "synthetic_shapes", num_samples=1, label_by="colour")[0]
    sample = build("datasets", "synthetic_shapes", num_samples=1, label_by="colour", omit=omit)[0]
    assert full["text"] == "a small orange circle in the centre"
    assert sample["text"] == caption and sample["label"] == full["label"]
    assert sample["image"].tobytes() == full["image"].tobytes()


TASK_SETTINGS = {"classification": {"modality": "image"}, "linear_probe": {"modality": "image"}}  # classify one of the two


@pytest.mark.parametrize("name", components("tasks"))
def test_every_task_trains_and_evaluates(name):
    encoders = {"image": tiny_encoder("image_encoders", "timm"),
                "text": tiny_encoder("text_encoders", "transformer")}
    shapes = build("datasets", "synthetic_shapes", num_samples=8, image_size=32, label_by="colour")
    widths = {m: Modality.of(e) for m, e in encoders.items()}
    fusion = build("fusion_heads", "mlm_ae", modalities=widths, dim=32, heads=2) if name == "pretrain" else None
    task = build("tasks", name, encoders=encoders, data=shapes.info, fusion=fusion, **TASK_SETTINGS.get(name, {}))
    dataset = Preprocessed(shapes, {m: e.preprocess for m, e in encoders.items()})
    on_device = {m: e.on_device for m, e in encoders.items() if e.on_device}

    def batch_of(count: int) -> dict:  # as the engine makes it
        return to_device(default_collate([dataset[i] for i in range(count)]), torch.device("cpu"), on_device)

    batch = task.prepare(batch_of(8))
    if task.fits:  # learns from its outputs over the training set, not by gradient
        task.eval()
        assert task.fit(task.predict([batch]))
    else:
        loss = total_loss(task.training_step(batch), {})
        assert torch.isfinite(loss)
        loss.backward()
        task.eval()
    metrics = task.evaluate(task.predict([batch, batch_of(4)]))
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
    relevant = same_pair(task.predict([default_collate(samples)]))
    assert relevant.tolist() == [[True, False, False, False], [False, True, False, False],
                                 [False, False, True, True], [False, False, True, True]]


def test_batches_move_to_the_device_with_nested_dicts():
    batch = {"text": {"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)},
             "image": torch.zeros(2, 1), "raw_text": ["a", "b"]}
    moved = to_device(batch, torch.device("meta"))
    assert moved["text"]["input_ids"].is_meta and moved["text"]["attention_mask"].is_meta and moved["image"].is_meta
    assert moved["raw_text"] == ["a", "b"]


def test_each_encoders_on_device_step_finishes_its_own_modality_after_the_move():
    batch = {"image": torch.tensor([[[[0, 255]]]], dtype=torch.uint8), "text": torch.tensor([[3, 4]]), "id": ["a"]}
    steps = {"image": lambda pixels: (pixels.device.type, pixels.float() / 255), "audio": lambda _: pytest.fail()}
    moved = to_device(batch, torch.device("meta"), steps)
    (where, scaled), text = moved["image"], moved["text"]
    assert where == "meta" and scaled.dtype == torch.float32 and text.is_meta and moved["id"] == ["a"]


def test_an_encoders_own_collate_batches_its_values():
    from mmkit.data.loader import Collate

    def pad_to_longest(values):  # what a tokenizer with dynamic padding brings
        longest = max(len(v) for v in values)
        return torch.stack([torch.nn.functional.pad(v, (0, longest - len(v))) for v in values])

    samples = [{"text": torch.tensor([5, 6]), "label": 1}, {"text": torch.tensor([7, 8, 9]), "label": 0}]
    batch = Collate({"text": pad_to_longest})(samples)
    assert batch["text"].tolist() == [[5, 6, 0], [7, 8, 9]] and batch["label"].tolist() == [1, 0]
    nested = Collate()([{"text": {"input_ids": torch.tensor([1, 2])}}, {"text": {"input_ids": torch.tensor([3, 4])}}])
    assert nested["text"]["input_ids"].tolist() == [[1, 2], [3, 4]]


def registry_with(*extra):
    """The loaded registry plus components added here, without touching the shared one."""
    from mmkit.registry import Registry

    registry = Registry()
    for component in get_registry().components():
        registry.add(component.kind, component.name, component.factory, component.plugin)
    for kind, name, factory in extra:
        registry.add(kind, name, factory, "test")
    return registry


class DataAwareRetrieval(torch.nn.Module):
    """A task that takes what the dataset declares, as a classification task does."""

    def __init__(self, encoders: dict, data: DatasetInfo, width: int = 4):
        super().__init__()
        self.data = data
        self.head = torch.nn.Linear(width, data.num_classes)


def test_a_task_is_given_what_the_dataset_declares(tiny_recipe):
    from mmkit.components import build_parts
    from mmkit.recipe import load_recipe

    registry = registry_with(("tasks", "data_aware", DataAwareRetrieval))
    parts = build_parts(load_recipe(tiny_recipe, ["task={name='data_aware'}"]), registry)
    assert parts.task.data == parts.train_set.info and parts.task.head.out_features == 240
    assert parts.task.data.class_names[0] == "small red circle in the top left"


def test_a_fusion_head_the_task_does_not_take_is_refused(tiny_recipe):
    from mmkit.errors import RecipeError
    from mmkit.recipe import check_recipe, load_recipe

    def concat(modalities: dict, hidden: int = 8):
        """Pooled features concatenated."""

    registry = registry_with(("fusion_heads", "concat_test", concat))
    with pytest.raises(RecipeError) as caught:
        check_recipe(load_recipe(tiny_recipe, ["model.fusion.name=concat_test"]), registry)
    assert caught.value.problems == [f"{tiny_recipe} (command line): model.fusion: task 'clip_retrieval' takes no "
                                     "fusion head; remove [model.fusion] or pick a task that fuses modalities"]
