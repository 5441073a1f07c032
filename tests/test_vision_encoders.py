"""The torchvision and open_clip encoders: weights load exactly (and never unpickle code), tokens
are what the models compute, pooled features equal open_clip's own embeddings, and missing
downloads fail in one line that says what to do."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save_file
from torchvision.models import ResNet18_Weights

from conftest import run_mmkit
from mmkit import build
from mmkit.errors import MMKitError
from test_cli import unreachable_hub
from tiny_vision import tiny_open_clip_models

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's file name for ResNet18_Weights.IMAGENET1K_V1


def torchvision_resnet18() -> dict[str, torch.Tensor]:
    """A whole torchvision resnet18 state dict (classifier included), with random weights."""
    from torchvision.models import resnet18

    return resnet18().state_dict()


def same_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())


# torchvision


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_torchvision_loads_a_weights_file_by_path(tmp_path, suffix):
    weights = torchvision_resnet18()
    path = tmp_path / f"resnet18{suffix}"
    save_file(weights, path) if suffix == ".safetensors" else torch.save(weights, path)
    encoder = build("image_encoders", "torchvision", model_name="resnet18", weights=str(path), image_size=64)
    assert same_weights(encoder.model, weights) and "fc.weight" not in encoder.model.state_dict()


def test_torchvision_googlenet_from_a_file_takes_inputs_as_with_published_weights(tmp_path):
    from torchvision.models import googlenet

    # torchvision's googlenet(weights=...) takes its inputs with transform_input
    reference = googlenet(transform_input=True, aux_logits=False, init_weights=False).eval()
    save_file(reference.state_dict(), tmp_path / "googlenet.safetensors")
    encoder = build("image_encoders", "torchvision", model_name="googlenet",
                    weights=str(tmp_path / "googlenet.safetensors"), image_size=64).eval()
    reference.fc = torch.nn.Identity()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(encoder(images).pooled, reference(images), atol=1e-5)


def test_torchvision_refuses_weights_that_do_not_fit_by_name(tmp_path):
    weights = torchvision_resnet18()
    del weights["layer4.1.bn2.weight"]
    weights["layer1.0.conv1.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "w.safetensors")
    with pytest.raises(MMKitError) as caught:
        build("image_encoders", "torchvision", model_name="resnet18", weights=str(tmp_path / "w.safetensors"))
    assert str(caught.value) == ("torchvision model 'resnet18': the weights do not fit the model: missing: "
                                 "layer4.1.bn2.weight; other shape: layer1.0.conv1.weight (1,) (the model has "
                                 "(64, 64, 3, 3))")


def test_torchvision_tokens_are_the_last_feature_map_row_by_row():
    encoder = build("image_encoders", "torchvision", model_name="resnet18", image_size=64).eval()
    images = torch.randn(2, 3, 64, 96)
    m = encoder.model
    feature_map = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(images))))))))  # [2, 512, 2, 3]
    out = encoder(images)
    assert (out.grid, out.prefix, encoder.dim) == ((2, 3), 0, 512)
    assert torch.equal(out.tokens, feature_map.flatten(2).transpose(1, 2))
    assert torch.equal(out.tokens[:, 3], feature_map[:, :, 1, 0])  # token 3: row 1, column 0
    assert torch.allclose(out.pooled, feature_map.mean(dim=(2, 3)), atol=1e-6)  # the model's own average pool


def test_torchvision_vit_has_the_class_token_then_its_patches():
    encoder = build("image_encoders", "torchvision", model_name="vit_b_16", image_size=32).eval()
    out = encoder(torch.randn(2, 3, 32, 32))
    assert (out.prefix, out.grid, tuple(out.tokens.shape)) == (1, (2, 2), (2, 5, 768))
    assert torch.equal(out.pooled, out.tokens[:, 0])  # the model's pre-logits feature is its class token
    assert not any("heads" in k for k in encoder.state_dict())


def test_torchvision_weights_name_that_is_not_cached_fails_in_one_line_while_offline(tiny_recipe, tmp_path):
    # The download host is made unreachable inside the mmkit process; a download would fail the test.
    code = textwrap.dedent("""
        import sys, torch.hub, mmkit.encoders.torchvision_image as tv
        tv.reachable = lambda url, timeout: False
        torch.hub.download_url_to_file = None  # a download attempt fails the test
        from mmkit.cli import main
        sys.argv = ["mmkit"] + sys.argv[1:]
        main()
    """)
    override = "model.image={name='torchvision', model_name='resnet18', weights='IMAGENET1K_V1'}"
    out = subprocess.run([sys.executable, "-c", code, "run", str(tiny_recipe), override], capture_output=True,
                         text=True, env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")}, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_FILE
    assert line == (f"mmkit: error: {tiny_recipe}: model.image: torchvision model 'resnet18': weights "
                    f"'IMAGENET1K_V1' are not in torch.hub's cache ({cached}) and download.pytorch.org cannot "
                    "be reached; download them once with network access (they are cached), or set weights to a "
                    "local weights file")


def test_torchvision_weights_name_loads_from_torch_hubs_cache_without_network(tmp_path, monkeypatch):
    import mmkit.encoders.torchvision_image as tv

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(tv, "reachable", lambda url, timeout: pytest.fail("the network was consulted"))
    weights = torchvision_resnet18()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(weights, tmp_path / "hub" / "checkpoints" / RESNET18_FILE)
    encoder = build("image_encoders", "torchvision", model_name="resnet18", weights="DEFAULT")
    assert same_weights(encoder.model, weights)
    picture = Image.fromarray(torch.randint(0, 256, (200, 300), dtype=torch.uint8).numpy())  # grayscale
    own = ResNet18_Weights.DEFAULT.transforms()(picture.convert("RGB"))
    assert own.shape == (3, 224, 224) and torch.equal(encoder.inputs([picture])[0], own)  # the weights' own transforms


def test_torchvision_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    path = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(MMKitError, match="needs pickled Python objects to load, which mmkit refuses"):
        build("image_encoders", "torchvision", model_name="resnet18", weights=str(path))
    assert not marker.exists()


def test_torchvision_names_its_weights_when_one_is_unknown():
    with pytest.raises(MMKitError, match="torchvision model 'resnet18' has no weights 'IMAGENET'; its weights are "
                                         "IMAGENET1K_V1, DEFAULT, or set weights to a local weights file"):
        build("image_encoders", "torchvision", model_name="resnet18", weights="IMAGENET")


def test_torchvision_brings_old_densenet_names_up_to_date():
    from mmkit.encoders.torchvision_image import renamed

    old = {"features.denseblock1.denselayer1.norm.1.weight": torch.ones(1), "classifier.weight": torch.ones(1)}
    assert list(renamed(old, ("classifier.",))) == ["features.denseblock1.denselayer1.norm1.weight"]


# open_clip


@pytest.fixture(scope="module")
def tiny_models() -> tuple[str, ...]:
    return tiny_open_clip_models()


def saved_open_clip(name: str, folder: Path, layout: str = "whole") -> tuple[torch.nn.Module, Path]:
    """An open_clip model with random weights, and its checkpoint in one of the layouts people have."""
    import open_clip

    model = open_clip.create_model(name, force_custom_text=layout == "custom_text").eval()
    weights = {"whole": model.state_dict, "custom_text": model.state_dict,
               "visual": model.visual.state_dict}[layout]()
    path = folder / f"{name}-{layout}.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, path)
    return model, path


@pytest.mark.parametrize("layout", ["whole", "custom_text", "visual"])
def test_open_clip_image_tower_loads_by_path(tiny_models, tmp_path, layout):
    model, path = saved_open_clip("mmkit-tiny-vit", tmp_path, layout)
    encoder = build("image_encoders", "open_clip", model_name="mmkit-tiny-vit", pretrained=str(path))
    assert same_weights(encoder.visual, model.visual.state_dict())


@pytest.mark.parametrize("layout", ["whole", "custom_text"])
def test_open_clip_text_tower_loads_by_path_and_grows_a_mask_row(tiny_models, tmp_path, layout):
    model, path = saved_open_clip("mmkit-tiny-vit", tmp_path, layout)
    tower = model.text if layout == "custom_text" else model
    encoder = build("text_encoders", "open_clip", model_name="mmkit-tiny-vit", pretrained=str(path))
    embedding = encoder.text.token_embedding.weight
    assert embedding.shape[0] == tower.token_embedding.weight.shape[0] + 2 == encoder.vocab_size == 49410
    assert torch.equal(embedding[:-2], tower.token_embedding.weight)
    assert (encoder.mask_id, encoder.pad_id) == (49408, 49409)
    reference = tower.state_dict() if layout == "custom_text" else \
        {k: v for k, v in model.state_dict().items() if not k.startswith(("visual.", "logit_"))}
    own = encoder.text.state_dict()
    assert own.keys() == reference.keys()
    assert all(torch.equal(own[k], v) for k, v in reference.items() if k != "token_embedding.weight")


TEXTS = ["a large red circle in the top left", "frontal chest radiograph, no effusion!", "a"]


def test_open_clip_text_pooled_is_encode_text(tiny_models, tmp_path):
    model, path = saved_open_clip("mmkit-tiny-vit", tmp_path)
    encoder = build("text_encoders", "open_clip", model_name="mmkit-tiny-vit", pretrained=str(path)).eval()
    ids = torch.stack([encoder.preprocess(t) for t in TEXTS])
    out = encoder(ids)
    with torch.no_grad():  # open_clip pads with 0; causal attention makes padding irrelevant
        assert torch.allclose(out.pooled, model.encode_text(ids.where(ids != encoder.pad_id, 0)), atol=1e-5)
    end = (ids == 49407).int().argmax(dim=1)  # the end-of-text token; the tokens share the pooled width
    assert torch.allclose(out.tokens[torch.arange(3), end], out.pooled, atol=1e-6)
    assert out.tokens.shape == (3, 16, encoder.dim)
    assert out.mask.tolist() == (torch.arange(16) <= end.unsqueeze(1)).tolist() and out.grid is None


def test_open_clip_text_pools_at_the_end_of_text_when_tokens_are_masked(tiny_models):
    encoder = build("text_encoders", "open_clip", model_name="mmkit-tiny-vit").eval()
    ids = encoder.preprocess(TEXTS[0])
    assert encoder.mask_id not in ids.tolist() and encoder.mask_id > max(encoder.preprocess.tokenizer.encoder.values())
    end = int((ids == 49407).int().argmax())
    masked = ids.clone()
    masked[2] = encoder.mask_id  # the highest id now, yet pooling stays at the end-of-text token
    out = encoder(masked.unsqueeze(0))
    assert torch.allclose(out.pooled[0], out.tokens[0, end], atol=1e-6)
    assert not torch.allclose(out.pooled[0], out.tokens[0, 2], atol=1e-3)


def test_open_clip_shorter_context_keeps_the_first_positions(tiny_models, tmp_path):
    model, path = saved_open_clip("mmkit-tiny-vit", tmp_path)
    encoder = build("text_encoders", "open_clip", model_name="mmkit-tiny-vit", pretrained=str(path),
                    context_length=8).eval()
    ids = torch.stack([encoder.preprocess(t) for t in TEXTS])
    assert ids.shape == (3, 8) and ids[1, -1] == 49407  # truncated text still ends with end-of-text
    with torch.no_grad():  # causal attention: the first 8 positions of a 16-token context give the same
        expected = model.encode_text(torch.nn.functional.pad(ids.where(ids != encoder.pad_id, 0), (0, 8)))
    assert torch.allclose(encoder(ids).pooled, expected, atol=1e-5)
    with pytest.raises(MMKitError, match="context_length must be between 2 and the model's 16, got 32"):
        build("text_encoders", "open_clip", model_name="mmkit-tiny-vit", context_length=32)


@pytest.fixture(scope="module")
def tiny_coca(tiny_models, tmp_path_factory) -> str:
    """A tiny CoCa model registered with open_clip: its text tower appends a class token."""
    import json

    import open_clip

    from tiny_vision import CONFIGS, TEXT

    folder = tmp_path_factory.mktemp("coca")
    text = {**TEXT, "embed_cls": True, "output_tokens": True}
    config = {"embed_dim": 16, "custom_text": True, "text_cfg": text, **CONFIGS["mmkit-tiny-vit"],
              "multimodal_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}
    (folder / "mmkit-tiny-coca.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return "mmkit-tiny-coca"


def test_open_clip_coca_text_pooled_is_encode_text_in_any_batch(tiny_coca, tmp_path):
    model, path = saved_open_clip(tiny_coca, tmp_path)
    encoder = build("text_encoders", "open_clip", model_name=tiny_coca, pretrained=str(path)).eval()
    alone, among = encoder.inputs(TEXTS[2:]), encoder.inputs(TEXTS)
    with torch.no_grad():  # the class token sits after the whole context, as in open_clip
        expected = model.encode_text(alone.where(alone != encoder.pad_id, 0), normalize=False)
        assert torch.allclose(encoder(alone).pooled, expected, atol=1e-5)
        assert torch.allclose(encoder(among).pooled[2:], expected, atol=1e-5)
    short = build("text_encoders", "open_clip", model_name=tiny_coca, pretrained=str(path), context_length=8).eval()
    with torch.no_grad():  # a shorter context keeps the class token's own position
        assert torch.allclose(short(short.inputs(TEXTS[2:])).pooled, expected, atol=1e-5)


# Prefix and grid of each tiny tower: 32 px / 8 px patches; 64 px / the ResNet's stride of 32;
# timm's test_vit: a class token, then 32 px / 16 px patches.
TOKENS = {"mmkit-tiny-vit": (0, (4, 4)), "mmkit-tiny-rn": (0, (2, 2)), "mmkit-tiny-timm": (1, (2, 2))}


@pytest.mark.parametrize("name", list(TOKENS))
def test_open_clip_image_pooled_is_encode_image(tiny_models, tmp_path, name):
    model, path = saved_open_clip(name, tmp_path)
    encoder = build("image_encoders", "open_clip", model_name=name, pretrained=str(path)).eval()
    generator = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray(torch.randint(0, 256, (48, 80, 3), generator=generator, dtype=torch.uint8).numpy())
                for _ in range(2)]
    images = encoder.inputs(pictures)
    own = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    assert torch.equal(images, torch.stack([own(p) for p in pictures]))  # open_clip's preprocessing, bit for bit
    out = encoder(images)
    with torch.no_grad():
        assert torch.allclose(out.pooled, model.encode_image(images), atol=1e-5)
    prefix, grid = TOKENS[name]
    assert (out.prefix, out.grid, out.tokens.shape) == (prefix, grid, (2, prefix + grid[0] * grid[1], encoder.dim))


def test_open_clip_vit_tokens_are_its_own_token_outputs(tiny_models, tmp_path):
    model, path = saved_open_clip("mmkit-tiny-vit", tmp_path)
    encoder = build("image_encoders", "open_clip", model_name="mmkit-tiny-vit", pretrained=str(path)).eval()
    images = torch.randn(2, 3, 32, 32)
    model.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = model.visual(images)
        out = encoder(images)
    assert (out.prefix, out.grid) == (0, (4, 4))  # open_clip's ViT gives its patches; the class token pools
    assert torch.allclose(out.tokens, tokens @ model.visual.proj, atol=1e-6)


def test_open_clip_preprocessing_pickles_for_dataloader_workers(tiny_models):
    image = build("image_encoders", "open_clip", model_name="mmkit-tiny-vit")
    text = build("text_encoders", "open_clip", model_name="mmkit-tiny-vit")
    picture = Image.new("RGB", (50, 40), "red")
    assert torch.equal(pickle.loads(pickle.dumps(image.preprocess))(picture), image.preprocess(picture))
    assert torch.equal(pickle.loads(pickle.dumps(text.preprocess))(TEXTS[0]), text.preprocess(TEXTS[0]))


def test_open_clip_tag_fails_in_one_line_when_the_hub_is_unreachable(tiny_recipe, tmp_path):
    override = "model.image={name='open_clip', model_name='ViT-B-32', pretrained='laion2b_s34b_b79k'}"
    out = run_mmkit("run", tiny_recipe, override, env=unreachable_hub(tmp_path), timeout=30)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line == (f"mmkit: error: {tiny_recipe}: model.image: open_clip model 'ViT-B-32': pretrained "
                    "'laion2b_s34b_b79k': laion/CLIP-ViT-B-32-laion2B-s34B-b79K: not in the cache, and the hub "
                    "cannot be reached; offline, download it once with network access (it is cached), or set "
                    "pretrained to a local checkpoint file")


def test_open_clip_tags_it_cannot_fetch_say_to_give_a_local_file(monkeypatch):
    import open_clip

    with pytest.raises(MMKitError, match="open_clip model 'RN50' has no pretrained tag 'laion9b'; its tags: "
                                         "openai, yfcc15m, cc12m; or set pretrained to a local checkpoint file"):
        build("image_encoders", "open_clip", model_name="RN50", pretrained="laion9b")
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: {"url": "https://example.org/rn50.pt"})
    with pytest.raises(MMKitError, match=r"open_clip model 'RN50': open_clip publishes pretrained 'openai' only at "
                                         r"https://example.org/rn50.pt, which mmkit does not download; download "
                                         r"it and set pretrained to the local file"):
        build("text_encoders", "open_clip", model_name="RN50", pretrained="openai")


def test_open_clip_names_what_it_does_not_build():
    with pytest.raises(MMKitError, match="unknown open_clip model 'ViT-B-23'; did you mean 'ViT-B-32'"):
        build("image_encoders", "open_clip", model_name="ViT-B-23")
    with pytest.raises(MMKitError, match="its text tower is the Hugging Face model 'roberta-base'"):
        build("text_encoders", "open_clip", model_name="roberta-ViT-B-32")


# timm


def timm_weights_file(folder: Path, name: str, prefix: str = "", **args) -> tuple[dict[str, torch.Tensor], Path]:
    """A timm model's whole state dict (classifier included), random, saved as safetensors under ``prefix``."""
    import timm

    weights = timm.create_model(name, **args).state_dict()
    path = folder / f"{name}{prefix.strip('.')}.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in weights.items()}, path)
    return weights, path


