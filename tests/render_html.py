"""Render a local HTML file with headless Chromium: screenshot and DOM text.

Used by tests (a person-like check that a generated page really shows its
content) and from the command line:

  python tests/render_html.py page.html --png shot.png
"""

from __future__ import annotations

import argparse
import html.parser
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def chromium_path() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    binary = chromium_path()
    if binary is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)})")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [binary, *_FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"chromium failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}"
        )
    return proc


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    size: tuple[int, int] = (1200, 1600),
    timeout: float = 120,
) -> Path:
    """Screenshots ``html_path`` into ``png_path`` (viewport ``size`` = width, height)."""
    url = Path(html_path).resolve().as_uri()
    png_path = Path(png_path).resolve()
    _run([f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}", url], timeout)
    if not png_path.exists() or png_path.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot at {png_path}")
    return png_path


def dump_dom(html_path: str | Path, timeout: float = 120) -> str:
    """The page's DOM after scripts ran, serialized as HTML."""
    url = Path(html_path).resolve().as_uri()
    return _run(["--dump-dom", url], timeout).stdout


class _DomSummary(html.parser.HTMLParser):
    """Collects visible text, element counts and attributes of a serialized DOM."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.tags: dict[str, int] = {}
        self.attrs: list[tuple[str, dict[str, str | None]]] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attrs.append((tag, dict(attrs)))
        if tag in ("script", "style", "title"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style", "title") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)


def parse_dom(dom: str) -> _DomSummary:
    """Parses a DOM dump: ``.text`` (visible text pieces), ``.tags`` (counts), ``.attrs``."""
    summary = _DomSummary()
    summary.feed(dom)
    summary.close()
    return summary


def dom_text(html_path: str | Path, timeout: float = 120) -> str:
    """The visible text of the rendered page (script/style contents excluded)."""
    return "".join(parse_dom(dump_dom(html_path, timeout)).text)


HOSTILE_TOKENS = (
    "<script>alert(1)</script>",
    "&amp;",
    '"quoted"',
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">",
    "<script>document.body.setAttribute('data-pwned','1')</script>",
)


SAMPLE_SENTENCES = (
    " The cat sat on the mat .",
    " Paris is the city of lights .",
    " The river flows through London and then to the sea .",
    " We flew from Tokyo to Paris in the spring .",
    "\n def add ( x ) : \n return x + 1 \n",
    " The page printed <script>alert(1)</script> as plain text .",
    ' Escaped text such as &amp; and "quoted" words must stay text .',
    " A broken tag <img src=x onerror=\"document.body.setAttribute('data-pwned','1')\"> was shown .",
    " The cat and the dog slept in the sun .",
    " Old maps of London show the river .",
    " <script>document.body.setAttribute('data-pwned','1')</script> never runs .",
    " The tea was hot and the day was cold .",
)


def write_sample_cards_page(path: str | Path, seed: int = 0) -> dict:
    """Writes a feature-cards page from a small synthetic corpus; returns what it shows.

    The corpus is random sequences of `SAMPLE_SENTENCES` split on spaces (a space
    kept in front of each word).  Features 0..4 fire on chosen words (feature 2 on
    the hostile HTML-like tokens of `HOSTILE_TOKENS`); the other latents fire at
    random with densities spread over several decades, some never (dead), two
    almost always (dense).
    """
    import numpy as np

    from gemma_scope_pz.analysis.cards import write_feature_cards
    from gemma_scope_pz.analysis.examples import MaxActivatingExamples
    from gemma_scope_pz.analysis.stats import FeatureStats

    def split(sentence: str) -> list[str]:
        return [part if part == "\n" else " " + part for part in sentence.split(" ") if part]

    sentences = [split(s) for s in SAMPLE_SENTENCES]
    words = ["<pad>", "<eos>", "<bos>"]
    for s in sentences:
        words += [w for w in s if w not in words]
    ids = {w: i for i, w in enumerate(words)}
    triggers = {
        0: [" Paris", " London", " Tokyo"],
        1: [" def", " return"],
        2: [w for w in words[3:] if any(c in w for c in '<&"')],
        3: [" cat", " dog"],
        4: ["\n"],
    }
    rng = np.random.default_rng(seed)
    n_features, batch, seq = 256, 8, 40
    density = np.concatenate(
        [np.zeros(30), [0.5, 0.25], 10.0 ** rng.uniform(-4, -1, n_features - 32)]
    )
    density[5:] = rng.permutation(density[5:])
    density[:5] = 0.0
    state = MaxActivatingExamples.create(n_features, k=6, window=8)
    for step in range(6):
        tokens = np.zeros((batch, seq), np.int32)
        for b in range(batch):
            stream = [ids["<bos>"]]
            while len(stream) < seq:
                stream += [ids[w] for w in sentences[rng.integers(len(sentences))]]
            tokens[b] = stream[:seq]
        mask = tokens != ids["<bos>"]
        fires = rng.random((batch, seq, n_features)) < density
        latents = np.where(fires, rng.gamma(2.0, 1.0, fires.shape), 0.0).astype(np.float32)
        for f, trig in triggers.items():
            hit = np.isin(tokens, [ids[w] for w in trig])
            strength = rng.uniform(2.0, 9.0, size=hit.shape)
            latents[..., f] = np.where(hit, strength, 0.0)
            latents[:, 1:, f] += np.where(hit[:, :-1], 0.3 * strength[:, :-1], 0.0)  # spill-over
        state = state.update(tokens, latents, mask, row_offset=step * batch)

    def token_strings(token_ids):
        return [words[t] for t in token_ids]

    lens = {
        0: (
            [(" France", 3.1), (" England", 2.7), (" Japan", 2.2)],
            [(" banana", -2.0), ("(", -1.4)],
        ),
        2: ([("<script>alert(1)</script>", 1.5), ("&amp;", 1.1)], [('"quoted"', -0.9)]),
    }
    features = [0, 2, 1, 3]
    stats = FeatureStats.from_examples(state)
    write_feature_cards(
        path,
        features,
        state,
        stats,
        token_strings,
        lens,
        title="Sample SAE <demo> & cards",
        meta={"sae": "synthetic/256", "site": "blocks.6.resid_post", "note": "synthetic latents"},
        n_examples=4,
    )
    return {"features": features, "logit_lens": lens, "stats": stats.summary()}


def write_sample_plots_page(path: str | Path, seed: int = 0) -> dict:
    """Writes a page with the three inline SVG plots on hostile token strings; returns its data."""
    import numpy as np

    from gemma_scope_pz.analysis.plots import activation_svg, density_histogram_svg, token_loss_svg
    from gemma_scope_pz.analysis.stats import FeatureStats

    rng = np.random.default_rng(seed)
    tokens = ["<bos>", " The", " cat", *HOSTILE_TOKENS, " sat", "\n", " down"]
    clean = rng.uniform(0.5, 6.0, len(tokens) - 1)
    spliced = clean + rng.uniform(0.0, 1.5, len(tokens) - 1)
    activation = np.where(rng.random(len(tokens)) < 0.6, rng.gamma(2.0, 1.0, len(tokens)), 0.0)
    activation[0] = 40.0  # BOS
    fire = np.where(rng.random(500) < 0.1, 0, rng.integers(1, 20_000, 500))
    stats = FeatureStats(
        n_tokens=50_000,
        fire_counts=fire.astype(np.int64),
        activation_sums=fire.astype(np.float64),
        max_activation=np.where(fire > 0, 1.0, -np.inf),
    )
    body = (
        token_loss_svg(tokens[1:], clean, spliced, title="Per-token loss <clean> & spliced")
        + activation_svg(tokens, activation, title="Feature 7 along the prompt")
        + density_histogram_svg(stats)
    )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>plots</title></head>'
        f"<body style='background:#fff'>{body}</body></html>"
    )
    Path(path).write_text(page, encoding="utf-8")
    return {"tokens": tokens, "clean": clean, "spliced": spliced, "activation": activation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html")
    parser.add_argument(
        "--sample", action="store_true", help="first write a sample cards page to HTML"
    )
    parser.add_argument("--png", help="write a screenshot here")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1600)
    args = parser.parse_args()
    if args.sample:
        write_sample_cards_page(args.html)
    if args.png:
        print(screenshot(args.html, args.png, (args.width, args.height)))
    else:
        print(dom_text(args.html))


if __name__ == "__main__":
    main()
