"""TOML recipes: loading with `extends`, dotted overrides, validation and the resolved form."""

from __future__ import annotations

import copy
import datetime
import difflib
import itertools
import tomllib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterable

from mmkit.errors import MMKitError, RecipeError
from mmkit.files import write_text_atomic
from mmkit.registry import Param, Registry, check_type, read_params
from mmkit.specs import DATA_KEYS, PART_KEYS, DataSpec, EvalSpec, Example, InitFrom, LoraSpec, PartSpec, RunSpec, TrainSpec

SPECS = {"run": RunSpec, "train": TrainSpec, "eval": EvalSpec}
MODALITIES = {"image": "image_encoders", "text": "text_encoders", "audio": "audio_encoders"}
TABLES = ("run", "data", "model", "task", "train", "eval", "versions")
COMMAND_LINE = "command line"


@dataclass
class Recipe:
    """A loaded recipe: its nested tables, the file they came from, and where each key was set."""

    source: Path
    tree: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)  # dotted key -> file, or COMMAND_LINE

    def origin(self, key: str) -> str:
        """Where ``key`` (or the nearest table above it) was set, for error messages."""
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            found = self.origins.get(".".join(parts[:n]))
            if found == COMMAND_LINE:
                return f"{self.source} ({COMMAND_LINE})"
            if found:
                return found
        return str(self.source)

    def table(self, *keys: str) -> dict[str, Any]:
        node = self.tree
        for key in keys:
            node = node.get(key, {})
        return node

    def params(self, *keys: str) -> dict[str, Any]:
        """A component table's parameters: all but its ``name``, and the keys mmkit applies
        itself: in [data] its val table and on_error, in [model.<part>] freeze, lora, ..."""
        nested = DATA_KEYS if keys == ("data",) else PART_KEYS if keys[0] == "model" else ()
        return {k: v for k, v in self.table(*keys).items() if k != "name" and k not in nested}

    def data(self) -> DataSpec:
        """The keys mmkit applies to any dataset in [data]."""
        table = self.table("data")
        return DataSpec(**{k: table[k] for k in DATA_KEYS if k in table and k != "val"})

    def part(self, key: str) -> PartSpec:
        """The keys mmkit applies to the part of [model.<key>]."""
        table = self.table("model", key)
        return PartSpec(**{k: table[k] for k in PART_KEYS if k in table})

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if m in self.table("model")]

    def spec(self, table: str) -> Any:
        values = dict(self.table(table))
        if table == "run" and not values.get("name"):
            values["name"] = self.source.stem
        return SPECS[table](**values)


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read a recipe file, merge what it extends, then apply ``a.b=value`` overrides.

    The overrides form one layer, so their order does not matter; an inline table
    (``model.image.model_args={}``) replaces the table it names instead of merging into it.
    """
    path = Path(path)
    origins: dict[str, str] = {}
    tree = _load_tree(path, (), origins)
    parsed = [(override, *parse_override(override)) for override in overrides]
    _check_overlaps(parsed)
    layer: dict[str, Any] = {}
    for _, keys, value in sorted(parsed, key=lambda item: len(item[1])):  # a table before keys inside it
        _put(layer, keys, value)
    tree = merge(tree, layer)
    for _, keys, value in parsed:
        if isinstance(value, dict):
            _put(tree, keys, copy.deepcopy(_nested_get(layer, keys)))
    origins |= dict.fromkeys(_dotted_keys(layer), COMMAND_LINE)
    return Recipe(path, tree, origins)


def _check_overlaps(parsed: list[tuple[str, list[str], Any]]) -> None:
    """Two overrides may not set the same key, nor one a key inside the other's value,
    unless that value is an inline table given whole."""
    for (text, *one), (other, *two) in itertools.combinations(parsed, 2):
        (short, short_value), (long, _) = sorted([one, two], key=lambda keys_value: len(keys_value[0]))
        if long[:len(short)] == short and not (len(long) > len(short) and isinstance(short_value, dict)):
            raise MMKitError(f"overrides {text!r} and {other!r} both set {'.'.join(short)}; keep one")


def _put(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[keys[-1]] = copy.deepcopy(value)


def _nested_get(tree: dict[str, Any], keys: list[str]) -> Any:
    for key in keys:
        tree = tree[key]
    return tree


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> Iterable[str]:
    """Every table and key of ``tree`` as a dotted path."""
    for key, value in tree.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{key}.")


def _load_tree(path: Path, seen: tuple[Path, ...], origins: dict[str, str]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in seen:
        raise MMKitError(f"{path}: `extends` loops back to itself")
    try:
        tree = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MMKitError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MMKitError(f"cannot read recipe {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise MMKitError(f"{path}: not valid TOML: {error}") from None
    tree.pop("versions", None)  # written by runs for people to read; never an input
    parent = tree.pop("extends", None)
    own = dict.fromkeys(_dotted_keys(tree), str(path))
    if parent is not None:
        if not isinstance(parent, str):
            raise MMKitError(f"{path}: extends: expected a path string, got {parent!r}")
        if not (path.parent / parent).is_file():
            raise MMKitError(f"{path}: extends: recipe not found: {path.parent / parent}")
        tree = merge(_load_tree(path.parent / parent, seen + (resolved,), origins), tree)
    origins |= own
    return tree


def merge(base: dict[str, Any], top: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Deep-merge two tables, ``top`` winning; an empty table in ``top`` replaces (clears) the
    one below. A layer that names another component drops the old one's params and its
    [data.example] (files in the old dataset's format), not data.on_error, nor [data.val] unless
    it brings its own, nor a part's freeze, lora, init_from and lr_scale; a layer that sets one
    of train.epochs / train.max_steps drops the other."""
    out = copy.deepcopy(base)
    if path and path[0] != "run" and "name" in top and top["name"] != base.get("name"):
        kept = tuple(k for k in ("val", "on_error") if k not in top) if path == ("data",) else \
            PART_KEYS if path[0] == "model" else ()
        out = {key: out[key] for key in kept if key in out}
    if path == ("train",):
        for one, other in (("epochs", "max_steps"), ("max_steps", "epochs")):
            if top.get(one) and other not in top:  # max_steps = 0 means "use epochs": keep them
                out.pop(other, None)
    for key, value in top.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, path + (key,))
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 3e-4); bare words are strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise MMKitError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if isinstance(value, (datetime.date, datetime.time)):  # no recipe key holds a date: run.name=2024-01-01
        value = raw
    return key.strip().split("."), value


