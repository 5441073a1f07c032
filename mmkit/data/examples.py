"""[data.example]: generated samples written as files in the recipe's own format, once, so a
recipe for a manifest, an image folder or shards runs as shipped, with nothing to download."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from mmkit.errors import MMKitError
from mmkit.files import atomic_path, publish
from mmkit.specs import Example


def write_example(recipe: Any, registry: Any, say: Callable[[str], None] = print) -> None:
    """Write [data.example]'s samples where [data] (and [data.val]) read, for each split whose
    files are not all there yet: a split's existing files are never written over."""
    from mmkit.components import instantiate

    missing = missing_splits(recipe, registry)
    if not missing:
        return
    example = Example(**recipe.table("data")["example"])
    generator = registry.get("datasets", example.name)
    samples = {}
    for split in missing:
        count = getattr(example, split)
        dataset = instantiate(generator, {**(example.params or {}), "num_samples": count, "split": split})
        samples[split] = [{**dataset[i], "split": split} for i in range(count)]
    writer = WRITERS[recipe.table("data")["name"]]
    firsts = sorted({str(writer.targets(params)[0]) for params in missing.values()})
    counts = " + ".join(f"{len(samples[split])} {split}" for split in missing)
    say(f"writing [data.example]: {example.name}, {counts} samples, to {', '.join(firsts)}")
    writer.write(missing, samples, list(dataset.info.class_names))


def missing_splits(recipe: Any, registry: Any) -> dict[str, dict[str, Any]]:
    """The splits (and their dataset parameters) whose [data.example] files are not all there."""
    if recipe.table("data").get("example") is None:
        return {}
    name = recipe.table("data")["name"]
    if name not in WRITERS:
        raise MMKitError(f"{recipe.origin('data.example')}: data.example: writes files for "
                         f"{', '.join(WRITERS)}, not for dataset {name!r}")
    return {split: params for split, params in _splits(recipe, registry).items()
            if not all(path.exists() for path in WRITERS[name].targets(params))}


def example_missing(recipe: Any, registry: Any) -> bool:
    """Whether the recipe has [data.example] and some file it would write is not there yet."""
    return bool(missing_splits(recipe, registry))


def _splits(recipe: Any, registry: Any) -> dict[str, dict[str, Any]]:
    """Each split's dataset parameters, as a run builds them."""
    from mmkit.recipe import val_params

    splits = {"train": recipe.params("data")}
    if "val" in recipe.table("data"):
        splits["val"] = {**recipe.params("data"), **val_params(recipe, registry)}
    return splits


class ManifestWriter:
    """A manifest per path; splits sharing one file are told apart by its split column."""

    @staticmethod
    def targets(params: dict[str, Any]) -> list[Path]:
        return [Path(params["path"])]

    @staticmethod
    def write(splits: dict[str, dict], samples: dict[str, list[dict]], class_names: list[str]) -> None:
        from mmkit.data.manifest import write_manifest

        by_path: dict[str, list[dict]] = {}
        for split, params in splits.items():
            by_path.setdefault(params["path"], []).extend(samples[split])
        for path, rows in by_path.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_manifest(rows, path, class_names)


class FolderWriter:
    """One class folder tree per split's root."""

    @staticmethod
    def targets(params: dict[str, Any]) -> list[Path]:
        return [Path(params["root"])]

    @staticmethod
    def write(splits: dict[str, dict], samples: dict[str, list[dict]], class_names: list[str]) -> None:
        from mmkit.data.image_folder import write_image_folder

        for split, params in splits.items():
            with atomic_path(Path(params["root"])) as partial:  # a failed write leaves no half folder
                shutil.rmtree(partial, ignore_errors=True)  # what a killed earlier write left
                write_image_folder(without_split(samples[split]), partial, class_names)


class ShardWriter:
    """Each split's samples spread evenly over the shards its urls name."""

    @staticmethod
    def targets(params: dict[str, Any]) -> list[Path]:
        from mmkit.data.shards import expand_urls

        return [Path(shard) for shard in expand_urls(params["urls"])]

    @staticmethod
    def write(splits: dict[str, dict], samples: dict[str, list[dict]], class_names: list[str]) -> None:
        from mmkit.data.shards import write_shards

        for split, params in splits.items():
            shards = ShardWriter.targets(params)
            if len(samples[split]) < len(shards):
                raise MMKitError(f"data.example: {len(samples[split])} {split} samples cannot fill {len(shards)} shards")
            bounds = [len(samples[split]) * i // len(shards) for i in range(len(shards) + 1)]
            for index, shard in enumerate(shards):
                chunk = samples[split][bounds[index]:bounds[index + 1]]
                shard.parent.mkdir(parents=True, exist_ok=True)
                written = write_shards(without_split(chunk),
                                       f"{shard}.%d.partial", len(chunk), class_names)
                publish(written[0], shard)


def without_split(samples: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The samples without the split mark that only a manifest keeps (as its split column)."""
    return ({key: value for key, value in sample.items() if key != "split"} for sample in samples)


WRITERS = {"manifest": ManifestWriter, "image_folder": FolderWriter, "webdataset": ShardWriter}
