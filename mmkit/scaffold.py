"""`mmkit new-plugin`: a plugin package that works as written, for an author to make their own."""

from __future__ import annotations

import importlib.util
import keyword
import re
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from string import Template

from mmkit.errors import MMKitError
from mmkit.registry import KINDS, Registry, normalize_kind


@dataclass(frozen=True)
class Starter:
    """What a new plugin of one kind holds: its module's file and class, and a recipe to try it in."""

    file: str
    suffix: str
    recipe: str


STARTERS = {
    "image_encoders": Starter("encoder", "Encoder", "mmkit run recipes/clip_retrieval.toml model.image.name={name}"),
    "text_encoders": Starter("encoder", "Encoder", "mmkit run recipes/clip_retrieval.toml model.text.name={name}"),
    "audio_encoders": Starter("encoder", "Encoder",
                              "mmkit run recipes/audio_text_retrieval.toml model.audio.name={name}"),
    "fusion_heads": Starter("head", "Head", "mmkit run recipes/fused_classifier.toml model.fusion.name={name}"),
    "datasets": Starter("dataset", "Dataset",
                        "mmkit run recipes/clip_retrieval.toml data.name={name}"),
}
DIST_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*([-_][A-Za-z0-9]+)*$")


def new_plugin(dist: str, kind: str, parent: Path, registry: Registry) -> tuple[Path, list[Path], str]:
    """Write the plugin package ``dist`` under ``parent``: pyproject.toml (its entry point),
    README, the module with its one hook, a working component of ``kind`` and its test.
    Returns the package folder, the files written and the command that tries it in a recipe."""
    kind = normalize_kind(kind)
    if kind not in STARTERS:
        raise MMKitError(f"new-plugin makes {', '.join(STARTERS)}; a {KINDS[kind]} starts from "
                         "mmkit/tasks in mmkit's source, registered by a register_tasks hook")
    module, name = names(dist)
    if registry.has(kind, name):
        owner = registry.get(kind, name).plugin
        raise MMKitError(f'{KINDS[kind]} "{name}" is registered already (by {owner}): choose another plugin name')
    if name in {entry.name for entry in metadata.entry_points(group="mmkit")}:
        raise MMKitError(f'a plugin named "{name}" is installed already: choose another plugin name')
    folder = parent / dist
    if folder.exists():
        raise MMKitError(f"{folder} exists: new-plugin writes a new folder and changes none")
    starter = STARTERS[kind]
    words = {"dist": dist, "module": module, "component": name, "kind": kind, "what": KINDS[kind],
             "file": starter.file, "cls": camel(name) + starter.suffix, "try": starter.recipe.format(name=name)}
    files = {"pyproject.toml": "pyproject.toml", "README.md": "README.md", f"{module}/__init__.py": "__init__.py",
             f"{module}/{starter.file}.py": f"components/{kind}.py", f"tests/test_{name}.py": f"tests/{kind}.py"}
    templates = resources.files("mmkit") / "templates" / "plugin"
    written = []
    for target, source in files.items():
        path = folder / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template((templates / f"{source}.tmpl").read_text()).substitute(words))
        written.append(path)
    return folder, written, words["try"]


def names(dist: str) -> tuple[str, str]:
    """The module (mmkit_myencoder) and component (myencoder) names of the package ``dist``,
    refused where Python could not import them or they would hide an installed module."""
    if not DIST_NAME.match(dist):
        raise MMKitError(f"{dist!r} is not a package name: use letters and digits joined by - or _ (mmkit-myencoder)")
    module = dist.replace("-", "_").lower()
    name = re.sub(r"^mmkit_", "", module)
    if not name[:1].isalpha() or keyword.iskeyword(module) or keyword.iskeyword(name):
        raise MMKitError(f"{dist!r}: its module {module} and component {name} must be Python names that start with "
                         "a letter (mmkit-edge2d, not mmkit-2d)")
    if importlib.util.find_spec(module) is not None:
        raise MMKitError(f"{dist!r}: a module {module} is installed already, and the plugin's would hide it or be "
                         "hidden: choose another name")
    return module, name


def camel(name: str) -> str:
    """my_encoder -> MyEncoder."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))
