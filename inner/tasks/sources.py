"""Paper-scale data: the rows of a real dataset, from the Hugging Face hub or from local files.

A local `data_path` is a file (used as the train split) or a folder holding, per split, files
named `train.jsonl`, `train-00000.parquet`, ... or a sub-folder `train/` of such files
(`dev` may also be called `validation`); columns as in the hub dataset. A split the source lacks
(e.g. dev, or test for Countdown) is carved from a seeded shuffle of train; the Task base class
then removes every dev/test prompt from train. Nothing here runs at import time.

Every row is checked against its task's schema (a pydantic model) as it is read: an empty or
unreadable file, a row that lacks a field or holds a wrong type is a DataError that names the
file, the line (JSON lines) or row, and the field.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CARVED = 500  # rows per split carved from train when the source has no dev/test split
ALIASES = {"train": ("train",), "dev": ("dev", "validation", "val"), "test": ("test",)}
_ROW = "__row__"  # a carved row's index in train, so that an error can name its file and line


class DataError(ValueError):
    """A data file or hub dataset that cannot be used; the message names the file, the line or
    row, and the field."""


class Schema(pydantic.BaseModel):
    """Base of a task's row schema: exact types (no "12" for 12), other columns ignored."""

    model_config = pydantic.ConfigDict(strict=True, extra="ignore")


@dataclass(frozen=True)
class HubSplit:
    """Where one split lives on the hub: `load_dataset(path, name, split=, data_files=)`."""

    path: str
    name: str | None = None
    split: str = "train"
    data_files: str | None = None


@dataclass(frozen=True)
class Source:
    """The rows of one local file or one hub split, and how an error names it."""

    data: Any  # a datasets.Dataset
    name: str
    path: Path | None = None  # a local file

    def where(self, row: int) -> str:
        """`row` (0-based) as a reader finds it: the file's line for JSON lines, else the row."""
        line = _line_of(self.path, row) if self.path is not None else None
        at = f"line {line} (row {row + 1})" if line is not None else f"row {row + 1}"
        return f"{self.name} {at}"


def local_files(data_path: str | Path, split: str) -> list[Path]:
    """The data files of `split` under `data_path` (see the module docstring)."""
    root = Path(data_path)
    if root.is_file():
        return [root] if split == "train" else []
    if not root.is_dir():
        raise FileNotFoundError(f"data_path {root} does not exist")
    files: list[Path] = []
    for alias in ALIASES[split]:
        for f in sorted(root.iterdir()):
            stem = f.name.split(".")[0]
            named = stem == alias or stem.startswith(alias + "-")
            if f.is_file() and f.suffix in FORMATS and named:
                files.append(f)
        if (root / alias).is_dir():
            files += sorted(f for f in (root / alias).rglob("*") if f.suffix in FORMATS)
    return files


def read_split(split: str, data_path: str | Path | None,
               hub: dict[str, HubSplit]) -> list[Source] | None:
    """The sources of `split`, from local files or the hub, or None if there is none."""
    from datasets import load_dataset  # imported here: only the paper scale needs it

    if data_path is not None:
        files = local_files(data_path, split)
        if not files:
            return None
        kinds = {FORMATS[f.suffix] for f in files}
        if len(kinds) != 1:
            raise DataError(f"mixed file formats for split {split}: {[str(f) for f in files]}")
        return [read_file(f) for f in files]
    if split not in hub:
        return None
    h = hub[split]
    data = load_dataset(h.path, h.name, split=h.split, data_files=h.data_files)
    name = f"hub dataset {h.path}" + (f" ({h.name})" if h.name else "") + f" split {h.split}"
    return [Source(data, name)]


def read_file(path: Path) -> Source:
    """One local file as a Source; DataError naming the file (and line) if it cannot be read."""
    from datasets import load_dataset

    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    kind = FORMATS[path.suffix]
    try:
        data = load_dataset(kind, data_files=[str(path)], split="train")
    except Exception as err:  # datasets wraps the reader's error (ArrowInvalid, ...) or not
        raise DataError(f"{path}: {_unreadable(path, kind, err)}") from None
    if len(data) == 0:
        raise DataError(f"{path}: the file holds no rows")
    return Source(data, str(path), path)


