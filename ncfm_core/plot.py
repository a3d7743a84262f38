"""Figures drawn with matplotlib, an optional dependency (``pip install 'ncfm[plot]'``).

- :func:`line_plot`: lines with markers and error bars on labelled axes (the results pages);
- :func:`run_figure`: a distillation at a glance, its loss curve beside a grid of its synthetic
  images (``ncfm inspect REF --plot out.png``).

matplotlib is imported inside the functions, with the non-interactive Agg backend, so
importing this module costs nothing and a missing matplotlib is a one-line error naming the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ncfm_core.errors import NcfmError

PLOT_EXTRA_HINT = "pip install 'ncfm[plot]' (in a clone: uv sync --extra plot)"


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; :class:`NcfmError` naming the extra if missing."""
    try:
        import matplotlib
    except ImportError:
        raise NcfmError(f"plotting needs matplotlib, which is not installed: {PLOT_EXTRA_HINT}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class Series:
    """One line of a plot: points ``(x, y)`` and optional symmetric error bars ``err``."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    err: Sequence[float] | None = None


def line_plot(
    series: Sequence[Series],
    path: Path | str,
    *,
    title: str,
    x_label: str,
    y_label: str,
    log_x: bool = False,
    x_ticks: Sequence[float] | None = None,
    y_range: tuple[float, float] | None = None,
    size: tuple[int, int] = (640, 400),
) -> Path:
    """Draw ``series`` as lines with markers (and error bars) on labelled axes; write a PNG of
    ``size`` pixels (width, height). ``log_x``: base-2 x axis, ticked at the data's x values
    unless ``x_ticks``; ``y_range`` fixes the y axis. Returns ``path``."""
    if not any(len(s.x) for s in series):
        raise ValueError("nothing to plot: every series is empty")
    plt = _pyplot()
    dpi = 100
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    try:
        for s in series:
            ax.errorbar(list(s.x), list(s.y), yerr=list(s.err) if s.err else None, label=s.label or None,
                        marker="o" if len(s.x) <= 40 else None, markersize=4, capsize=3, linewidth=1.5)
        if log_x:
            ax.set_xscale("log", base=2)
            ticks = list(x_ticks) if x_ticks is not None else sorted({float(x) for s in series for x in s.x})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        elif x_ticks is not None:
            ax.set_xticks(list(x_ticks))
        if y_range is not None:
            ax.set_ylim(*y_range)
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, color="0.9")
        if len(series) > 1 or series[0].label:
            ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        return _save(fig, path, dpi)
    finally:
        plt.close(fig)


def _save(fig: Any, path: Path | str, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def run_figure(
    title: str,
    loss_curve: Sequence[Sequence[float | None]],
    images: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    path: Path | str,
    *,
    per_class: int = 10,
) -> Path:
    """One PNG titled ``title``: ``loss_curve`` (``[(iteration, loss), ...]``, a record's; points
    without a finite loss are left out) on the left, up to ``per_class`` of ``images`` (M, C, H, W)
    in [0, 1] per class on the right, one row per class. Returns ``path``."""
    plt = _pyplot()
    rows = sorted(set(labels.tolist()))
    picks = [[i for i, label in enumerate(labels.tolist()) if label == row][:per_class] for row in rows]
    columns = max((len(p) for p in picks), default=1)
    fig = plt.figure(figsize=(12, max(4.0, 0.55 * len(rows) + 1)), dpi=100)
    try:
        grid = fig.add_gridspec(len(rows) or 1, 1 + columns, width_ratios=[columns * 0.9] + [1] * columns)
        ax = fig.add_subplot(grid[:, 0])
        points = [(float(p[0]), float(p[1])) for p in loss_curve if p[1] is not None and math.isfinite(float(p[1]))]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.2)
        else:
            ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_title("distillation loss")
        ax.grid(True, color="0.9")
        pixels = images.detach().float().clamp(0, 1).cpu()
        for r, (row, members) in enumerate(zip(rows, picks)):
            for c, index in enumerate(members):
                cell = fig.add_subplot(grid[r, 1 + c])
                image = pixels[index]
                if image.shape[0] == 1:
                    cell.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    cell.imshow(image[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
                cell.set_xticks([])
                cell.set_yticks([])
                if c == 0:
                    cell.set_ylabel(str(class_names[row]), rotation=0, ha="right", va="center", fontsize="small")
        fig.suptitle(title)
        return _save(fig, path, 100)
    finally:
        plt.close(fig)
