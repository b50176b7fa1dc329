"""Bounded store of training states: the newest `max_in_memory` in RAM, older ones on disk.

The env's save_state handles hold only a key into this store; when a handle is garbage collected
its entry (in memory or on disk) is freed, so memory is bounded by the store, not by the caller.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any


class StateStore:
    """Key -> payload, least recently used spilled to `directory` beyond `max_in_memory`."""

    def __init__(
        self,
        max_in_memory: int,
        save: Callable[[Any, Path], None],
        load: Callable[[Path], Any],
        directory: str | None = None,
    ) -> None:
        if max_in_memory < 0:
            raise ValueError(f"max_states_in_memory must be >= 0, got {max_in_memory}")
        self.max_in_memory = max_in_memory
        self._save, self._load = save, load
        self._memory: OrderedDict[int, Any] = OrderedDict()  # oldest first
        self._disk: dict[int, Path] = {}
        self._next = 0
        self._user_dir = directory
        self._dir: Path | None = None
        self._cleanup: weakref.finalize | None = None

    def _directory(self) -> Path:
        # Created on first spill, removed on close() or when the store is collected.
        if self._dir is None:
            if self._user_dir is not None:
                Path(self._user_dir).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="llmzero-states-", dir=self._user_dir))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def put(self, payload: Any) -> int:
        """Store a payload (the store owns it from now on); returns its key."""
        key = self._next
        self._next += 1
        self._memory[key] = payload
        self._spill()
        return key

    def get(self, key: int) -> Any:
        """The payload of `key` (read back from disk if it was spilled); do not mutate it."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if key not in self._disk:
            raise KeyError(f"state {key} is no longer in the store (it was dropped or closed)")
        payload = self._load(self._disk[key])
        if self.max_in_memory > 0:  # promote: a state just loaded is likely to be loaded again
            shutil.rmtree(self._disk.pop(key), ignore_errors=True)
            self._memory[key] = payload
            self._spill()
        return payload

    def drop(self, key: int) -> None:
        """Free an entry; unknown keys are ignored (a handle may outlive a closed store)."""
        self._memory.pop(key, None)
        path = self._disk.pop(key, None)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def _spill(self) -> None:
        while len(self._memory) > self.max_in_memory:
            key, payload = self._memory.popitem(last=False)
            path = self._directory() / f"state-{key}"
            self._save(payload, path)
            self._disk[key] = path

    def __contains__(self, key: int) -> bool:
        return key in self._memory or key in self._disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    @property
    def num_in_memory(self) -> int:
        return len(self._memory)

    @property
    def num_on_disk(self) -> int:
        return len(self._disk)

    def close(self) -> None:
        """Free every entry and remove the spill directory."""
        self._memory.clear()
        self._disk.clear()
        if self._cleanup is not None:
            self._cleanup()
        self._dir = None