def check_recipe(recipe: Recipe, registry: Registry) -> None:
    """Raise RecipeError listing every problem (file, dotted key, what was expected)."""
    problems = _Problems(recipe)
    tree = recipe.tree
    _unknown_keys(problems, "", tree, TABLES)
    for table, spec in SPECS.items():
        _check_table(problems, table, tree.get(table, {}), read_params("", spec))
    data = tree.get("data")
    _check_component(problems, registry, "data", data, "datasets", nested=DATA_KEYS)
    if isinstance(data, dict):
        _check_table(problems, "data", {k: data[k] for k in DATA_KEYS if k in data and k != "val"},
                     read_params("", DataSpec))
        if isinstance(data.get("example"), dict):
            _check_example(problems, registry, data["example"])
    if isinstance(data, dict) and "val" in data:
        if not isinstance(data["val"], dict):
            problems.add("data.val", f"expected a table of dataset parameters, got {data['val']!r}")
        elif registry.has("datasets", data.get("name")):
            params = registry.get("datasets", data["name"]).params
            _check_table(problems, "data.val", data["val"], params, required=False)
    _check_component(problems, registry, "task", tree.get("task"), "tasks")
    model = tree.get("model", {})
    if not isinstance(model, dict) or not (set(model) & set(MODALITIES)):
        problems.add("model", f"expected at least one of {', '.join(f'[model.{m}]' for m in MODALITIES)}")
    else:
        _unknown_keys(problems, "model", model, (*MODALITIES, "fusion"))
        for part, kind in {**MODALITIES, "fusion": "fusion_heads"}.items():
            if part == "fusion" and part in model and (changed := _built_from_encoders(registry, model[part])):
                problems.add("model.fusion", changed)
            elif part in model:
                _check_component(problems, registry, f"model.{part}", model[part], kind, nested=PART_KEYS)
                _check_part(problems, f"model.{part}", model[part])
        if "fusion" in model:
            task = tree.get("task")
            if isinstance(task, dict) and registry.has("tasks", task.get("name")) \
                    and not registry.get("tasks", task["name"]).takes("fusion"):
                problems.add("model.fusion", f"task {task['name']!r} takes no fusion head; remove [model.fusion] "
                                             "or pick a task that fuses modalities")
    if not problems:
        for table in SPECS:
            for key, message in recipe.spec(table).problems().items():
                problems.add(f"{table}.{key}", message)
        for part in recipe.table("model"):
            spec = recipe.part(part)
            lora = {} if spec.lora is None else LoraSpec(**spec.lora).problems()
            for key, message in [*spec.problems().items(), *((f"lora.{k}", m) for k, m in lora.items())]:
                problems.add(f"model.{part}.{key}", message)
    if problems:
        raise RecipeError(problems.lines)


