"""manifest: samples listed in a CSV or JSONL file (image and audio paths, texts, labels)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import torch
from torch.utils.data import Dataset

from mmkit.data.read import MAX_IMAGE_PIXELS, Where, file_bytes, read_audio, read_image, read_text
from mmkit.errors import MMKitError
from mmkit.files import atomic_path
from mmkit.samples import UNCERTAIN, DatasetInfo

KEYS = ("id", "image", "audio", "text", "label")  # the sample keys a column of the same name gives
LISTABLE = ("image", "audio", "text")  # the keys that may take several columns, one sample each
SUFFIXES = (".csv", ".jsonl")
FILE_KEYS = {"image", "audio"}  # the keys whose cells name files; a sample's "files" lists them
WRITTEN = ("image", "text", "audio", "label", "split", "id")  # write_manifest's column order


@dataclass
class Row:
    """One row of a manifest: the line it starts on, its cells by column (None where empty or
    absent), and what is wrong with its shape, if anything."""

    line: int
    cells: dict[str, Any]
    problem: str | None = None


class Manifest(Dataset):
    """Samples listed in a CSV or JSONL file, one per row: image and audio files, texts, labels.

    Columns named like the sample keys (id, image, audio, text, label) are used as they are;
    ``columns`` maps other names (open_clip's CSV: ``columns = {image = "filepath", text =
    "title"}``), and a key that is none of those passes the row's raw cell through. One of
    image, audio or text may list several columns (COCO's five captions, two views of an
    image): a row then gives one sample per listed column that has a value, in the listed
    order, with the id "<row id>#<column>"; a row with none gives one sample, from the first
    column, that fails as missing. Without an id column a row's id is its line number. A sample
    with image or audio files also gives ``files``, their paths: rows of the same image (one
    caption per row, or several caption columns) are the same image to clip_retrieval.

    Labels are names or whole numbers (ints in JSONL, digits in CSV): a label that is one of
    ``classes`` is that class, otherwise a whole number indexes ``classes``. Unset, the classes
    are "0".."max" when every label in the file is a whole number, else the sorted label
    names; they are read from the rows of every split, so the splits of one file agree.
    Multi-label cells hold a JSON list or names joined by ``label_separator``; an empty cell
    means none of the classes. ``classes`` and ``multi_label`` are ignored without a label
    column. Bad samples raise SampleError when loaded, with the line the row starts on (a
    CSV's header is line 1); only a problem with the whole file stops construction.

    Chest X-ray layouts (CheXpert, MIMIC-CXR-JPG): ``label_columns`` names one column per
    finding, each cell 1 (present), 0 or empty (absent, or not mentioned) or -1 (uncertain),
    which becomes what ``uncertain`` says: "negative", "positive" or "ignore" (not known: left
    out of the loss and metrics). A file with -1 cells needs the policy set. Several image
    columns (frontal, lateral) give one sample each; ``join_text`` joins several text columns
    (findings, impression) into one report per row.

    Args:
        path: the .csv or .jsonl file; the paths in it are relative to its folder, or absolute.
        columns: sample key -> column name, or a list of columns giving one sample each.
        split: take the rows whose split column holds this; a file without one is all "train".
        split_column: the column naming each row's split.
        classes: class names in label index order; unset, read from the labels in the file.
        multi_label: each row has any number of labels, given as a float multi-hot vector.
        label_separator: what joins the names in a multi-label CSV cell, as in "cat|dog".
        max_image_pixels: larger images are bad samples ("image too large"), refused undecoded.
        label_columns: one column per finding (1, 0, empty or -1), giving multi-hot labels
            whose classes are these columns (``classes`` may rename them, in the same order).
        uncertain: what a -1 cell of ``label_columns`` becomes: "negative", "positive", or
            "ignore" (left out of the loss and metrics).
        join_text: when columns.text lists several columns, join a row's non-empty ones with
            this into one text (one sample per row) instead of one sample per column.
    """

    def __init__(self, path: str, columns: dict[str, str | list[str]] = {}, split: str = "train",
                 split_column: str = "split", classes: list[str] | None = None,
                 multi_label: bool = False, label_separator: str = "|",
                 max_image_pixels: int = MAX_IMAGE_PIXELS, label_columns: list[str] | None = None,
                 uncertain: Literal["negative", "positive", "ignore"] | None = None,
                 join_text: str | None = None):
        self.source = str(path)
        self.folder = Path(path).absolute().parent
        self.multi_label, self.label_separator = multi_label or bool(label_columns), label_separator
        self.max_image_pixels, self.label_columns, self.uncertain = max_image_pixels, label_columns, uncertain
        self.join_text = join_text
        check_options(self.source, columns, label_columns, uncertain, join_text)
        file_columns, rows = read_rows(Path(path), self.source)
        joined = "text" if join_text is not None else None  # its columns make one value, not one sample each
        self.columns = map_columns(columns, file_columns, self.source, joined)
        self.listed = next((key for key, value in self.columns.items() if isinstance(value, list) and key != joined),
                           None)
        self.samples = expand(select_split(rows, file_columns, split, split_column, self.source),
                              self.columns.get(self.listed))
        if label_columns is not None:
            self.class_names = finding_columns(label_columns, classes, "label" in self.columns, file_columns,
                                               self.source)
            check_uncertain(rows, label_columns, uncertain, self.source)
        else:
            self.class_names = self._classes(rows, classes)
        self.class_index = {name: index for index, name in enumerate(self.class_names)}
        labelled = "label" in self.columns or label_columns is not None
        label_kind = "none" if not labelled else "multi" if self.multi_label else "single"
        keys = (*(key for key in self.columns if key != "id"), *(("label",) if label_columns is not None else ()),
                *(("files",) if FILE_KEYS & set(self.columns) else ()))
        self.info = DatasetInfo(keys=("id", *keys), class_names=self.class_names, label_kind=label_kind)

    def _classes(self, rows: list[Row], classes: list[str] | None) -> tuple[str, ...]:
        """The class names: as given, or read from the label column of every row."""
        if "label" not in self.columns:
            return ()
        names = tuple(classes) if classes is not None else read_classes(
            rows, self.columns["label"], self.multi_label, self.label_separator)
        if classes is not None and not names:
            raise MMKitError(f"{self.source}: classes is empty; name the classes or leave it unset")
        if not names:
            raise MMKitError(f"{self.source}: column {self.columns['label']!r} (columns.label) holds no "
                             "labels; fill them in or set classes")
        if len(set(names)) < len(names):
            raise MMKitError(f"{self.source}: classes names a class twice ({list(names)}); name each once")
        return names

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, chosen = self.samples[index]
        where = Where(self.source, row.line)
        if row.problem:
            raise where.error("bad value", row.problem)
        sample, files = {"id": self._id(row, chosen)}, []
        for key, column in self.columns.items():
            if key != "id":
                cell = self._cell(row, key, column, chosen)
                sample[key] = self._value(key, cell, where)
                if key in FILE_KEYS:
                    files.append(os.path.normpath(self.folder / cell))
        if files:  # what a retrieval task compares to find rows of the same image (COCO's caption per row)
            sample["files"] = " + ".join(files)
        if self.label_columns is not None:
            sample["label"] = self._findings(row, where)
        return sample

    def _cell(self, row: Row, key: str, column: str | list[str], chosen: str | None) -> Any:
        """A key's cell: the sample's own column when the row gives several samples, the joined
        non-empty cells of joined text columns, else the column's."""
        if key == self.listed:
            return row.cells.get(chosen)
        if isinstance(column, list):  # joined text: the cells that hold something, each checked as text
            present = [row.cells[c] for c in column
                       if row.cells.get(c) is not None and not (isinstance(row.cells[c], str) and not row.cells[c].strip())]
            return present or None
        return row.cells.get(column)

    def _findings(self, row: Row, where: Where) -> torch.Tensor:
        """The multi-hot label of ``label_columns``: 1 present, 0 or empty absent, -1 uncertain
        (as the ``uncertain`` policy says)."""
        target = torch.zeros(len(self.label_columns))
        for index, column in enumerate(self.label_columns):
            value = finding_value(row.cells.get(column))
            if value is None:
                raise where.error("bad value", f"column {column!r} holds {row.cells.get(column)!r}; "
                                               "a finding is 1, 0, -1 (uncertain) or empty")
            target[index] = UNCERTAIN[self.uncertain] if value == -1 else value
        return target

    def _id(self, row: Row, chosen: str | None) -> str:
        """The id cell, or the row's line number; "#column" added when a row gives several samples."""
        value = row.cells.get(self.columns["id"]) if "id" in self.columns else None
        base = str(row.line if value is None else value)
        return base if chosen is None else f"{base}#{chosen}"

    def _value(self, key: str, value: Any, where: Where) -> Any:
        """One sample value from its cell: files decoded, text checked, labels indexed."""
        if key in ("image", "audio"):
            return self._read_file(key, value, where)
        if key == "text":
            return self.join_text.join(read_text(v, where) for v in value) if isinstance(value, list) \
                else read_text(value, where)
        if key == "label":
            return self._label(value, where)
        return value

    def _read_file(self, key: str, value: Any, where: Where) -> Any:
        """Decode the image or audio file a cell names, relative to the manifest's folder."""
        if value in (None, ""):
            raise where.error("missing file", f"the row names no {key} file")
        if not isinstance(value, str):
            raise where.error("bad value", f"expected the path of the {key} file, got {value!r}")
        where = Where(where.source, where.row, value)
        data = file_bytes(self.folder / value, where)
        return read_image(data, where, self.max_image_pixels) if key == "image" else read_audio(data, where)

    def _label(self, value: Any, where: Where) -> int | torch.Tensor:
        """A class index, or a multi-hot vector for multi-label data."""
        try:
            names = label_names(value, self.multi_label, self.label_separator)
        except ValueError as error:
            raise where.error("bad value", str(error)) from None
        indices = [self._class_index(name, where) for name in names]
        if self.multi_label:
            target = torch.zeros(len(self.class_names))
            target[indices] = 1.0
            return target
        if not indices:
            raise where.error("unknown label", "the row has no label")
        return indices[0]

    def _class_index(self, name: str, where: Where) -> int:
        """A class name's index, or a whole number taken as one."""
        if name in self.class_index:
            return self.class_index[name]
        if is_whole(name) and int(name) < len(self.class_names):
            return int(name)
        count = len(self.class_names)
        shown = ", ".join(self.class_names[:5]) + (", ..." if count > 5 else "")
        raise where.error("unknown label", f"{name!r} is not one of the {count} classes ({shown}) "
                                           f"nor a class index below {count}")


def read_rows(path: Path, source: str) -> tuple[list[str], list[Row]]:
    """A manifest's column names and rows; a file that cannot be read whole is an MMKitError."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise MMKitError(f"manifest {source}: unknown suffix {path.suffix!r}; write it as .csv or .jsonl")
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            columns, rows = (read_csv if suffix == ".csv" else read_jsonl)(file, source)
    except (FileNotFoundError, IsADirectoryError):
        raise MMKitError(f"manifest {source} not found; check the dataset's path") from None
    except UnicodeDecodeError as error:
        raise MMKitError(f"manifest {source} is not UTF-8 text ({error.reason} at byte {error.start}); "
                         "save it as UTF-8") from None
    if not rows:
        raise MMKitError(f"manifest {source} has no rows; list one sample per row")
    return columns, rows


def read_csv(file: IO[str], source: str) -> tuple[list[str], list[Row]]:
    """A CSV's header and rows; empty cells are None, and a row starts on the line after the
    previous one ended (a quoted cell may span lines)."""
    reader, start = csv.reader(file, strict=True), 1  # strict: a stray quote fails, not swallows later rows
    try:
        header = [name.strip() for name in next(reader, [])]
        if twice := next((name for name in header if header.count(name) > 1), None):
            raise MMKitError(f"manifest {source}: column {twice!r} appears twice in the header; rename one")
        rows, start = [], reader.line_num + 1
        for cells in reader:
            if cells:  # a blank line
                problem = None if len(cells) == len(header) else (
                    f"the row has {len(cells)} cells and the header {len(header)} (a comma in an unquoted value?)")
                rows.append(Row(start, {name: cell or None for name, cell in zip(header, cells)}, problem))
            start = reader.line_num + 1
    except csv.Error as error:
        raise MMKitError(f"manifest {source}: the row from line {start} to {reader.line_num} is not valid CSV "
                         f"({error}); check its quotes (a quote inside a quoted cell is written twice)") from None
    return header, rows


def read_jsonl(file: IO[str], source: str) -> tuple[list[str], list[Row]]:
    """A JSONL file's rows (one object per non-blank line) and every key they use."""
    rows = []
    for line, text in enumerate(file, 1):
        if text.strip():
            try:
                cells = json.loads(text)
            except json.JSONDecodeError as error:
                raise MMKitError(f"manifest {source}: line {line} is not JSON ({error.msg}); "
                                 "write one JSON object per line") from None
            if not isinstance(cells, dict):
                raise MMKitError(f"manifest {source}: line {line} holds a {type(cells).__name__}, "
                                 "not a JSON object; write one object per line")
            rows.append(Row(line, cells))
    return list(dict.fromkeys(key for row in rows for key in row.cells)), rows


def map_columns(columns: dict[str, str | list[str]], file_columns: list[str], source: str,
                joined: str | None = None) -> dict[str, str | list[str]]:
    """Sample key -> column(s): the sample keys in KEYS order, then the keys passed through;
    the ``joined`` key's columns are joined into one value, not one sample each."""
    for key, value in columns.items():
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(name, str) for name in names):
            raise MMKitError(f"{source}: columns.{key} = {value!r}; give a column name or a list of them")
        if isinstance(value, list) and key not in LISTABLE:
            raise MMKitError(f"{source}: columns.{key} lists several columns; only "
                             f"{', '.join(LISTABLE)} can, give {key} one")
        if missing := next((name for name in names if name not in file_columns), None):
            raise MMKitError(f"{source}: columns.{key} names {missing!r}, not a column of the file "
                             f"(it has {', '.join(file_columns)}); fix columns.{key}")
    if len(listed := [key for key, value in columns.items() if isinstance(value, list) and key != joined]) > 1:
        raise MMKitError(f"{source}: columns.{listed[0]} and columns.{listed[1]} both list several "
                         "columns; only one key can")
    mapping = {key: columns.get(key, key) for key in KEYS if key in columns or key in file_columns}
    mapping.update(columns)
    if not set(mapping) & set(LISTABLE):
        raise MMKitError(f"{source}: no image, audio or text column (it has {', '.join(file_columns)}); "
                         'map yours with columns, e.g. columns = {image = "filepath", text = "title"}')
    return mapping


