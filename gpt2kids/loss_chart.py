"""The picture beside every model card: training and validation loss per epoch, as hand-written SVG."""

from __future__ import annotations

import math
from typing import Any

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 36, 48  # margins: room for tick labels, the legend and axis titles
SERIES = (("train_loss", "training loss", "#1f77b4"), ("eval_loss", "validation loss", "#d62728"))
FONT = 'font-family="sans-serif" font-size="12"'


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values (1, 2, 2.5 or 5 times a power of ten apart) covering [low, high]."""
    raw = (high - low) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9)
    return [i * step for i in range(first, math.floor(high / step + 1e-9) + 1)]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def loss_svg(history: list[dict[str, Any]]) -> str:
    """An SVG chart: one polyline per loss that has values, one point per epoch, axes, ticks, a legend."""
    series = [(label, color, [(float(row["epoch"]), float(row[key])) for row in history if _finite(row.get(key))])
              for key, label, color in SERIES]
    series = [(label, color, points) for label, color, points in series if points]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}">', f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>']
    if not series:
        out.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" {FONT}>'
                   "no epoch finished yet</text></svg>")
        return "\n".join(out) + "\n"
    xs = [x for *_, points in series for x, _ in points]
    ys = [y for *_, points in series for _, y in points]
    # One epoch or equal losses would give an empty range: widen it so nothing divides by zero.
    x0, x1 = (min(xs), max(xs)) if max(xs) > min(xs) else (min(xs) - 0.5, min(xs) + 0.5)
    pad = (max(ys) - min(ys)) * 0.08 or max(abs(ys[0]) * 0.05, 0.05)
    y0, y1 = min(ys) - pad, max(ys) + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + (y1 - y) / (y1 - y0) * plot_h

    out.append(f'<g stroke="#888" stroke-width="1"><line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" '
               f'y2="{TOP + plot_h}"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/></g>')
    epochs = sorted(set(xs))
    for x in epochs[:: math.ceil(len(epochs) / 10)]:  # at most ten epoch labels
        out.append(f'<text x="{px(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" {FONT}>{x:g}</text>')
    for y in _ticks(y0, y1):
        out.append(f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{LEFT + plot_w}" y2="{py(y):.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end" {FONT}>{round(y, 9):g}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 8}" text-anchor="middle" {FONT}>epoch</text>')
    out.append(f'<text x="14" y="{TOP + plot_h / 2}" text-anchor="middle" {FONT} '
               f'transform="rotate(-90 14 {TOP + plot_h / 2})">loss</text>')
    for index, (label, color, points) in enumerate(series):
        coordinates = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        out.append(f'<polyline points="{coordinates}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in points)
        legend_x = LEFT + 10 + 150 * index
        out.append(f'<line x1="{legend_x}" y1="{TOP - 14}" x2="{legend_x + 24}" y2="{TOP - 14}" stroke="{color}" '
                   f'stroke-width="2"/><text x="{legend_x + 30}" y="{TOP - 10}" {FONT}>{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
