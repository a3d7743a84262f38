"""The line plot of the results pages (digits_table.py, tools/docs_pictures.py), drawn with PIL
alone (matplotlib is not a dependency of ncfm). Everything else the scripts share is in kit.py.

Not a package: the scripts import it as a sibling module (their directory is on ``sys.path``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

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
