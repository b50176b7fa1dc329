"""The full training state of a Trainer, in memory and on disk (a directory written atomically)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


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
        save_file(self.weights, str(tmp / "model.safetensors"))
        rest = {
            "optimizer": self.optimizer,
            "rng": self.rng,
            "cursors": self.cursors,
            "step": self.step,
            "num_tokens": self.num_tokens,
            "history": self.history,
        }
        torch.save(rest, tmp / "trainer.pt")
        if path.exists():
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> TrainState:
        """Read a state written by `save`."""
        path = Path(path)
        weights = load_file(str(path / "model.safetensors"), device=str(device))
        rest = torch.load(path / "trainer.pt", map_location=device, weights_only=True)
        # RNG states must stay CPU byte tensors whatever the map_location.
        rest["rng"] = {k: v.cpu() for k, v in rest["rng"].items()}
        rest["cursors"] = {k: tuple(v) for k, v in rest["cursors"].items()}
        return cls(weights=weights, **rest)
