"""Person-like check: the feature-cards page rendered by headless Chromium.

Skipped when no Chromium is installed, except under CI (``CI`` set), where a
missing browser is a failure (.ci/install_chromium.sh installs it).
"""

import importlib.util
import os
import struct
import zlib
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "render_html", Path(__file__).with_name("render_html.py")
)
render_html = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_html)


def _require_chromium():
    if render_html.chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium not found under CI: run .ci/install_chromium.sh first")
        pytest.skip("Chromium not installed (run .ci/install_chromium.sh)")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    _require_chromium()
    path = tmp_path_factory.mktemp("cards") / "cards.html"
    shown = render_html.write_sample_cards_page(path)
    return path, shown


def test_dom_shows_cards_and_escaped_text(page):
    path, shown = page
    dom = render_html.parse_dom(render_html.dump_dom(path))
    text = "".join(dom.text)
    for f in shown["features"]:
        assert f"Feature {f}" in text
    assert "Sample SAE <demo> & cards" in text  # escaped title shows as typed
    # Hostile token strings appear as visible text, not as markup.
    assert "<script>alert(1)</script>" in text
    assert "<script>document.body.setAttribute('data-pwned','1')</script>" in text
    assert 'onerror="document.body.setAttribute' in text
    assert "&amp;" in text and '"quoted"' in text
    for top, bottom in shown["logit_lens"].values():
        for token, _ in [*top, *bottom]:
            assert token in text
    assert dom.tags.get("script") == 1 and "img" not in dom.tags
    assert not any("data-pwned" in attrs for _, attrs in dom.attrs)
    assert f"{len(shown['features'])} shown" in text  # the filter script ran


def _png_info(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat, pos = b"", 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_screenshot_is_not_blank(page, tmp_path):
    path, _ = page
    png = render_html.screenshot(path, tmp_path / "cards.png", size=(1000, 1200))
    width, height, pixels = _png_info(png.read_bytes())
    assert (width, height) == (1000, 1200)
    assert len(set(pixels)) > 50  # text, colours and the histogram, not a blank page


@pytest.fixture(scope="module")
def plots_page(tmp_path_factory):
    _require_chromium()
    path = tmp_path_factory.mktemp("plots") / "plots.html"
    return path, render_html.write_sample_plots_page(path)


def test_plots_render_with_escaped_labels(plots_page, tmp_path):
    path, shown = plots_page
    dom = render_html.parse_dom(render_html.dump_dom(path))
    text = "".join(dom.text)
    assert dom.tags.get("svg") == 3 and "script" not in dom.tags and "img" not in dom.tags
    assert not any("data-pwned" in attrs for _, attrs in dom.attrs)
    assert "Per-token loss <clean> & spliced" in text and "Feature 7 along the prompt" in text
    assert "<script>ale…" in text and "loss (nats)" in text and "activation" in text
    marks = {
        (attrs.get("class"), int(attrs["data-index"])): float(attrs["data-value"])
        for tag, attrs in dom.attrs
        if "data-index" in attrs and tag in ("circle", "rect")
    }
    for i, value in enumerate(shown["clean"]):
        assert marks[("clean", i)] == pytest.approx(value, rel=1e-5)
        assert marks[("spliced", i)] == pytest.approx(shown["spliced"][i], rel=1e-5)
    assert ("bar", 0) not in marks  # BOS left out
    for i, value in enumerate(shown["activation"][1:], start=1):
        assert marks[("bar", i)] == pytest.approx(value, rel=1e-5)
    png = render_html.screenshot(path, tmp_path / "plots.png", size=(900, 900))
    _, _, pixels = _png_info(png.read_bytes())
    assert len(set(pixels)) > 30  # lines, bars and text drawn