def check_options(source: str, columns: dict[str, Any], label_columns: list[str] | None, uncertain: str | None,
                  join_text: str | None) -> None:
    """The chest X-ray options make sense together (a recipe checks their types; Python callers too)."""
    if uncertain is not None and uncertain not in UNCERTAIN:
        raise MMKitError(f"{source}: uncertain = {uncertain!r}; use one of {', '.join(map(repr, UNCERTAIN))}")
    if uncertain is not None and label_columns is None:
        raise MMKitError(f"{source}: uncertain applies to label_columns (-1 cells); name them, or remove uncertain")
    if join_text is not None and not isinstance(columns.get("text"), list):
        raise MMKitError(f"{source}: join_text joins the text columns that columns.text lists; list them, "
                         "e.g. text = [\"findings\", \"impression\"], or remove join_text")


def finding_columns(label_columns: list[str], classes: list[str] | None, has_label: bool,
                    file_columns: list[str], source: str) -> tuple[str, ...]:
    """The class names of ``label_columns`` (the columns, or ``classes`` naming them), checked."""
    if has_label:
        raise MMKitError(f"{source}: both a label column and label_columns; keep one")
    if not label_columns:
        raise MMKitError(f"{source}: label_columns is empty; name one column per finding")
    if missing := [name for name in label_columns if name not in file_columns]:
        raise MMKitError(f"{source}: label_columns names {missing[0]!r}, not a column of the file "
                         f"(it has {', '.join(file_columns)}); fix label_columns")
    names = tuple(classes) if classes is not None else tuple(label_columns)
    if len(names) != len(label_columns) or len(set(names)) < len(names):
        raise MMKitError(f"{source}: classes gives {len(names)} names for {len(label_columns)} label_columns; "
                         "name each column once, in order, or leave classes unset")
    return names


