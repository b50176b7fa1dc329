"""The full training state of a Trainer, in memory and on disk (a directory written atomically).

On disk a state is a folder: `model.safetensors` (the weights), `trainer.pt` (optimizer moments,
RNG states, cursors, counters, history: tensors and plain Python values only, read back with
`weights_only=True`) and `manifest.json`, the sha256 of each of the two. `TrainState.load`
checks every digest before it reads a byte of tensor data: a file that changed, is missing or
cannot be read is refused with a CorruptStateError naming it, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

WEIGHTS, TRAINER, MANIFEST = "model.safetensors", "trainer.pt", "manifest.json"
MANIFEST_FORMAT = 1


class CorruptStateError(ValueError):
    """A saved state that cannot be trusted: a file is missing, changed since it was saved, or
    unreadable. The message names the file; nothing of the state was loaded."""


def sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class TrainState:
    """Everything needed to resume training bit-identically; holds its own copies of all tensors."""

    weights: dict[str, Tensor]  # policy parameters and buffers (tied weights stored once)
    optimizer: dict  # {"state": {param_index: {name: tensor}}, "param_groups": [hparams]}
    rng: dict[str, Tensor]  # generator states: "sample", "cpu", "torch" (global CPU), "cuda"
    cursors: dict[str, tuple[int, int]]  # train difficulty -> (epoch, position in epoch)
    step: int
    num_tokens: int
    history: list[dict[str, float]] = field(default_factory=list)

    def save(self, path: str | os.PathLike) -> None:
        """Write directory `path` via a temporary sibling and a rename: never half written."""
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(self.weights, str(tmp / WEIGHTS))
        rest = {
            "optimizer": self.optimizer,
            "rng": self.rng,
            "cursors": self.cursors,
            "step": self.step,
            "num_tokens": self.num_tokens,
            "history": self.history,
        }
        torch.save(rest, tmp / TRAINER)
        digests = {name: sha256(tmp / name) for name in (WEIGHTS, TRAINER)}
        (tmp / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "sha256": digests}))
        if path.exists():
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> TrainState:
        """Read a state written by `save`, after checking each file against its digest."""
        path = Path(path)
        verify(path)
        try:
            weights = load_file(str(path / WEIGHTS), device=str(device))
        except (SafetensorError, OSError) as err:
            raise CorruptStateError(f"{path / WEIGHTS} cannot be read ({err})") from None
        try:
            rest = torch.load(path / TRAINER, map_location=device, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            raise CorruptStateError(f"{path / TRAINER} cannot be read ({_reason(err)})") from None
        # RNG states must stay CPU byte tensors whatever the map_location.
        rest["rng"] = {k: v.cpu() for k, v in rest["rng"].items()}
        rest["cursors"] = {k: tuple(v) for k, v in rest["cursors"].items()}
        return cls(weights=weights, **rest)


def verify(path: Path) -> None:
    """CorruptStateError naming the first file of the state folder `path` that is missing or
    no longer matches the digest its manifest recorded."""
    if not path.is_dir():
        raise CorruptStateError(f"{path} is not a saved state (no such folder)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        digests = manifest["sha256"]
        if not isinstance(digests, dict):
            raise TypeError("'sha256' is not a mapping")
    except FileNotFoundError:
        raise CorruptStateError(f"{path / MANIFEST} is missing: the state carries no digest "
                                "of its files, so it is not loaded") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptStateError(f"{path / MANIFEST} cannot be read ({err})") from None
    for name in (WEIGHTS, TRAINER):
        file = path / name
        if name not in digests:
            raise CorruptStateError(f"{path / MANIFEST} records no digest for {name}")
        if not file.is_file():
            raise CorruptStateError(f"{file} is missing")
        if sha256(file) != digests[name]:
            raise CorruptStateError(f"{file} does not match the sha256 recorded when the state "
                                    "was saved: it changed on disk, so it is not loaded")


def _reason(err: Exception) -> str:
    """What torch.load found wrong, without its advice to retry with weights_only=False: that
    would run whatever code a tampered file holds."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        details = (line.split("WeightsUnpickler error:")[-1].strip() for line in lines[1:]
                   if "weights_only" not in line)
        detail = next((d for d in details if d), "")
        return "it holds more than tensors and plain values" + (f": {detail}" if detail else "")
    return lines[0] if lines and "weights_only" not in lines[0] else type(err).__name__
