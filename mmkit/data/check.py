"""Reading every sample of a dataset before training, to list the bad ones by kind.

Samples are read in DataLoader workers that send back only where each one was and its
SampleError record, never the decoded images, so a check costs reading and decoding alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from mmkit.data.loader import labelled, leave_signals_to_the_main_process, streamed_sample
from mmkit.errors import MMKitError, one_line
from mmkit.recipe import Recipe
from mmkit.registry import Registry
from mmkit.samples import SampleError

SHOWN = 3  # problems listed per kind; the count says how many there are
CHUNK = 16  # samples a worker reads per trip to the main process


@dataclass
class Checked:
    """What reading a whole dataset found: how many samples were read (bad ones included)
    and the bad ones, in the dataset's order (a stream's: shard by shard, in tar order)."""

    read: int = 0
    problems: list[SampleError] = field(default_factory=list)


def default_workers() -> int:
    """Reader processes when none are asked for: one per CPU this process may use, four at most."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cpus)


def check_dataset(dataset: Any, workers: int = 0, progress: Callable[[int], Any] | None = None) -> Checked:
    """Read every sample of a map-style dataset (``dataset[i]`` for every i) or a stream
    (anything with ``records``, read once through epoch 0), collecting the SampleErrors.

    Any other exception is a bug in the dataset, not bad data: it propagates.
    ``progress`` is called with the number of samples each step read.
    """
    if hasattr(dataset, "records"):
        return _check_stream(dataset, workers, progress)
    if isinstance(dataset, IterableDataset):
        raise MMKitError(f"{type(dataset).__name__} streams samples without `records`, so the first bad one "
                         "would end the stream; `mmkit data check` reads map-style datasets "
                         "and streams with `records` (like webdataset)")
    checked = Checked()
    for chunk in _loader(_Probe(dataset), workers):
        checked.read += len(chunk)
        checked.problems += [SampleError.from_record(record) for _, record in chunk if record is not None]
        if progress:
            progress(len(chunk))
    return checked


def _check_stream(stream: Any, workers: int, progress: Callable[[int], Any] | None) -> Checked:
    """One pass over a stream, split into shares that together hold every record once."""
    parts = max(1, min(workers, getattr(stream, "max_parts", 1)))
    checked, found = Checked(), []
    for chunk in _loader(_StreamProbe(stream, parts), min(workers, parts)):
        checked.read += len(chunk)
        found += [(record["source"], part, position, record) for part, position, record in chunk if record]
        if progress:
            progress(len(chunk))
    # shares come back interleaved however the workers ran: shard by shard, in tar order, is
    # the same order for any number of workers
    checked.problems = [SampleError.from_record(record) for *_, record in sorted(found, key=lambda f: f[:3])]
    return checked


