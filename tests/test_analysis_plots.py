"""Inline SVG plots: well-formed XML, escaped text, and marks placed where their numbers say."""

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from gemma_scope_pz.analysis.plots import (
    activation_svg,
    density_histogram_svg,
    nice_ticks,
    token_loss_svg,
)
from gemma_scope_pz.analysis.stats import FeatureStats

NS = "{http://www.w3.org/2000/svg}"
TOKENS = ["<bos>", " The", "<script>alert(1)</script>", " &amp;", "\n", ' "q"', " end"]


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # well-formed XML, or this raises
    assert root.tag == f"{NS}svg"
    return root


def _y_axis(root) -> list[tuple[float, float]]:
    """(tick value, pixel y) of the y-axis labels."""
    ticks = [t for t in root.iter(f"{NS}text") if t.get("class") == "y-tick"]
    assert len(ticks) >= 3
    return [(float(t.text), float(t.get("y")) - 4) for t in ticks]


def _expected_y(axis, value):
    values, pixels = zip(*axis, strict=True)
    return np.interp(value, values, pixels)  # ticks are linear, so interpolation is exact


def test_nice_ticks():
    for lo, hi in [(0.0, 7.3), (0.0, 0.042), (-3.0, 12.0), (2.0, 2.0)]:
        ticks = nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 12
        steps = np.diff(ticks)
        np.testing.assert_allclose(steps, steps[0])
        mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]))
        assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-9


def test_token_loss_marks_match_the_data():
    rng = np.random.default_rng(0)
    clean = rng.uniform(0.5, 6.0, len(TOKENS))
    spliced = clean + rng.uniform(0.0, 2.0, len(TOKENS))
    root = _parse(token_loss_svg(TOKENS, clean, spliced, title="loss <clean> & spliced"))
    axis = _y_axis(root)
    for name, data in (("clean", clean), ("spliced", spliced)):
        marks = [c for c in root.iter(f"{NS}circle") if c.get("class") == name]
        assert [int(c.get("data-index")) for c in marks] == list(range(len(TOKENS)))
        got = np.array([float(c.get("data-value")) for c in marks])
        np.testing.assert_allclose(got, data, rtol=1e-5)
        cy = np.array([float(c.get("cy")) for c in marks])
        np.testing.assert_allclose(cy, _expected_y(axis, data), atol=0.15)
    labels = [t.text for t in root.iter(f"{NS}text") if t.get("class") == "x-label"]
    assert labels[2] == "<script>ale…" and labels[3] == " &amp;" and labels[4] == "↵"
    assert root.find(f"{NS}title").text == "loss <clean> & spliced"
    assert not list(root.iter(f"{NS}script"))
    with pytest.raises(ValueError, match="got 7 tokens but 6 spliced losses"):
        token_loss_svg(TOKENS, clean, spliced[:-1])


def test_activation_bars_match_the_data_and_skip_bos():
    values = np.array([35.0, 0.0, 2.5, 1.0, 0.0, 4.0, 0.5])
    root = _parse(activation_svg(TOKENS, values, title="feature 7"))
    axis = _y_axis(root)
    assert max(v for v, _ in axis) < 10  # BOS (35) does not set the scale
    bars = [r for r in root.iter(f"{NS}rect") if r.get("class") == "bar"]
    assert [int(b.get("data-index")) for b in bars] == list(range(1, len(TOKENS)))
    for bar in bars:
        value = values[int(bar.get("data-index"))]
        assert float(bar.get("data-value")) == pytest.approx(value)
        top, height = float(bar.get("y")), float(bar.get("height"))
        assert top == pytest.approx(_expected_y(axis, value), abs=0.15)
        assert top + height == pytest.approx(_expected_y(axis, 0.0), abs=0.15)
    assert "35" in "".join(root.itertext())  # BOS value still in a tooltip
    with_bos = _parse(activation_svg(TOKENS, values, exclude_bos=False))
    assert len([r for r in with_bos.iter(f"{NS}rect") if r.get("class") == "bar"]) == len(TOKENS)
    assert max(v for v, _ in _y_axis(with_bos)) >= 35


def test_density_histogram_counts():
    rng = np.random.default_rng(1)
    n = 300
    fire = np.where(rng.random(n) < 0.1, 0, rng.integers(1, 5000, n))
    stats = FeatureStats(
        n_tokens=10_000,
        fire_counts=fire.astype(np.int64),
        activation_sums=fire.astype(np.float64),
        max_activation=np.where(fire > 0, 1.0, -np.inf),
    )
    root = _parse(density_histogram_svg(stats, bins=20))
    counts, _ = stats.log10_density_histogram(20)
    bins = [r for r in root.iter(f"{NS}rect") if r.get("class") == "bin"]
    assert [int(b.get("data-value")) for b in bins] == counts.tolist()
    dead = [r for r in root.iter(f"{NS}rect") if r.get("class") == "dead"]
    assert int(dead[0].get("data-value")) == int((fire == 0).sum())
    heights = np.array([float(b.get("height")) for b in bins])
    np.testing.assert_allclose(heights, counts / counts.max() * heights.max(), atol=0.1)