def test_timm_refuses_weights_that_do_not_fit_by_name(tmp_path):
    weights, whole = timm_weights_file(tmp_path, "test_resnet")
    part = tmp_path / "part.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items() if not k.startswith("layer4.")}, part)
    _, prefixed = timm_weights_file(tmp_path, "test_resnet", prefix="encoders.image.model.")
    with pytest.raises(MMKitError, match=r"^timm model 'test_resnet': the pretrained weights do not fit the model: "
                                         r"missing: layer4\.0\.conv1\.weight, "):
        build("image_encoders", "timm", model_name="test_resnet", pretrained=str(part))
    with pytest.raises(MMKitError, match=r"missing: conv1\.0\.weight, .*; unexpected: encoders\.image\.model\."):
        build("image_encoders", "timm", model_name="test_resnet", pretrained=str(prefixed))
    encoder = build("image_encoders", "timm", model_name="test_resnet", image_size=32, pretrained=str(whole))
    assert same_weights(encoder.model, weights) and "fc.weight" not in encoder.model.state_dict()


def test_timm_vit_weights_load_at_another_image_size(tmp_path):
    """Loaded by timm, so its checkpoint filter resamples the position embedding to the image size."""
    weights, path = timm_weights_file(tmp_path, "test_vit", img_size=32)
    encoder = build("image_encoders", "timm", model_name="test_vit", image_size=64, pretrained=str(path))
    assert encoder.model.pos_embed.shape[1] == 1 + 4 * 4 != weights["pos_embed"].shape[1]
    assert torch.equal(encoder.model.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])


