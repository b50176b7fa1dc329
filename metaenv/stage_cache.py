"""A disk cache of trained stages, keyed by the path that led to them from the base model.

The state after a stage is a function of the env's configuration, the seed and the sequence of
stage settings since the base model (training is deterministic on CPU). So a leaderboard whose
controllers, worker processes and transfer replays share a prefix of stages (every search starts
with the default stage; fixed's schedule is grid's first design point) need train it only once:
the first env to train a path writes the state and the stage's result here, every later env with
the same key loads them instead of training.

A hit is charged to the env's budget exactly as the stage was when it was trained: one stage, its
tokens, and the seconds its training took then. `CacheStats` counts hits, misses and the wall
seconds saved (recorded training seconds minus the seconds the load took).

Entries are grouped by task and seed (`stage_group`), so that the entries of a finished seed can
be dropped as a group (`StageCache.drop`). They are directories written under a temporary name
and renamed into place, so a reader never sees half an entry, and two processes writing the same
key at once both succeed (the second rename loses and its copy is dropped). The state's files
carry their sha256 (inner.state) and the result file its own; an entry that fails a check (a
truncated or changed file) is removed and counted as a miss, so the stage is trained again, never
loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import inner
import inner.base_model
from inner.state import CorruptStateError, TrainState, sha256
from inner.trainer import EvalResult, StageResult

RESULT, RESULT_DIGEST, STATE = "result.json", "result.sha256", "state"


@dataclass
class CacheStats:
    """What one env's cache did: stages loaded, stages trained, wall seconds saved, bad entries."""

    hits: int = 0
    misses: int = 0
    seconds_saved: float = 0.0
    broken: int = 0  # entries refused by the digest check (then trained again)


def code_fingerprint() -> str:
    """sha256 of the training code (every source file of `inner`): a changed trainer, loss,
    sampler or task invalidates every entry, whatever the version number says."""
    if not _CODE:
        root = Path(inner.__file__).parent
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
        _CODE.append(h.hexdigest())
    return _CODE[0]


_CODE: list[str] = []


def model_fingerprint(model: str | None) -> str:
    """The base model's identity: the sha256 of its weight files where they are on this disk
    (the shipped model, a local folder), else its hub id."""
    folder = Path(inner.base_model.ASSETS if model is None else model)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not folder.is_dir() or not files:
        return str(model)
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + sha256(path).encode())
    return h.hexdigest()


def stage_group(task: str, seed: int) -> str:
    """The folder of a task and seed's entries: a key holds the seed, so once every run of a
    seed has finished its entries are never hit again, and the harness drops the folder
    (an entry is ~4x the weights: ~10 MB at 0.84M parameters, ~7 GB per seed of the standard
    preset if kept)."""
    return f"{task}/seed{seed}"


def stage_key(fingerprint: dict[str, Any], seed: int, path: list[dict[str, Any]]) -> str:
    """The cache key of the stage at the end of `path` (full stage settings from the base)."""
    text = json.dumps({"env": fingerprint, "seed": seed, "path": path}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class StageCache:
    """Trained stages on disk under `directory`, one subdirectory per key."""

    def __init__(self, directory: str | os.PathLike, stats: CacheStats | None = None) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"stage_cache: cannot create directory {str(directory)!r}: {err}") \
                from err
        if not os.access(self.directory, os.W_OK):
            raise ValueError(f"stage_cache: directory {str(directory)!r} is not writable")
        # The env passes its Budget's, so the budget reads the counts, never a copy of them.
        self.stats = stats if stats is not None else CacheStats()

    def _entry(self, key: str, group: str) -> Path:
        return self.directory / group / key[:2] / key

    def get(self, key: str, group: str, device: str = "cpu"
            ) -> tuple[TrainState, StageResult] | None:
        """The cached state and stage result of `key` in `group`, or None (a miss, counted as
        such)."""
        start = time.perf_counter()
        entry = self._entry(key, group)
        loaded = None
        if entry.is_dir():
            try:
                loaded = self._read(entry, device)
            except (OSError, ValueError, KeyError, TypeError) as err:  # CorruptStateError too
                self.stats.broken += 1
                print(f"stage cache: entry {entry} is broken ({err}); training the stage again",
                      flush=True)
                shutil.rmtree(entry, ignore_errors=True)
        if loaded is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.seconds_saved += loaded[1].seconds - (time.perf_counter() - start)
        return loaded

    def put(self, key: str, group: str, state: TrainState, result: StageResult) -> None:
        """Write an entry atomically; a concurrent writer of the same key is harmless."""
        entry = self._entry(key, group)
        if entry.is_dir():
            return
        tmp = entry.with_name(f".{key}.tmp-{uuid.uuid4().hex}")
        try:
            tmp.mkdir(parents=True)
            state.save(tmp / STATE)
            (tmp / RESULT).write_text(json.dumps(_result_to_json(result)))
            (tmp / RESULT_DIGEST).write_text(sha256(tmp / RESULT))
            os.rename(tmp, entry)  # atomic; fails if another process got there first
        except OSError:
            if not entry.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def drop(self, group: str) -> None:
        """Delete every entry of `group`; for a group that no env writes any more (the harness
        drops a seed's group once every run of that seed has finished)."""
        shutil.rmtree(self.directory / group, ignore_errors=True)

    def _read(self, entry: Path, device: str) -> tuple[TrainState, StageResult]:
        if sha256(entry / RESULT) != (entry / RESULT_DIGEST).read_text().strip():
            raise CorruptStateError(f"{entry / RESULT} does not match its recorded sha256")
        result = _result_from_json(json.loads((entry / RESULT).read_text()))
        state = TrainState.load(entry / STATE, device=device)  # checks its own digests
        return state, result


def _result_to_json(result: StageResult) -> dict[str, Any]:
    out = asdict(result)
    out["failure"] = None if result.failure is None else str(result.failure)
    return out


def _result_from_json(data: dict[str, Any]) -> StageResult:
    evaluation = data.get("evaluation")
    if data.get("failure") is not None:
        raise ValueError("a failed stage is never cached")
    return StageResult(
        metrics=data["metrics"], failure=None, num_tokens=int(data["num_tokens"]),
        seconds=float(data["seconds"]),
        evaluation=None if evaluation is None else EvalResult(**{
            **evaluation, "by_level": {int(k): v for k, v in evaluation["by_level"].items()}}),
    )