def finding_value(cell: Any) -> int | None:
    """A finding cell as 1, 0 (also empty) or -1; None for anything else."""
    if cell is None or cell == "":
        return 0
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return int(value) if value in (1.0, 0.0, -1.0) and not isinstance(cell, bool) else None


def check_uncertain(rows: list[Row], label_columns: list[str], uncertain: str | None, source: str) -> None:
    """A file with uncertain (-1) findings needs a policy for them; say where the first one is."""
    if uncertain is not None:
        return
    found = [(row, column) for row in rows for column in label_columns if finding_value(row.cells.get(column)) == -1]
    if found:
        row, column = found[0]
        raise MMKitError(f"{source}: {len(found)} uncertain findings (-1), the first in row {row.line}, "
                         f"column {column!r}; set uncertain to \"negative\", \"positive\" or \"ignore\" "
                         "(left out of the loss and metrics)")


def select_split(rows: list[Row], file_columns: list[str], split: str, split_column: str,
                 source: str) -> list[Row]:
    """The rows of one split; a file without a split column holds only "train"."""
    if split_column not in file_columns:
        if split == "train":
            return rows
        raise MMKitError(f"{source}: no {split_column!r} column, so no {split!r} split; give [data.val] "
                         f"its own path, or add a {split_column!r} column to the file")
    chosen = [row for row in rows if split_cell(row, split_column) == split]
    if not chosen:
        found = sorted({str(split_cell(row, split_column)) for row in rows})
        raise MMKitError(f"{source}: no row has {split_column} = {split!r} (it holds {', '.join(found)}); "
                         "set split to one of those")
    return chosen