def test_timm_swin_tokens_are_its_channels_last_map_row_by_row():
    encoder = build("image_encoders", "timm", model_name="swin_tiny_patch4_window7_224", image_size=32,
                    model_args={"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # eval: no stochastic depth between the two passes
        out, feature_map = encoder(images), encoder.model.forward_features(images)  # [B, H', W', C]
    assert out.tokens.shape == (2, 16, encoder.token_dim) and out.grid == (4, 4) and out.prefix == 0
    assert torch.equal(out.tokens[:, 1], feature_map[:, 0, 1])  # row by row: token 1 is row 0, column 1


def picture_256() -> Image.Image:
    """A fixed 256x256 picture of noise, on which resizings and crops of any kind differ."""
    pixels = torch.randint(0, 256, (256, 256, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Image.fromarray(pixels.numpy())


def timm_eval_transform(tagged: str, image_size: int) -> torch.Tensor:
    """timm's own eval transform of ``picture_256`` for a model's pretrained tag, at ``image_size``."""
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    config = resolve_data_config({"img_size": image_size}, pretrained_cfg=get_pretrained_cfg(tagged).to_dict())
    return create_transform(**config)(picture_256())


def test_timm_pretrained_preprocess_is_timms_eval_transform_for_the_weights(tmp_path):
    _, path = timm_weights_file(tmp_path, "test_convnext")  # bicubic, 95 % center crop, mean and std 0.5
    encoder = build("image_encoders", "timm", model_name="test_convnext", image_size=64, pretrained=str(path))
    pixels = encoder.preprocess(picture_256())
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64)
    assert torch.equal(encoder.on_device(pixels[None])[0], timm_eval_transform("test_convnext.r160_in1k", 64))
    assert torch.equal(pickle.loads(pickle.dumps(encoder.preprocess))(picture_256()), pixels)


def test_timm_hub_weights_of_another_tag_bring_that_tags_transform(tmp_path, monkeypatch):
    """efficientnet_b0's default tag (ra_in1k) normalises with ImageNet's mean and std; ra4_e3600_r224_in1k with 0.5."""
    import mmkit.encoders.timm_image as timm_image

    _, path = timm_weights_file(tmp_path, "efficientnet_b0")
    monkeypatch.setattr(timm_image, "hub_file", lambda repo, *args, **kwargs: path)
    encoder = build("image_encoders", "timm", model_name="efficientnet_b0", image_size=64,
                    pretrained="timm/efficientnet_b0.ra4_e3600_r224_in1k")
    expected = timm_eval_transform("efficientnet_b0.ra4_e3600_r224_in1k", 64)
    assert not torch.equal(expected, timm_eval_transform("efficientnet_b0", 64))
    assert torch.equal(encoder.on_device(encoder.preprocess(picture_256())[None])[0], expected)
