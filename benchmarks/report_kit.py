"""Shared pieces of the results scripts (digits_table.py, paper_table.py, docs_pictures.py).

- the method rows of the results tables (random real / mean matching / NCFM without and with psi)
  and one function that distills and evaluates a row with the core API;
- Markdown formatting of those tables, identical for every dataset;
- a line plot drawn with PIL alone (matplotlib is not a dependency of ncfm);
- a description of the machine and the command, written next to every result.

Not a package: the scripts import it as a sibling module (their directory is on ``sys.path``).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from ncfm_core import __version__
from ncfm_core.config import DistillConfig
from ncfm_core.data import ImageDataset
from ncfm_core.distill import Distiller
from ncfm_core.evaluate import EvalConfig, EvalResult, evaluate_synset
from ncfm_core.metrics import fair_metrics
from ncfm_core.pool import Pool, PoolSpec, train_pool

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One row of a results table: ``overrides`` of the distillation config (None: no
    distillation, a random real subset of the same IPC)."""

    key: str
    label: str
    overrides: dict[str, Any] | None


METHODS: tuple[Method, ...] = (
    Method("random", "Random real subset", None),
    Method("mmd", "Mean matching, DM-style (`--matching mmd`)", {"matching": "mmd", "sampler": False}),
    Method("ncfm_no_psi", "NCFM without psi (`--no-sampler`)", {"matching": "ncfm", "sampler": False}),
    Method("ncfm", "NCFM with psi (default)", {"matching": "ncfm", "sampler": True}),
)


@dataclass
class RowResult:
    """What one table cell needs. Accuracies are fractions in [0, 1]."""

    method: str
    ipc: int
    runs: list[float]
    distill_seconds: float | None = None
    eval_seconds: float = 0.0
    final_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(self.runs) / len(self.runs)

    @property
    def std(self) -> float:
        # population std over repeats, as EvalResult.std
        mean = self.mean
        return math.sqrt(sum((r - mean) ** 2 for r in self.runs) / len(self.runs)) if len(self.runs) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra, "method": self.method, "ipc": self.ipc, "runs": self.runs, "mean": self.mean,
            "std": self.std, "distill_seconds": self.distill_seconds, "eval_seconds": self.eval_seconds,
            "final_loss": self.final_loss,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RowResult:
        """Inverse of :meth:`to_dict` (``mean`` and ``std`` are recomputed from ``runs``)."""
        fields = ("method", "ipc", "runs", "distill_seconds", "eval_seconds", "final_loss")
        extra = {k: v for k, v in data.items() if k not in (*fields, "mean", "std")}
        return cls(data["method"], int(data["ipc"]), [float(r) for r in data["runs"]], data.get("distill_seconds"),
                   float(data.get("eval_seconds") or 0.0), data.get("final_loss"), extra)


class PoolCache:
    """Train each distinct pool once (keyed by ``PoolSpec.key()``) and hand it to every run."""

    def __init__(self, dataset: ImageDataset, device: str, log=print) -> None:
        self.dataset, self.device, self.log = dataset, device, log
        self.pools: dict[str, Pool] = {}
        self.seconds = 0.0

    def get(self, config: DistillConfig) -> Pool:
        spec = PoolSpec.from_config(config, self.dataset)
        key = spec.key()
        if key not in self.pools:
            started = time.perf_counter()
            self.log(f"training a pool of {spec.size} x {spec.network} for {spec.epochs} epoch(s)")
            self.pools[key] = train_pool(spec, self.dataset, self.device)
            elapsed = time.perf_counter() - started
            self.seconds += elapsed
            accuracies = ", ".join(f"{100 * a:.1f}%" for a in self.pools[key].test_accuracy)
            self.log(f"pool trained in {elapsed:.0f} s (member test accuracy {accuracies})")
        return self.pools[key]


def distill_and_evaluate(
    config: DistillConfig,
    dataset: ImageDataset,
    pools: PoolCache,
    eval_config: EvalConfig,
    device: str,
    method: str,
) -> tuple[RowResult, torch.Tensor, torch.Tensor]:
    """Distill with ``config`` (pool from ``pools``), evaluate the synthetic set with
    ``eval_config``; returns the row and the stored images (M, C, H, W) and labels (M,)."""
    pool = pools.get(config)
    started = time.perf_counter()
    distiller = Distiller(config, dataset, pool, device)
    distiller.run(config.iterations)
    distill_seconds = time.perf_counter() - started
    images, labels = distiller.synthetic_set()
    result = evaluate_synset(images, labels, config.factor, dataset, eval_config, device)
    final_loss = distiller.loss_curve[-1][1] if distiller.loss_curve else None
    row = RowResult(method, config.ipc, list(result.runs), distill_seconds, result.seconds, final_loss)
    return row, images, labels


