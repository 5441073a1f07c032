"""The component registry: kind -> name -> Component, with schemas read from signatures."""

from __future__ import annotations

import collections.abc
import difflib
import fnmatch
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmkit.errors import MMKitError
from mmkit.specs import DATA_KEYS, PART_KEYS

KINDS: dict[str, str] = {
    "image_encoders": "image encoder",
    "text_encoders": "text encoder",
    "audio_encoders": "audio encoder",
    "fusion_heads": "fusion head",
    "tasks": "task",
    "datasets": "dataset",
}

# Parameters mmkit builds and passes itself; they are not part of a recipe table.
# ``data`` is the training set's DatasetInfo (keys, class names, label kind); ``modalities``
# gives a fusion head each encoder's widths (mmkit.fusion.base.Modality), not the encoder.
PROVIDED: dict[str, tuple[str, ...]] = {"tasks": ("encoders", "fusion", "data"), "fusion_heads": ("modalities",)}

# Kinds built as parts of a model, whose [model.*] tables also take mmkit's part keys.
PART_KINDS = ("image_encoders", "text_encoders", "audio_encoders", "fusion_heads")

REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a component, read from its factory's signature."""

    name: str
    annotation: Any
    default: Any
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def type_name(self) -> str:
        return type_name(self.annotation)


@dataclass(frozen=True)
class Component:
    """A registered factory and where it came from."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    params: dict[str, Param] = field(compare=False)

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.factory) or ""

    @property
    def summary(self) -> str:
        return self.doc.split("\n", 1)[0]

    def takes(self, name: str) -> bool:
        """Whether the factory has a parameter ``name`` (e.g. a task taking ``fusion``)."""
        return name in inspect.signature(self.factory).parameters

    @property
    def description(self) -> str:
        """The docstring without its parameter section, which ``params`` carries."""
        return re.split(r"^(?:Args|Parameters):\s*$", self.doc, maxsplit=1, flags=re.M)[0].strip()


def read_params(kind: str, factory: Callable[..., Any]) -> dict[str, Param]:
    """The factory's keyword parameters with resolved type hints and docstring lines."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(target)
    docs = _arg_docs(inspect.getdoc(factory) or "")
    params = {}
    for p in inspect.signature(factory).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in PROVIDED.get(kind, ()):
            continue
        params[p.name] = Param(p.name, hints.get(p.name, Any), p.default, docs.get(p.name, ""))
    return params


def _arg_docs(doc: str) -> dict[str, str]:
    """Parse a Google-style ``Args:`` section into {name: description}, joining the
    deeper-indented lines that continue a description."""
    docs, inside, last = {}, False, None
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Parameters:"):
            inside = True
        elif inside and (m := re.match(r"( +)(\w+)(?: \(.*?\))?:\s*(.*)", line)):
            indent, last = len(m.group(1)), m.group(2)
            docs[last] = m.group(3)
        elif inside and last and line.startswith(" " * (indent + 1)) and line.strip():
            docs[last] += " " + line.strip()
        elif inside and line.strip() and not line.startswith(" "):
            inside = False
    return docs


class Registry:
    """Every component the loaded plugins offer, by kind and name."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, name: str, factory: Callable[..., Any], plugin: str) -> Component:
        taken = self._components[kind].get(name)
        if taken is not None:
            raise MMKitError(
                f'plugin "{plugin}" registers {KINDS[kind]} "{name}", '
                f'already registered by plugin "{taken.plugin}"; ignored'
            )
        try:
            params = read_params(kind, factory)
        except (TypeError, ValueError, NameError) as error:
            raise MMKitError(f'plugin "{plugin}" registers {KINDS[kind]} "{name}" with a factory '
                             f"whose signature cannot be read ({error}); ignored") from None
        if kind in PART_KINDS and (taken := sorted(set(params) & set(PART_KEYS))):
            raise MMKitError(f'plugin "{plugin}" registers {KINDS[kind]} "{name}" with the parameter '
                             f"{taken[0]!r}, a key mmkit applies to every [model.*] table itself; rename it; ignored")
        if kind == "datasets" and (taken := sorted(set(params) & set(DATA_KEYS))):
            raise MMKitError(f'plugin "{plugin}" registers dataset "{name}" with the parameter {taken[0]!r}, '
                             "a key mmkit applies to every [data] table itself; rename it; ignored")
        component = Component(kind, name, factory, plugin, params)
        self._components[kind][name] = component
        return component

    def get(self, kind: str, name: str) -> Component:
        kind = normalize_kind(kind)
        try:
            return self._components[kind][name]
        except KeyError:
            raise MMKitError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        message = f"unknown {KINDS[kind]} {name!r}"
        known = sorted(self._components[kind])
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        if close:
            return f"{message}; did you mean {close[0]!r}? see `mmkit list {kind}`"
        return f"{message}; known: {', '.join(known) or 'none'} (see `mmkit list {kind}`)"

    def has(self, kind: str, name: Any) -> bool:
        return isinstance(name, str) and name in self._components[normalize_kind(kind)]

    def components(self, kind: str | None = None, pattern: str = "*") -> list[Component]:
        kinds = [normalize_kind(kind)] if kind else list(KINDS)
        return [
            c
            for k in kinds
            for name, c in sorted(self._components[k].items())
            if fnmatch.fnmatch(name, pattern)
        ]


def normalize_kind(kind: str) -> str:
    """Accept 'image_encoder', 'image-encoders' or 'image_encoders'."""
    key = kind.replace("-", "_")
    key = key if key in KINDS else key + "s"
    if key not in KINDS:
        raise MMKitError(f"unknown kind {kind!r}; kinds are: {', '.join(KINDS)}")
    return key


def type_name(annotation: Any) -> str:
    if annotation is Any:
        return "any"
    if annotation is type(None):
        return "none"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin in (dict, collections.abc.Mapping):
        return f"table of {type_name(args[1])}" if args and args[1] is not Any else "table"
    return getattr(annotation, "__name__", str(annotation))


SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Set)


def check_type(value: Any, annotation: Any) -> bool:
    """Whether a TOML value fits a parameter annotation (ints are accepted for floats)."""
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation) or annotation
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, a) for a in args)
    if origin in SEQUENCES:
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not ...:  # fixed length
            return len(value) == len(args) and all(map(check_type, value, args))
        return all(check_type(v, args[0]) for v in value) if args else True
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict) and (not args or all(check_type(v, args[1]) for v in value.values()))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is Path:
        return isinstance(value, (str, Path))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True