class _Probe(Dataset):
    """A map-style dataset's samples as (index, SampleError record or None): decoded, then dropped."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any] | None]:
        try:
            labelled(self.dataset[index], self.dataset, index)
        except SampleError as error:
            return index, error.record()
        return index, None


class _StreamProbe(IterableDataset):
    """A stream's records as (share, position, SampleError record or None); worker w reads
    shares w, w + workers, ... of ``parts`` (with one reader, ``records(0, 0, 1, seed=0)``)."""

    def __init__(self, stream: Any, parts: int):
        self.stream, self.parts = stream, parts

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, Any] | None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for part in range(worker, self.parts, workers):
            for position, item in enumerate(self.stream.records(0, part, self.parts, seed=0)):
                try:
                    streamed_sample(item, self.stream)
                    problem = None
                except SampleError as error:
                    problem = error.record()
                yield part, position, problem


def _loader(probe: Dataset, workers: int) -> DataLoader:
    return DataLoader(probe, batch_size=CHUNK, num_workers=workers, collate_fn=list,
                      worker_init_fn=leave_signals_to_the_main_process if workers else None)


def recipe_datasets(recipe: Recipe, registry: Registry) -> dict[str, Dataset]:
    """The recipe's [data] training set and, with [data.val], its held-out set, built as a run
    builds them; nothing else is built."""
    from mmkit.components import build_datasets

    name = recipe.table("data").get("name")
    if not isinstance(name, str):
        raise MMKitError(f"{recipe.source}: data.name: missing; name a dataset, see `mmkit list datasets`")
    train, val, _ = build_datasets(recipe, registry)
    return {"train": train} | ({"val": val} if val is not None else {})


def manifest_datasets(path: str, params: dict[str, Any], registry: Registry) -> dict[str, Dataset]:
    """A manifest file's samples by split: each split its split column names (rows with an
    empty split cell are in none), the one ``params`` names, or every row as "train"."""
    from mmkit.components import instantiate
    from mmkit.data.manifest import read_rows

    component = registry.get("datasets", "manifest")
    if "split" in params:
        splits = [params["split"]]
    else:
        column = params.get("split_column", "split")
        file_columns, rows = read_rows(Path(path), path)
        splits = ["train"] if column not in file_columns else \
            list(dict.fromkeys(row.cells[column] for row in rows if isinstance(row.cells.get(column), str)))
        splits = splits or ["train"]  # no row names a split: the manifest says so, for "train"
    return {str(split): instantiate(component, {**params, "path": path, "split": split}) for split in splits}


def manifest_params(overrides: Sequence[str], columns: Sequence[str]) -> dict[str, Any]:
    """A manifest's parameters from the command line: ``KEY=VALUE`` overrides (values read as
    in a recipe override) and ``--column KEY=COLUMN`` options, a key given twice listing columns."""
    from mmkit.recipe import parse_override

    params: dict[str, Any] = {}
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) > 1:
            raise MMKitError(f"override {text!r}: a manifest takes its parameters as KEY=VALUE "
                             "(split=val); map columns with --column KEY=COLUMN")
        params[keys[0]] = value
    mapping: dict[str, list[str]] = {}
    for text in columns:
        key, sep, column = text.partition("=")
        if not sep or not key.strip() or not column.strip():
            raise MMKitError(f"--column {text!r}: expected KEY=COLUMN, e.g. --column image=filepath")
        mapping.setdefault(key.strip(), []).append(column.strip())
    if mapping:
        if "columns" in params:
            raise MMKitError("give the columns either with --column or as columns=..., not both")
        params["columns"] = {key: names[0] if len(names) == 1 else names for key, names in mapping.items()}
    return params


def format_checks(checks: Mapping[str, Checked]) -> list[str]:
    """Each dataset's line (samples read, problems found) and, under a dataset with problems,
    a table of them by kind: the kind, how many, and the first few as one-line reports."""
    lines = []
    for name, checked in checks.items():
        count = len(checked.problems)
        found = "no problems" if not count else f"{count:,} problem{'s' if count > 1 else ''}"
        lines.append(f"{name}: {checked.read:,} sample{'s' if checked.read != 1 else ''} read, {found}")
        lines += problem_table(checked.problems)
    return lines


def problem_table(problems: list[SampleError]) -> list[str]:
    """Problems by kind, in SampleError.KINDS order, as indented rows of an aligned table."""
    if not problems:
        return []
    by_kind: dict[str, list[SampleError]] = {}
    for problem in problems:
        by_kind.setdefault(problem.kind, []).append(problem)
    kinds = [kind for kind in SampleError.KINDS if kind in by_kind]
    kind_width = max(len("kind"), *map(len, kinds))
    count_width = max(len("count"), *(len(f"{len(by_kind[kind]):,}") for kind in kinds))
    lines = [f"  {'kind':<{kind_width}}  {'count':>{count_width}}  first {SHOWN}"]
    for kind in kinds:
        for number, problem in enumerate(by_kind[kind][:SHOWN]):
            head = f"{kind:<{kind_width}}  {len(by_kind[kind]):>{count_width},}" if number == 0 else \
                " " * (kind_width + 2 + count_width)
            lines.append(f"  {head}  {problem.line()}")
    return lines