def eval_row(method: str, ipc: int, result: EvalResult) -> RowResult:
    return RowResult(method, ipc, list(result.runs), None, result.seconds)


# ----------------------------------------------------------------------------- Markdown


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def main_table(rows: Sequence[RowResult], ipcs: Sequence[int], random_by_ipc: dict[int, float],
               full_accuracy: float | None, reference: dict[tuple[str, int], float] | None = None) -> str:
    """The results table: one line per (method, IPC): accuracy mean +- std (percent), IOR,
    HLR and LRS (differences of fractions, see ncfm_core.metrics), distillation time. With
    ``reference`` ({(method key, ipc): percent}), a last column quotes the paper's figure."""
    header = "| method | IPC | test accuracy % (mean ± std) | repeats | IOR | HLR | LRS | distill s |"
    rule = "|---|---|---|---|---|---|---|---|"
    if reference is not None:
        header, rule = header + " paper % |", rule + "---|"
    lines = [header, rule]
    labels = {m.key: m.label for m in METHODS}
    for ipc in ipcs:
        for row in [r for r in rows if r.ipc == ipc]:
            metrics = fair_metrics(row.mean, random_by_ipc.get(ipc), full_accuracy)
            seconds = "-" if row.distill_seconds is None else f"{row.distill_seconds:.0f}"
            lrs = metrics.get("lrs")
            line = (
                f"| {labels.get(row.method, row.method)} | {ipc} | {pct(row.mean)} ± {pct(row.std)} | "
                f"{len(row.runs)} | {signed(metrics.get('ior'))} | {signed(metrics.get('hlr'))} | "
                f"{'-' if lrs is None else f'{lrs:.3f}'} | {seconds} |"
            )
            if reference is not None:
                quoted = reference.get((row.method, ipc))
                line += f" {'-' if quoted is None else f'{quoted:.1f}'} |"
            lines.append(line)
    return "\n".join(lines)


def sweep_table(name: str, rows: Sequence[tuple[Any, RowResult]], random_accuracy: float | None) -> str:
    lines = [f"| {name} | test accuracy % (mean ± std) | repeats | IOR | final loss |", "|---|---|---|---|---|"]
    for value, row in rows:
        ior = None if random_accuracy is None else row.mean - random_accuracy
        loss = "-" if row.final_loss is None else f"{row.final_loss:.4f}"
        lines.append(f"| {value} | {pct(row.mean)} ± {pct(row.std)} | {len(row.runs)} | {signed(ior)} | {loss} |")
    return "\n".join(lines)


def machine_lines(device: str) -> list[str]:
    threads = torch.get_num_threads()
    return [
        f"- machine: {platform.system()} {platform.machine()}, os.cpu_count() = {os.cpu_count()}, "
        f"torch threads = {threads}, device {device}",
        f"- software: ncfm {__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def command_line(script: str, argv: Sequence[str]) -> str:
    return "uv run python " + " ".join(shlex.quote(a) for a in [script, *argv])


def log_to_stderr(message: str) -> None:
    stamp = _dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- plots

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


@dataclass(frozen=True)
class Series:
    """One line of a plot: points ``(x, y)`` and optional symmetric error bars ``err``."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    err: Sequence[float] | None = None


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values inside [low, high]: the multiples of a step of 1, 2, 2.5, 5 or 10 x 10^k
    chosen so that about ``count`` steps span the range."""
    if not high > low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9)
    ticks = []
    index = first
    while index * step <= high + step * 1e-9:
        ticks.append(round(index * step, 10))
        index += 1
    return ticks


def _tick_label(value: float) -> str:
    if abs(value) >= 1000 or value == int(value):
        return f"{int(round(value))}"
    return f"{value:g}"


