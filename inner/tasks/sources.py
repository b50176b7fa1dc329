"""Paper-scale data: the rows of a real dataset, from the Hugging Face hub or from local files.

A local `data_path` is a file (used as the train split) or a folder holding, per split, files
named `train.jsonl`, `train-00000.parquet`, ... or a sub-folder `train/` of such files
(`dev` may also be called `validation`); columns as in the hub dataset. A split the source lacks
(e.g. dev, or test for Countdown) is carved from a seeded shuffle of train; the Task base class
then removes every dev/test prompt from train. Nothing here runs at import time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CARVED = 500  # rows per split carved from train when the source has no dev/test split
ALIASES = {"train": ("train",), "dev": ("dev", "validation", "val"), "test": ("test",)}


@dataclass(frozen=True)
class HubSplit:
    """Where one split lives on the hub: `load_dataset(path, name, split=, data_files=)`."""

    path: str
    name: str | None = None
    split: str = "train"
    data_files: str | None = None


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


def read_split(split: str, data_path: str | Path | None, hub: dict[str, HubSplit]):
    """The `datasets.Dataset` of `split` from local files or the hub, or None if there is none."""
    from datasets import load_dataset  # imported here: only the paper scale needs it

    if data_path is not None:
        files = local_files(data_path, split)
        if not files:
            return None
        kinds = {FORMATS[f.suffix] for f in files}
        if len(kinds) != 1:
            raise ValueError(f"mixed file formats for split {split}: {[str(f) for f in files]}")
        return load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    if split not in hub:
        return None
    h = hub[split]
    return load_dataset(h.path, h.name, split=h.split, data_files=h.data_files)


def rows(
    split: str, data_path: str | Path | None, hub: dict[str, HubSplit], seed: int
) -> Iterable[dict]:
    """The rows of `split`; a missing dev or test split is a seeded slice of shuffled train."""
    ds = read_split(split, data_path, hub)
    if ds is not None:
        return ds
    train = read_split("train", data_path, hub)
    if train is None:
        raise FileNotFoundError(f"no train data found (data_path={data_path})")
    # dev and test come from disjoint windows of one permutation; the Task base class then
    # drops their prompts from train.
    train = train.shuffle(seed=seed)
    window = min(CARVED, len(train) // 4)  # a small local file keeps half its rows for train
    start = {"dev": 0, "test": window}[split]
    return train.select(range(start, start + window))
