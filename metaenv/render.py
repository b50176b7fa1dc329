"""Training-curve figure of the current path: what `render()` returns and what the LLM agent sees.

Panels: train reward, dev score per stage, KL, entropy, completion length, zero-variance groups and
truncation; dashed lines mark stage boundaries. Uses matplotlib's object API with the Agg canvas
(no pyplot), so no global figure state accumulates across calls.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

UNIT = (-0.02, 1.02)  # fixed axis for quantities in [0, 1], so stages compare at a glance
# (title, metric keys drawn in the panel, fixed y-limits or None); no keys = the dev-score panel
PANELS: tuple[tuple[str, tuple[str, ...], tuple[float, float] | None], ...] = (
    ("train reward", ("reward",), UNIT),
    ("dev score", (), UNIT),
    ("KL to reference", ("kl",), None),
    ("entropy (nats/token)", ("entropy",), None),
    ("completion length (tokens)", ("completions/mean_length",), None),
    ("fraction", ("frac_reward_zero_std", "completions/clipped_ratio"), UNIT),
)


def _series(history: Sequence[dict], key: str) -> np.ndarray:
    # Missing or non-finite values become gaps (NaN) instead of breaking the axis scale.
    out = [float(m.get(key, math.nan)) for m in history]
    return np.array([x if math.isfinite(x) else math.nan for x in out])


def training_figure(
    history: Sequence[dict],
    stage_ends: Sequence[int],
    dev_scores: Sequence[float],
    title: str = "",
    dpi: int = 80,
) -> Figure:
    """Figure of per-step curves; `stage_ends[i]` is the step count after stage i and
    `dev_scores` holds the base score then one score per stage."""
    fig = Figure(figsize=(10, 6), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    steps = np.arange(1, len(history) + 1)
    for ax, (name, keys, ylim) in zip(axes.flat, PANELS, strict=True):
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
        for key in keys:
            ax.plot(steps, _series(history, key), lw=1.2, label=key if len(keys) > 1 else None)
        if not keys:
            xs = [0, *stage_ends][: len(dev_scores)]
            ax.plot(xs, list(dev_scores), "o-", color="tab:green", lw=1.5, ms=4)
        if ylim is not None:
            ax.set_ylim(*ylim)
        if len(keys) > 1:
            ax.legend(fontsize=7, loc="best")
        for end in stage_ends:
            ax.axvline(end, color="gray", ls="--", lw=0.8)
        ax.set_xlim(0, max(1, len(history), *stage_ends))
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle(title or f"{len(stage_ends)} stages, {len(history)} steps", fontsize=11)
    fig.tight_layout()
    return fig


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """HxWx3 uint8 pixels of a figure."""
    canvas = fig.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def figure_to_png(fig: Figure) -> bytes:
    """PNG bytes of a figure (for an LLM agent's image input)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def training_curves_rgb(
    history: Sequence[dict], stage_ends: Sequence[int], dev_scores: Sequence[float], title: str = ""
) -> np.ndarray:
    """`training_figure` as an HxWx3 uint8 array."""
    return figure_to_rgb(training_figure(history, stage_ends, dev_scores, title))


def training_curves_png(
    history: Sequence[dict], stage_ends: Sequence[int], dev_scores: Sequence[float], title: str = ""
) -> bytes:
    """`training_figure` as PNG bytes: the same picture as `training_curves_rgb`."""
    return figure_to_png(training_figure(history, stage_ends, dev_scores, title))