def split_cell(row: Row, split_column: str) -> Any:
    """A row's split, stripped: a spreadsheet's "train " is still train."""
    cell = row.cells.get(split_column)
    return cell.strip() if isinstance(cell, str) else cell


def expand(rows: list[Row], listed: str | list[str] | None) -> list[tuple[Row, str | None]]:
    """(row, column) per sample: a row gives one sample per listed column that has a value."""
    if not isinstance(listed, list):
        return [(row, None) for row in rows]
    samples = []
    for row in rows:
        present = [column for column in listed if row.cells.get(column) not in (None, "")]
        samples += [(row, column) for column in present or listed[:1]]
    return samples


def label_names(value: Any, multi_label: bool, separator: str) -> list[str]:
    """A label cell's labels as text (none for an empty cell); ValueError if it holds none."""
    if value is None:
        return []
    if multi_label and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"the label list is not JSON ({error.msg})") from None
    if multi_label and isinstance(value, str):
        return [name.strip() for name in value.split(separator) if name.strip()]
    values = value if multi_label and isinstance(value, list) else [value]
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"expected label names or whole numbers, got {value!r}")
    return [str(v).strip() for v in values]


def read_classes(rows: list[Row], column: str, multi_label: bool, separator: str) -> tuple[str, ...]:
    """Class names from every row's labels: "0".."max" if all are whole numbers, else sorted."""
    names: set[str] = set()
    for row in rows:
        if not row.problem:
            with contextlib.suppress(ValueError):  # refused as a bad value when its sample loads
                names.update(name for name in label_names(row.cells.get(column), multi_label, separator) if name)
    if names and all(map(is_whole, names)):
        return tuple(str(index) for index in range(max(map(int, names)) + 1))
    return tuple(sorted(names))


