"""Self-contained inline SVG plots for looking rather than reading (no plotting library needed).

* `token_loss_svg`: per-token next-token loss of the clean model against the model with a
  dictionary spliced in (data from `gemma_scope_pz.scope.evaluate.token_losses`).
* `activation_svg`: one feature's activation along a prompt, a bar per token (BOS left out of the
  scale by default, as in `gemma_scope_pz.analysis.html.highlight_tokens`).
* `density_histogram_svg`: histogram of log10 feature densities with dead and dense latents marked.

Each returns an ``<svg>`` string with axes, tick labels, axis titles and a ``<title>`` tooltip on
every mark; all text is escaped. Every data mark carries ``data-index`` and ``data-value``
attributes holding the plotted number, so a page can be checked against its data. Embed the string
in HTML as is, or show it in a notebook with ``IPython.display.SVG``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gemma_scope_pz.analysis.html import escape, escape_token
from gemma_scope_pz.analysis.stats import FeatureStats

CLEAN_COLOUR = "#0969da"
SPLICED_COLOUR = "#cf222e"
BAR_COLOUR = "#fb8c00"
MUTED = "#8c959f"
AXIS = "#57606a"
_LABEL_CHARS = 12


def nice_ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    """About ``n`` round tick values (1, 2 or 5 times a power of ten) covering ``[lo, hi]``."""
    if hi <= lo:
        lo, hi = lo - (abs(lo) or 1.0) / 2, hi + (abs(hi) or 1.0) / 2
    span = hi - lo
    step = 10.0 ** math.floor(math.log10(span / n))
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= n:
            step *= mult
            break
    first, last = math.floor(lo / step) * step, math.ceil(hi / step) * step
    return np.arange(round((last - first) / step) + 1) * step + first


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _svg_open(width: float, height: float, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="11" '
        f'role="img"><title>{escape(title)}</title>'
        f'<text x="{width / 2:.1f}" y="14" text-anchor="middle" font-size="13" font-weight="600">'
        f"{escape(title)}</text>"
    )


class _Frame:
    """Plot area geometry: maps data to pixels and draws axes with ticks and titles."""

    def __init__(self, n: int, y_ticks: np.ndarray, *, step: float = 22.0, height: float = 260):
        self.left, self.top, self.bottom, self.right = 58.0, 28.0, 86.0, 16.0
        self.step = step
        self.width = max(360.0, self.left + self.right + n * step)
        self.height = height
        self.plot_h = height - self.top - self.bottom
        self.y0, self.y1 = float(y_ticks[0]), float(y_ticks[-1])
        self.y_ticks = y_ticks

    def x(self, i: int) -> float:
        return self.left + (i + 0.5) * self.step

    def y(self, value: float) -> float:
        frac = (value - self.y0) / (self.y1 - self.y0) if self.y1 > self.y0 else 0.0
        return self.top + self.plot_h * (1.0 - frac)

    def axes(self, labels: Sequence[str], y_title: str, x_title: str) -> str:
        base, right = self.top + self.plot_h, self.width - self.right
        out = [
            f'<line x1="{self.left}" y1="{base}" x2="{right}" y2="{base}" stroke="{AXIS}"/>',
            f'<line x1="{self.left}" y1="{self.top}" x2="{self.left}" y2="{base}" stroke="{AXIS}"/>',
        ]
        for tick in self.y_ticks:
            y = self.y(float(tick))
            out.append(
                f'<line x1="{self.left - 4}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" '
                f'stroke="#eaeef2"/><text x="{self.left - 6}" y="{y + 4:.1f}" '
                f'text-anchor="end" class="y-tick">{_fmt(float(tick))}</text>'
            )
        for i, label in enumerate(labels):
            short = label if len(label) <= _LABEL_CHARS else label[: _LABEL_CHARS - 1] + "…"
            x, y = self.x(i), base + 10
            out.append(
                f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="end" class="x-label" '
                f'transform="rotate(-50 {x:.1f} {y:.1f})">{escape_token(short)}</text>'
            )
        mid_y = self.top + self.plot_h / 2
        out.append(
            f'<text x="14" y="{mid_y:.1f}" text-anchor="middle" transform="rotate(-90 14 {mid_y:.1f})">'
            f'{escape(y_title)}</text><text x="{(self.left + right) / 2:.1f}" '
            f'y="{self.height - 4}" text-anchor="middle">{escape(x_title)}</text>'
        )
        return "".join(out)


def _as_1d(values, n: int, what: str) -> np.ndarray:
    values = np.asarray(values, np.float64).reshape(-1)
    if len(values) != n:
        raise ValueError(f"got {n} tokens but {len(values)} {what}")
    return values


def _y_ticks(values: np.ndarray) -> np.ndarray:
    """Round ticks over the finite values and zero."""
    finite = values[np.isfinite(values)]
    lo = min(float(finite.min()), 0.0) if finite.size else 0.0
    hi = max(float(finite.max()), 0.0) if finite.size else 1.0
    return nice_ticks(lo, hi if hi > lo else lo + 1.0)


def _series(frame: _Frame, values, labels, name: str, colour: str) -> str:
    points, marks = [], []
    for i, (value, label) in enumerate(zip(values, labels, strict=True)):
        if not math.isfinite(value):
            continue
        x, y = frame.x(i), frame.y(float(value))
        points.append(f"{x:.1f},{y:.1f}")
        marks.append(
            f'<circle cx="{x:.1f}" cy="{y:.2f}" r="3" fill="{colour}" class="{name}" '
            f'data-index="{i}" data-value="{_fmt(float(value))}"><title>'
            f"{escape(f'{label!r}')} {name}: {float(value):.4g}</title></circle>"
        )
    line = (
        f'<polyline points="{" ".join(points)}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
    )
    return line + "".join(marks)


def _legend(frame: _Frame, entries: Sequence[tuple[str, str]]) -> str:
    out, x = [], frame.width - frame.right - 150
    for row, (name, colour) in enumerate(entries):
        y = frame.top + 4 + 14 * row
        out.append(
            f'<rect x="{x:.1f}" y="{y - 8:.1f}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{x + 14:.1f}" y="{y + 1:.1f}">{escape(name)}</text>'
        )
    return "".join(out)


def token_loss_svg(
    token_strings: Sequence[str],
    clean,
    spliced,
    *,
    title: str = "Per-token loss: clean vs spliced",
) -> str:
    """Line plot of the next-token loss per position, clean model against dictionary spliced in.

    Args:
      token_strings: The predicted token at each position (for ``token_losses`` output of a
        sequence ``ids``: the strings of ``ids[1:]``).
      clean: Loss (nats) per position of the unmodified model.
      spliced: The same with the dictionary's reconstruction spliced in.
      title: Heading and accessible title (escaped).
    """
    n = len(token_strings)
    clean, spliced = _as_1d(clean, n, "clean losses"), _as_1d(spliced, n, "spliced losses")
    frame = _Frame(n, _y_ticks(np.concatenate([clean, spliced])))
    labels = [str(s) for s in token_strings]
    return (
        _svg_open(frame.width, frame.height, title)
        + frame.axes(labels, "loss (nats)", "predicted token")
        + _series(frame, clean, labels, "clean", CLEAN_COLOUR)
        + _series(frame, spliced, labels, "spliced", SPLICED_COLOUR)
        + _legend(frame, [("clean", CLEAN_COLOUR), ("spliced", SPLICED_COLOUR)])
        + "</svg>"
    )


def activation_svg(
    token_strings: Sequence[str],
    values,
    *,
    title: str = "Feature activation along the prompt",
    exclude_bos: bool = True,
) -> str:
    """Bar chart of one feature's activation at each token of a prompt.

    Args:
      token_strings: The decoded text of each token.
      values: The feature's activation at each token.
      title: Heading and accessible title (escaped).
      exclude_bos: Leave position 0 (BOS) out of the bars and the scale; its value stays in the
        label's tooltip.
    """
    n = len(token_strings)
    values = _as_1d(values, n, "values")
    shown = values.copy()
    if exclude_bos and n:
        shown[0] = np.nan
    frame = _Frame(n, _y_ticks(shown))
    labels = [str(s) for s in token_strings]
    zero, bars = frame.y(0.0), []
    for i, (value, label) in enumerate(zip(shown, labels, strict=True)):
        if not math.isfinite(value):
            continue
        y = frame.y(float(value))
        bars.append(
            f'<rect x="{frame.x(i) - frame.step * 0.4:.1f}" y="{min(y, zero):.2f}" '
            f'width="{frame.step * 0.8:.1f}" height="{abs(zero - y):.2f}" fill="{BAR_COLOUR}" '
            f'class="bar" data-index="{i}" data-value="{_fmt(float(value))}"><title>'
            f"{escape(f'{label!r}')}: {float(value):.4g}</title></rect>"
        )
    note = ""
    if exclude_bos and n:
        note = (
            f'<text x="{frame.x(0):.1f}" y="{zero - 4:.1f}" text-anchor="middle" fill="{MUTED}">'
            f"<title>position 0 (BOS) not shown: {values[0]:.4g}</title>·</text>"
        )
    return (
        _svg_open(frame.width, frame.height, title)
        + frame.axes(labels, "activation", "token")
        + "".join(bars)
        + note
        + "</svg>"
    )


def density_histogram_svg(
    stats: FeatureStats, bins: int = 40, width: int = 560, height: int = 170
) -> str:
    """Inline SVG of the log10-density histogram; a grey bar counts dead latents and a
    red dashed line marks the dense threshold (bins above it drawn red)."""
    counts, edges = stats.log10_density_histogram(bins)
    n_dead = int(stats.dead.sum())
    left, right, top, bottom, dead_w = 46, 10, 14, 34, 26
    plot_x0 = left + dead_w + 26
    plot_w, plot_h = width - plot_x0 - right, height - top - bottom
    peak = max(int(counts.max()) if counts.size else 0, n_dead, 1)
    lo, hi = float(edges[0]), float(edges[-1])

    def x_of(v: float) -> float:
        return plot_x0 + (v - lo) / (hi - lo) * plot_w

    threshold = math.log10(stats.dense_threshold) if stats.dense_threshold > 0 else lo
    dh = plot_h * n_dead / peak
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10" role="img">',
        "<title>Histogram of log10 feature density</title>",
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" stroke="{AXIS}"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>',
        f'<rect x="{left + 4}" y="{top + plot_h - dh:.1f}" width="{dead_w - 4}" height="{dh:.1f}" '
        f'fill="{MUTED}" class="dead" data-value="{n_dead}"><title>dead: {n_dead}</title></rect>'
        f'<text x="{left + dead_w / 2 + 2}" y="{top + plot_h + 12}" text-anchor="middle">dead</text>',
    ]
    for i, (c, a, b) in enumerate(zip(counts, edges[:-1], edges[1:], strict=True)):
        h = plot_h * int(c) / peak
        out.append(
            f'<rect x="{x_of(a) + 0.5:.1f}" y="{top + plot_h - h:.1f}" '
            f'width="{max(x_of(b) - x_of(a) - 1, 0.5):.1f}" height="{h:.1f}" '
            f'fill="{SPLICED_COLOUR if a >= threshold else CLEAN_COLOUR}" class="bin" '
            f'data-index="{i}" data-value="{int(c)}"><title>[{a:.2f}, {b:.2f}): {int(c)}</title></rect>'
        )
    for tick in range(math.ceil(lo), math.floor(hi) + 1):
        out.append(
            f'<text x="{x_of(tick):.1f}" y="{top + plot_h + 12}" text-anchor="middle">1e{tick}</text>'
        )
    if lo <= threshold <= hi:
        tx = x_of(threshold)
        out.append(
            f'<line x1="{tx:.1f}" y1="{top}" x2="{tx:.1f}" y2="{top + plot_h}" stroke="{SPLICED_COLOUR}" '
            f'stroke-dasharray="4,3"/><text x="{tx - 3:.1f}" y="{top + 8}" text-anchor="end" '
            f'fill="{SPLICED_COLOUR}">dense &gt; {escape(f"{stats.dense_threshold:.3g}")}</text>'
        )
    out.append(
        f'<text x="{plot_x0 + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">'
        "feature density (fraction of tokens, log scale)</text></svg>"
    )
    return "".join(out)