def _unreadable(path: Path, kind: str, err: Exception) -> str:
    """Why a file could not be read: its first line that is not JSON, else the reader's words."""
    if kind == "json":
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if not text.lstrip().startswith("["):  # JSON lines (a JSON array is one value)
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    if line.strip():
                        json.loads(line)
                except json.JSONDecodeError as bad:
                    return f"line {number} is not valid JSON ({bad.msg}, column {bad.colno})"
    cause = err.__cause__ or err
    return f"cannot be read as {kind} ({type(cause).__name__}: {str(cause)[:200]})"


def _line_of(path: Path, row: int) -> int | None:
    """The 1-based line of the `row`-th record of a JSON lines file (blank lines are skipped);
    None for other files, and for a JSON array, whose rows have no lines of their own."""
    if FORMATS[path.suffix] != "json":
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        return None
    records = [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    return records[row] if row < len(records) else None


def checked(row: dict, schema: type[Schema], source: Source, index: int) -> dict:
    """`row` if it fits `schema`; DataError naming the file, line or row, and field otherwise.

    Missing fields are read as None by `datasets` (the union of the file's columns); a None
    is therefore "missing", unless the schema allows None there.
    """
    present = {k: v for k, v in row.items() if v is not None}
    try:
        schema.model_validate(present)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        if first["type"] == "missing":
            what = f"lacks the field {field!r}"
        else:
            value = repr(first.get("input"))
            value = value if len(value) <= 60 else value[:57] + "..."
            said = first["msg"].removeprefix("Value error, ")  # a schema's own check
            what = f"field {field!r}: {said} (got {value})" if field else said
        raise DataError(f"{source.where(index)}: {what}") from None
    return row


def rows(split: str, data_path: str | Path | None, hub: dict[str, HubSplit], seed: int,
         schema: type[Schema]) -> Iterator[dict]:
    """The rows of `split`, each checked against `schema`; a missing dev or test split is a
    seeded slice of shuffled train."""
    sources = read_split(split, data_path, hub)
    if sources is not None:
        for source in sources:
            for index, row in enumerate(source.data):
                yield checked(row, schema, source, index)
        return
    yield from _carved(split, data_path, hub, seed, schema)


def _carved(split: str, data_path: str | Path | None, hub: dict[str, HubSplit], seed: int,
            schema: type[Schema]) -> Iterator[dict]:
    from datasets import concatenate_datasets

    train = read_split("train", data_path, hub)
    if train is None:
        raise FileNotFoundError(f"no train data found (data_path={data_path})")
    try:
        data = concatenate_datasets([s.data for s in train])  # the rows in file order
    except ValueError as err:
        raise DataError(f"the train files {[s.name for s in train]} differ in their columns or "
                        f"types ({err})") from None
    # dev and test come from disjoint windows of one permutation; the Task base class then
    # drops their prompts from train.
    window = min(CARVED, len(data) // 4)  # a small local file keeps half its rows for train
    if window == 0:
        raise DataError(f"{', '.join(s.name for s in train)}: {len(data)} train rows, too few "
                        f"to carve a {split} split from (a quarter of train each for dev and "
                        "test); add rows or a file for it")
    start = {"dev": 0, "test": window}[split]
    # The permutation depends only on the length and the seed: the added index column keeps
    # each carved row's place in its file.
    picked = data.add_column(_ROW, list(range(len(data)))).shuffle(seed=seed)
    starts = list(itertools.accumulate((len(s.data) for s in train[:-1]), initial=0))
    for row in picked.select(range(start, start + window)):
        at = row.pop(_ROW)
        i = bisect.bisect_right(starts, at) - 1
        yield checked(row, schema, train[i], at - starts[i])
