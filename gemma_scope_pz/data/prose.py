"""Offline English prose from Debian packages, to mix into the code-heavy offline default corpus.

Three public-domain or BSD-licensed texts that Debian ships (``scripts/install_offline_prose.sh``
installs them: ``apt-get install fortunes-min fortunes cfi-en dict-devil``):

* ``cfi-en``: *Copyright Does Not Exist* by Linus Walleij, a narrative history of hacker culture
  (English translation; public domain, as its Debian copyright file states).
* ``dict-devil``: *The Devil's Dictionary* by Ambrose Bierce (1911; public domain).
* ``fortunes-min`` and ``fortunes``: the BSD ``fortune`` quotation files (literature, wisdom,
  people, science, poems, …; BSD licence), only the categories in ``FORTUNE_FILES``.

Documents are a few paragraphs (about ``CHUNK_CHARS`` characters) each, in a fixed order: book
chapters, dictionary entries, then quotation files, so the text is the same on every machine
with these package versions. ``prose_documents`` raises an error naming the missing packages and
the install command instead of silently returning less text.
"""

from __future__ import annotations

import functools
import gzip
import html.parser
import os
import re
import textwrap
from collections.abc import Iterable, Iterator

# Where the Debian packages put the texts; ``root`` (default "/") is prefixed for tests.
BOOK_DIR = "usr/share/doc/cfi-en/html"
DEVIL_DICT = "usr/share/dictd/devil.dict.dz"
DEVIL_INDEX = "usr/share/dictd/devil.index"
FORTUNE_DIR = "usr/share/games/fortunes"
PACKAGES = ("fortunes-min", "fortunes", "cfi-en", "dict-devil")
# Quotation files of ordinary English prose and verse; left out: computing jargon, chat logs,
# ASCII art, stereotypes and nonsense (computers, linux, perl, debian, knghtbrd, ascii-art,
# ethnic, men-women, drugs, zippy, startrek, translate-me, cookie, …).
FORTUNE_FILES = (
    "literature", "fortunes", "riddles",  # fortunes-min
    "art", "education", "food", "humorists", "kids", "law", "love", "medicine", "people",
    "pets", "platitudes", "politics", "science", "songs-poems", "sports", "wisdom", "work",
)  # fmt: skip
CHUNK_CHARS = 1500
# dictd's base64 digits for offsets and lengths in a ``.index`` file.
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@functools.lru_cache(maxsize=2)
def prose_documents(root: str = "/") -> tuple[str, ...]:
    """The prose documents (see the module docstring), built once per process.

    Raises:
      FileNotFoundError: naming the missing Debian packages and the command that installs them.
    """
    missing = missing_packages(root)
    if missing:
        raise FileNotFoundError(
            f"The offline prose corpus needs the Debian packages {', '.join(missing)} (not found "
            f"under {root}): run `apt-get install {' '.join(PACKAGES)}` as root, or "
            "`bash scripts/install_offline_prose.sh`"
        )
    docs = [*book_chapters(root), *devil_entries(root), *fortunes(root)]
    return tuple(chunk(docs))


def missing_packages(root: str = "/") -> list[str]:
    """The packages of ``PACKAGES`` whose files are not under ``root``."""
    needed = {
        "fortunes-min": os.path.join(FORTUNE_DIR, "literature"),
        "fortunes": os.path.join(FORTUNE_DIR, "wisdom"),
        "cfi-en": os.path.join(BOOK_DIR, "ch1web.htm"),
        "dict-devil": DEVIL_INDEX,
    }
    return [p for p in PACKAGES if not os.path.exists(os.path.join(root, needed[p]))]


def book_chapters(root: str = "/") -> Iterator[str]:
    """Each chapter of *Copyright Does Not Exist* as paragraphs of plain text (HTML removed)."""
    folder = os.path.join(root, BOOK_DIR)
    names = [n for n in os.listdir(folder) if re.fullmatch(r"(preface|ch\d+web)\.htm", n)]
    order = {n: (0 if n == "preface.htm" else int(re.sub(r"\D", "", n))) for n in names}
    for name in sorted(names, key=order.__getitem__):
        with open(os.path.join(folder, name), encoding="latin-1") as f:
            paragraphs = _html_paragraphs(f.read())
        if paragraphs:
            yield "\n\n".join(paragraphs)


def devil_entries(root: str = "/") -> Iterator[str]:
    """The entries of *The Devil's Dictionary*, in index order (dictd metadata left out)."""
    with gzip.open(os.path.join(root, DEVIL_DICT)) as f:  # dictzip is gzip-compatible
        data = f.read()
    with open(os.path.join(root, DEVIL_INDEX), encoding="utf-8") as f:
        for line in f:
            word, offset, length = line.rstrip("\n").split("\t")
            if word.startswith("00database"):
                continue
            start = _b64_number(offset)
            entry = data[start : start + _b64_number(length)].decode("utf-8").strip()
            if entry:
                yield textwrap.dedent(entry)


def fortunes(root: str = "/") -> Iterator[str]:
    """The quotations of the files in ``FORTUNE_FILES`` (each a fortune, indentation kept)."""
    for name in FORTUNE_FILES:
        with open(os.path.join(root, FORTUNE_DIR, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        for item in re.split(r"^%$", text, flags=re.MULTILINE):
            item = item.strip("\n")
            if item.strip():
                yield item.expandtabs(4).rstrip()


def chunk(texts: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """Joins consecutive short texts (blank line between) into documents of about ``size``
    characters; a longer text is cut at paragraph breaks."""
    pieces = (p for text in texts for p in re.split(r"\n\s*\n", text) if p.strip())
    current: list[str] = []
    length = 0
    for piece in pieces:
        if current and length + len(piece) > size:
            yield "\n\n".join(current)
            current, length = [], 0
        current.append(piece)
        length += len(piece) + 2
    if current:
        yield "\n\n".join(current)


def _b64_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


class _Paragraphs(html.parser.HTMLParser):
    """Collects the text of ``<p>`` elements, whitespace collapsed."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._parts: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            self._flush()
            self._parts = []

    def handle_endtag(self, tag):
        if tag == "p":
            self._flush()

    def handle_data(self, data):
        if self._parts is not None:
            self._parts.append(data)

    def _flush(self) -> None:
        if self._parts is not None:
            text = " ".join("".join(self._parts).split())
            if len(text.split()) >= 8:  # navigation links and headings are shorter
                self.paragraphs.append(text)
        self._parts = None


def _html_paragraphs(markup: str) -> list[str]:
    parser = _Paragraphs()
    parser.feed(markup)
    parser.close()
    parser._flush()
    return parser.paragraphs
