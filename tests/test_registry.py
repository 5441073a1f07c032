from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import pytest

from mmkit.errors import MMKitError
from mmkit.plugins import get_registry
from mmkit.registry import Registry, check_type, read_params


def encoder(width: int = 64, mode: Literal["a", "b"] = "a", scale: float | None = None, names: list[str] | None = None):
    """A test factory.

    Args:
        width: features per token.
        mode: which way.
    """


def test_params_come_from_signature_and_docstring():
    params = read_params("text_encoders", encoder)
    assert list(params) == ["width", "mode", "scale", "names"]
    assert params["width"].default == 64 and params["width"].type_name == "int"
    assert params["width"].doc == "features per token."
    assert params["mode"].type_name == "'a' | 'b'"


def numpy_style(depth: int = 2):
    """Another test factory, documented numpy-style.

    Parameters:
        depth: layers.
    """


@pytest.mark.parametrize("factory", [encoder, numpy_style])
def test_the_description_leaves_the_parameter_section_to_params(factory):
    component = Registry().add("text_encoders", factory.__name__, factory, plugin="tests")
    assert component.description == component.summary  # the one-line doc, no "Args:" block
    assert all(p.doc for p in component.params.values() if p.name in ("width", "mode", "depth"))


def test_task_factories_do_not_expose_what_mmkit_provides():
    params = get_registry().get("tasks", "clip_retrieval").params
    assert "encoders" not in params and "embed_dim" in params


@pytest.mark.parametrize("value, annotation, ok", [
    (3, int, True), (3, float, True), (True, int, False), ("3", int, False), (0.5, int, False),
    ("a", Literal["a", "b"], True), ("c", Literal["a", "b"], False),
    (None, float | None, True), (1.0, float | None, True), ("x", float | None, False),
    (["a", "b"], list[str], True), (["a", 1], list[str], False), ({"depth": 2}, dict, True),
    (False, bool | str, True), ("w.pt", bool | str, True), (1, bool | str, False),
    (True, Literal[1, 2], False), (2, Literal[1, 2], True), ([1, "a"], tuple, True),
    ([1, "a"], tuple[int, str], True), ([1], tuple[int, str], False), ([1, 2], tuple[int, ...], True),
    ([1], Sequence[int], True), ("ab", Sequence[str], False), ({"a": 1}, Mapping[str, int], True),
])
def test_check_type(value, annotation, ok):
    assert check_type(value, annotation) is ok


def test_duplicate_name_names_both_plugins():
    registry = Registry()
    registry.add("text_encoders", "gru", encoder, "first")
    with pytest.raises(MMKitError, match='plugin "second" registers text encoder "gru", already registered by plugin "first"'):
        registry.add("text_encoders", "gru", encoder, "second")
    assert registry.get("text_encoders", "gru").plugin == "first"


def test_unknown_name_suggests_a_close_one():
    with pytest.raises(MMKitError, match=r"unknown image encoder 'tim'; did you mean 'timm'\? see `mmkit list image_encoders`"):
        get_registry().get("image_encoders", "tim")
    with pytest.raises(MMKitError, match=r"unknown image encoder 'vit_tiny'; known: open_clip, timm, torchvision \(see `mmkit list image_encoders`\)"):
        get_registry().get("image_encoders", "vit_tiny")


def test_builtins_are_registered_through_plugins():
    registry = get_registry()
    plugins = {(c.kind, c.name): c.plugin for c in registry.components()}
    assert plugins[("image_encoders", "timm")] == "mmkit.encoders"
    assert plugins[("datasets", "synthetic_shapes")] == "mmkit.data"
    assert plugins[("tasks", "clip_retrieval")] == "mmkit.tasks"
    assert [c.name for c in registry.components("datasets", "synthetic_*")] == ["synthetic_audio", "synthetic_diagnosis",
                                                                           "synthetic_shapes"]


def test_kinds_accept_singular_names():
    names = [c.name for c in get_registry().components("image_encoders")]
    assert [c.name for c in get_registry().components("image_encoder")] == names and "timm" in names
    assert [c.name for c in get_registry().components("image-encoders")] == names
    with pytest.raises(MMKitError, match="unknown kind 'widgets'"):
        get_registry().components("widgets")