class _Problems:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.lines.append(f"{self.recipe.origin(key)}: {key}: {message}")

    def __bool__(self) -> bool:
        return bool(self.lines)


def _unknown_keys(problems: _Problems, prefix: str, table: dict, known: Iterable[str]) -> None:
    known = list(known)
    for key in table:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            where = f"{prefix}.{key}" if prefix else key
            what = "table" if not prefix else "key"
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; expected one of {', '.join(known)}"
            problems.add(where, f"unknown {what}{suggestion}")


def _check_table(problems: _Problems, prefix: str, table: Any, params: dict[str, Param],
                 required: bool = True, ignore: tuple[str, ...] = ()) -> None:
    if not isinstance(table, dict):
        problems.add(prefix, f"expected a table, got {table!r}")
        return
    _unknown_keys(problems, prefix, {k: v for k, v in table.items() if k not in ignore}, [*params, *ignore])
    for name, param in params.items():
        if name in table:
            if not check_type(table[name], param.annotation):
                problems.add(f"{prefix}.{name}", f"expected {param.type_name}, got {table[name]!r}")
        elif required and param.required:
            problems.add(f"{prefix}.{name}", f"missing; expected {param.type_name}")


def _check_example(problems: _Problems, registry: Registry, example: dict[str, Any]) -> None:
    """[data.example]'s keys, the dataset it generates, and that dataset's params (but the
    num_samples and split it is given for each split), so a typo fails at validate, not mid-run."""
    _check_table(problems, "data.example", example, read_params("", Example))
    name, params = example.get("name"), example.get("params", {})
    if not isinstance(name, str):
        return
    if not registry.has("datasets", name):
        problems.add("data.example.name", registry.unknown_message("datasets", name))
    elif isinstance(params, dict):
        schema = {k: p for k, p in registry.get("datasets", name).params.items() if k not in ("num_samples", "split")}
        _check_table(problems, "data.example.params", params, schema)


def _built_from_encoders(registry: Registry, table: Any) -> str | None:
    """A fusion head written for the old contract (handed ``encoders``): say what changed."""
    name = table.get("name") if isinstance(table, dict) else None
    if not registry.has("fusion_heads", name) or registry.get("fusion_heads", name).takes("modalities"):
        return None
    return (f"fusion head {name!r} does not take `modalities`: a head is built from each modality's widths "
            "(mmkit.Modality), not handed the encoders; see the README's 'Fusion heads'")


