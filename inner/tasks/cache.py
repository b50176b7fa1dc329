"""On-disk cache of generated embedded examples (reasoning-gym's countdown costs ~6 ms an item).

It keeps plain JSON rows (the task turns them back into `Example`s), so it needs nothing of the
tasks package.

The key hashes everything the examples depend on: the caller's parameters, the reasoning-gym
version, the source of the built-in task modules and that of the task's own module (a user's task
lives elsewhere), so an edited generator never reads stale data.
The folder is $LLMZERO_CACHE or ~/.cache/llmzero_gym; LLMZERO_CACHE=off disables the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import reasoning_gym

_SOURCES = Path(__file__).parent


def cache_dir() -> Path | None:
    """The cache folder, or None when caching is off."""
    value = os.environ.get("LLMZERO_CACHE", str(Path.home() / ".cache" / "llmzero_gym"))
    return None if value.lower() in ("", "0", "off", "none") else Path(value) / "tasks"


def _code_hash(source: Path) -> str:
    digest = hashlib.sha1(reasoning_gym.__version__.encode())
    for f in [*sorted(_SOURCES.glob("*.py")), source]:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


Row = dict[str, Any]


def cached(name: str, params: dict, build: Callable[[], list[Row]], source: Path) -> list[Row]:
    """`build()`'s JSON rows, read from / written to the cache under a key of `name`, `params`
    and the code (`source`: the file of the task's module)."""
    folder = cache_dir()
    if folder is None:
        return build()
    code = _code_hash(source)
    key = hashlib.sha1(json.dumps([params, code], sort_keys=True).encode()).hexdigest()
    path = folder / f"{name}-{key[:20]}.json"
    if path.exists():
        try:
            rows = json.loads(path.read_text())
            if isinstance(rows, list) and all(isinstance(row, dict) for row in rows):
                return rows
        except (OSError, ValueError):
            pass  # a damaged file: rebuild and overwrite it
    rows = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Write then rename, so that concurrent processes never read a half-written file.
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
            json.dump(rows, f)
        os.replace(f.name, path)
    except OSError:
        pass  # a read-only home: run without the cache
    return rows