def is_whole(text: str) -> bool:
    """Whether a label is written as a whole number (ASCII digits only)."""
    return text.isascii() and text.isdigit()


def write_manifest(samples: Iterable[dict[str, Any]], path: str | Path,
                   class_names: Sequence[str] = ()) -> Path:
    """Write samples as a manifest (CSV or JSONL, by suffix) and the files it lists.

    Images go as JPEG under images/<stem>/ and audio as float WAV under audio/<stem>/, next
    to the manifest (its stem, so train.csv and val.csv in one folder keep their own files);
    texts, labels (class names when ``class_names`` is given, else indices; a multi-hot label
    as a list), splits, ids and any other keys go in its cells. The manifest is written last,
    synced and renamed into place, so a failed write leaves none."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"write_manifest writes .csv or .jsonl files, not {path.suffix!r}")
    rows = [manifest_cells(sample, index, path, class_names) for index, sample in enumerate(samples)]
    keys = dict.fromkeys(key for row in rows for key in row)
    columns = [key for key in WRITTEN if key in keys] + [key for key in keys if key not in WRITTEN]
    with atomic_path(path) as partial, partial.open("w", encoding="utf-8", newline="") as file:
        if path.suffix.lower() == ".csv":
            writer = csv.DictWriter(file, columns)
            writer.writeheader()
            writer.writerows({key: "|".join(map(str, v)) if isinstance(v, list) else v for key, v in row.items()}
                             for row in rows)
        else:
            file.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def manifest_cells(sample: dict[str, Any], index: int, manifest: Path, class_names: Sequence[str]) -> dict[str, Any]:
    """One sample as cells of ``manifest``, writing its image and audio files beside it, in
    images/<manifest's stem>/ and audio/<stem>/ (so manifests sharing a folder keep theirs)."""
    import soundfile

    cells, folder = dict(sample), manifest.parent
    if "image" in sample:
        cells["image"] = f"images/{manifest.stem}/{index:06d}.jpg"
        (folder / cells["image"]).parent.mkdir(parents=True, exist_ok=True)
        sample["image"].convert("RGB").save(folder / cells["image"], "JPEG", quality=95)
    if "audio" in sample:
        cells["audio"] = f"audio/{manifest.stem}/{index:06d}.wav"
        (folder / cells["audio"]).parent.mkdir(parents=True, exist_ok=True)
        wave = sample["audio"]
        soundfile.write(folder / cells["audio"], wave.samples.detach().cpu().numpy().T, wave.sample_rate,
                        subtype="FLOAT")
    if "label" in sample:
        if isinstance(sample["label"], torch.Tensor) and sample["label"].isnan().any():
            raise MMKitError(f"write_manifest {manifest}: sample {index} ({sample.get('id', 'no id')}) has "
                             "uncertain (NaN) findings, which a label cell cannot hold; read its dataset with "
                             'uncertain = "negative" or "positive" to write it')
        cells["label"] = label_cell(sample["label"], class_names)
    return cells


def label_cell(label: int | torch.Tensor, class_names: Sequence[str]) -> Any:
    """A label as written: its class name (or index), a list of them for a multi-hot vector."""
    if isinstance(label, torch.Tensor) and label.ndim == 1:
        return [label_cell(int(index), class_names) for index in label.nonzero().flatten()]
    return class_names[label] if class_names else int(label)