def _check_part(problems: _Problems, prefix: str, table: Any) -> None:
    """The keys mmkit applies to every part, and the tables inside them."""
    if not isinstance(table, dict):
        return
    _check_table(problems, prefix, {k: table[k] for k in PART_KEYS if k in table}, read_params("", PartSpec))
    if isinstance(table.get("lora"), dict):
        _check_table(problems, f"{prefix}.lora", table["lora"], read_params("", LoraSpec))
    if isinstance(table.get("init_from"), dict):
        _check_table(problems, f"{prefix}.init_from", table["init_from"], read_params("", InitFrom))


def _check_component(problems: _Problems, registry: Registry, prefix: str, table: Any, kind: str,
                     nested: tuple[str, ...] = ()) -> None:
    if not isinstance(table, dict):
        problems.add(prefix, "missing table" if table is None else f"expected a table, got {table!r}")
        return
    name = table.get("name")
    if not isinstance(name, str):
        what = "missing; name a component" if name is None else f"expected a string naming a component, got {name!r}"
        problems.add(f"{prefix}.name", f"{what}, see `mmkit list {kind}`")
        return
    if not registry.has(kind, name):
        problems.add(f"{prefix}.name", registry.unknown_message(kind, name))
        return
    params = registry.get(kind, name).params
    _check_table(problems, prefix, table, params, ignore=("name", *nested))


def resolved_tree(recipe: Recipe, registry: Registry, versions: dict[str, str]) -> dict[str, Any]:
    """The recipe with every default written out, so re-running it reproduces the run."""
    tree: dict[str, Any] = {}
    for table, spec in SPECS.items():
        tree[table] = _with_defaults(read_params("", spec), recipe.table(table))
    tree["run"]["name"] = recipe.spec("run").name
    tree["data"] = {**_component_with_defaults(registry, "datasets", recipe, "data"),
                    **_with_defaults(read_params("", DataSpec), recipe.table("data"))}
    if "val" in recipe.table("data"):
        tree["data"]["val"] = val_params(recipe, registry)
    tree["model"] = {
        key: {**_component_with_defaults(registry, MODALITIES.get(key, "fusion_heads"), recipe, "model", key),
              **_with_defaults(read_params("", PartSpec), recipe.table("model", key))}
        for key in recipe.table("model")
    }
    tree["task"] = _component_with_defaults(registry, "tasks", recipe, "task")
    tree["versions"] = versions
    return tree


def val_params(recipe: Recipe, registry: Registry) -> dict[str, Any]:
    """[data.val] as the held-out set is built: ``split = "val"`` unless it says otherwise
    or names its own source (a required parameter: its own manifest, folder or shards)."""
    params = dict(recipe.table("data", "val"))
    schema = registry.get("datasets", recipe.table("data")["name"]).params
    own_source = any(schema[key].required for key in params if key in schema)
    if "split" in schema and not own_source:
        params.setdefault("split", "val")
    return params


def _component_with_defaults(registry: Registry, kind: str, recipe: Recipe, *keys: str) -> dict[str, Any]:
    name = recipe.table(*keys)["name"]
    return {"name": name, **_with_defaults(registry.get(kind, name).params, recipe.params(*keys))}


def _with_defaults(params: dict[str, Param], table: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, param in params.items():
        value = table.get(name, None if param.required else param.default)
        if value is not None:  # TOML has no null: an absent key means None
            out[name] = _toml_value(value)
    return out


def _toml_value(value: Any) -> Any:
    """Defaults as TOML can hold them: paths as strings, tuples and sets as arrays."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, set, frozenset)):
        return [_toml_value(v) for v in value]
    return value


def write_recipe(tree: dict[str, Any], path: Path) -> None:
    import tomli_w

    write_text_atomic(path, tomli_w.dumps(tree))

