"""HTML feature cards: escaping, structure, atomic writes, notebook/treescope display."""

import html.parser
import os
import re

import numpy as np
import pytest
import treescope

from gemma_scope_pz.analysis.cards import (
    FeatureReport,
    feature_card_html,
    write_feature_cards,
)
from gemma_scope_pz.analysis.examples import MaxActivatingExamples
from gemma_scope_pz.analysis.stats import FeatureStats

VOCAB = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<script>alert(1)</script>",
    "&amp;",
    '"quoted"',
    "it's",
    " plain",
    "\n",
    " word",
]
N_FEATURES = 6


def token_strings(ids):
    return [VOCAB[i] for i in ids]


@pytest.fixture(scope="module")
def state():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, len(VOCAB), size=(4, 10)).astype(np.int32)
    tokens[:, 0] = 2
    tokens[1, 4] = 3  # make sure the script token is present
    mask = tokens != 2
    latents = rng.uniform(-1, 3, size=(4, 10, N_FEATURES)).astype(np.float32)
    latents[1, 4, 1] = 10.0  # feature 1 peaks on the script token
    latents[..., 5] = 0.0  # dead feature
    return MaxActivatingExamples.create(N_FEATURES, k=3, window=4).update(tokens, latents, mask)


LENS = {1: ([("<script>alert(1)</script>", 2.5), ("&amp;", 1.0)], [('"quoted"', -1.5)])}


class _Checker(html.parser.HTMLParser):
    VOID = {"meta", "input", "br", "rect", "line", "img"}

    def __init__(self):
        super().__init__()
        self.stack, self.cards, self.scripts, self.errors = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "article" and "fc-card" in attrs.get("class", ""):
            self.cards.append(attrs["data-feature"])
        self.scripts += tag == "script"
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def _parse(text):
    checker = _Checker()
    checker.feed(text)
    checker.close()
    return checker


def test_page_escapes_and_is_well_formed(state, tmp_path):
    stats = FeatureStats.from_examples(state)
    path = write_feature_cards(
        tmp_path / "cards.html",
        [1, 0, 5],
        state,
        stats,
        token_strings,
        LENS,
        title='<b>SAE</b> & "cards"',
        meta={"site": "<i>blocks.6</i>", "n": 3},
    )
    text = path.read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&amp;amp;" in text  # the "&amp;" token itself is escaped
    assert "&quot;quoted&quot;" in text and "it&#x27;s" in text
    assert "<b>SAE</b>" not in text and "<i>blocks.6</i>" not in text
    assert "↵" in text  # newline token made visible
    checker = _parse(text)
    assert checker.errors == [] and checker.stack == []
    assert checker.cards == ["1", "0", "5"]
    assert checker.scripts == 1  # only the page's own filter script
    # Offline: the only URL is the SVG namespace, nothing is fetched.
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) <= {"http://www.w3.org/2000/svg"}
    assert "<svg" in text and "dead" in text
    # The dead feature has a card with no contexts; the peak token is emphasised.
    assert "no activating context" in text
    assert text.count("gs-tok fc-peak") == sum(len(state.top(f)) for f in (1, 0, 5))
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)


def test_card_values_and_peak(state):
    card = feature_card_html(1, state, FeatureStats.from_examples(state), token_strings, LENS)
    assert card.startswith("<style>")
    peak = re.search(r'class="gs-tok fc-peak"[^>]*title="([^"]*)">([^<]*)<', card)
    assert peak.group(2) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert "10" in peak.group(1)
    assert "+2.500" in card and "-1.500" in card
    fragment = feature_card_html(1, state, None, token_strings, standalone=False)
    assert "<style>" not in fragment and 'id="feature-1"' in fragment


def test_atomic_write_keeps_old_file_on_error(state, tmp_path):
    path = tmp_path / "cards.html"
    path.write_text("old")

    def broken(ids):
        return ["x"]  # wrong length

    with pytest.raises(ValueError, match="token_strings returned 1 strings"):
        write_feature_cards(path, [1], state, None, broken)
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["cards.html"]
    with pytest.raises(IndexError, match="feature 99"):
        write_feature_cards(path, [99], state, None, token_strings)


def test_feature_report_display(state):
    stats = FeatureStats.from_examples(state)
    report = FeatureReport.build(1, state, stats, token_strings, LENS, n_examples=2)
    assert len(report.examples) == 2
    assert report.stats["max_activation"] == pytest.approx(10.0)
    text = treescope.render_to_text(report)
    assert "FeatureReport" in text and "feature=1" in text
    assert 'id="feature-1"' in report._repr_html_()