def line_plot(
    series: Sequence[Series],
    path: Path,
    *,
    title: str,
    x_label: str,
    y_label: str,
    log_x: bool = False,
    x_ticks: Sequence[float] | None = None,
    y_range: tuple[float, float] | None = None,
    size: tuple[int, int] = (640, 400),
) -> Path:
    """Draw ``series`` as lines with markers (and error bars) on labelled axes; write a PNG.

    ``log_x`` spaces x logarithmically (base 2 ticks at the data's x values unless ``x_ticks``);
    ``y_range`` fixes the y axis, else it spans the data (with error bars) plus a margin.
    Uses PIL's default font only, so it runs wherever Pillow does. Returns ``path``.
    """
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    left, right, top, bottom = 70, 20, 36, 56
    plot_w, plot_h = width - left - right, height - top - bottom

    xs = [float(x) for s in series for x in s.x]
    lows = [float(y) - (float(e) if s.err else 0.0) for s in series for y, e in zip(s.y, s.err or [0] * len(s.y))]
    highs = [float(y) + (float(e) if s.err else 0.0) for s in series for y, e in zip(s.y, s.err or [0] * len(s.y))]
    if not xs:
        raise ValueError("nothing to plot: every series is empty")
    tx = (lambda v: math.log2(v)) if log_x else (lambda v: v)
    x_low, x_high = tx(min(xs)), tx(max(xs))
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    pad_x = 0.04 * (x_high - x_low)
    x_low, x_high = x_low - pad_x, x_high + pad_x
    if y_range is not None:
        y_low, y_high = y_range
    else:
        y_low, y_high = min(lows), max(highs)
        margin = 0.08 * (y_high - y_low) if y_high > y_low else max(abs(y_high) * 0.05, 1e-3)
        y_low, y_high = y_low - margin, y_high + margin

    def px(x: float) -> float:
        return left + (tx(x) - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    # axes, grid and ticks
    grey, dark = (225, 225, 225), (60, 60, 60)
    y_ticks = [t for t in _nice_ticks(y_low, y_high) if y_low <= t <= y_high]
    for t in y_ticks:
        y = py(t)
        draw.line([(left, y), (left + plot_w, y)], fill=grey)
        draw.line([(left - 4, y), (left, y)], fill=dark)
        text = _tick_label(t)
        box = draw.textbbox((0, 0), text, font=small)
        draw.text((left - 7 - (box[2] - box[0]), y - (box[3] - box[1]) / 2 - box[1]), text, fill=dark, font=small)
    ticks_x = list(x_ticks) if x_ticks is not None else (sorted(set(xs)) if log_x else _nice_ticks(min(xs), max(xs)))
    for t in ticks_x:
        x = px(t)
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill=dark)
        text = _tick_label(t)
        box = draw.textbbox((0, 0), text, font=small)
        draw.text((x - (box[2] - box[0]) / 2, top + plot_h + 7), text, fill=dark, font=small)
    draw.rectangle([(left, top), (left + plot_w, top + plot_h)], outline=dark)

    # labels
    box = draw.textbbox((0, 0), title, font=font)
    draw.text(((width - (box[2] - box[0])) / 2, 10), title, fill=(0, 0, 0), font=font)
    box = draw.textbbox((0, 0), x_label, font=font)
    draw.text((left + (plot_w - (box[2] - box[0])) / 2, height - 24), x_label, fill=(0, 0, 0), font=font)
    box = draw.textbbox((0, 0), y_label, font=font)
    label = Image.new("RGB", (box[2] + 4, box[3] + 4), "white")
    ImageDraw.Draw(label).text((2, 2), y_label, fill=(0, 0, 0), font=font)
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (6, top + (plot_h - rotated.height) // 2))

    # data
    for index, s in enumerate(series):
        colour = _COLOURS[index % len(_COLOURS)]
        points = [(px(float(x)), py(float(y))) for x, y in zip(s.x, s.y)]
        if s.err:
            for (x, _), y, e in zip(points, s.y, s.err):
                y_top, y_bottom = py(float(y) + float(e)), py(float(y) - float(e))
                draw.line([(x, y_top), (x, y_bottom)], fill=colour)
                draw.line([(x - 4, y_top), (x + 4, y_top)], fill=colour)
                draw.line([(x - 4, y_bottom), (x + 4, y_bottom)], fill=colour)
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if len(points) <= 40:
            for x, y in points:
                draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=colour)

    # legend, top left inside the plot
    if len(series) > 1 or series[0].label:
        y = top + 8
        for index, s in enumerate(series):
            colour = _COLOURS[index % len(_COLOURS)]
            draw.line([(left + 10, y + 7), (left + 30, y + 7)], fill=colour, width=2)
            draw.text((left + 36, y), s.label, fill=(0, 0, 0), font=small)
            y += 17

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # an adaptive palette keeps these flat-colour charts to a few KB
    image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path, optimize=True)
    return path
