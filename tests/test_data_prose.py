"""The offline English prose (Debian's fortunes, cfi-en and dict-devil) and its mix into the default
corpus: parsers checked on small files in the packages' formats, then on the installed packages."""

import gzip

import pytest

from gemma_scope_pz.data import prose
from gemma_scope_pz.data.corpus import default_corpus, hash_documents, interleave, load_corpus

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"  # dictd's digits


def _b64(n: int) -> str:
    digits = ""
    while True:
        n, r = divmod(n, 64)
        digits = B64[r] + digits
        if n == 0:
            return digits


def _fake_root(tmp_path):
    """The four packages' files, a few entries each, in the packages' own formats."""
    book = tmp_path / prose.BOOK_DIR
    book.mkdir(parents=True)
    (book / "ch2web.htm").write_text(
        "<html><p><a href='x'>INDEX</a></p><p>The second chapter tells how &amp; why the "
        "   hobbyists met.</p></html>"
    )
    (book / "ch1web.htm").write_text("<p>Chapter one begins with a story about radio amateurs.")
    (book / "preface.htm").write_text("<P>A preface comes first, before any of the chapters.</P>")
    (book / "notes.htm").write_text("<p>Not a chapter file, so it is never read at all.</p>")
    entries = [
        "ABSURDITY, n.  A statement at odds with one's own opinion.\n",
        "BORE, n.  A person who talks.\n",
    ]
    data = "00-database-info\nsome header\n" + "".join(entries)
    devil = tmp_path / prose.DEVIL_DICT
    devil.parent.mkdir(parents=True)
    with gzip.open(devil, "wt") as f:
        f.write(data)
    index = ["00databaseinfo\tA\tb"]
    for entry in entries:
        index.append(f"{entry.split(',')[0]}\t{_b64(data.index(entry))}\t{_b64(len(entry))}")
    (tmp_path / prose.DEVIL_INDEX).write_text("\n".join(index) + "\n")
    fortunes = tmp_path / prose.FORTUNE_DIR
    fortunes.mkdir(parents=True)
    for name in prose.FORTUNE_FILES:
        (fortunes / name).write_text(f"A {name} saying.\n\t\t-- Someone\n%\nAnother one.\n%\n")
    (fortunes / "computers").write_text("Never read: not in FORTUNE_FILES.\n%\n")
    return tmp_path


def test_parsers_read_each_format(tmp_path):
    root = str(_fake_root(tmp_path))
    assert prose.missing_packages(root) == []
    assert list(prose.book_chapters(root)) == [
        "A preface comes first, before any of the chapters.",
        "Chapter one begins with a story about radio amateurs.",
        "The second chapter tells how & why the hobbyists met.",
    ]
    assert list(prose.devil_entries(root)) == [
        "ABSURDITY, n.  A statement at odds with one's own opinion.",
        "BORE, n.  A person who talks.",
    ]
    quotes = list(prose.fortunes(root))
    assert quotes[:3] == [
        "A literature saying.\n        -- Someone",
        "Another one.",
        "A fortunes saying.\n        -- Someone",
    ]
    assert len(quotes) == 2 * len(prose.FORTUNE_FILES)
    docs = prose.prose_documents(root)
    assert all(len(d) <= prose.CHUNK_CHARS + 100 for d in docs)
    joined = "\n\n".join(docs)
    assert joined.startswith("A preface comes first") and "Never read" not in joined
    assert joined.count("Another one.") == len(prose.FORTUNE_FILES)


def test_chunk_joins_short_texts_and_cuts_long_ones_at_paragraphs():
    assert list(prose.chunk(["ab", "cd", "ef"], size=6)) == ["ab\n\ncd", "ef"]
    assert list(prose.chunk(["one\n\ntwo\n \nthree"], size=4)) == ["one", "two", "three"]


def test_missing_packages_are_named_with_the_install_command(tmp_path):
    root = _fake_root(tmp_path)
    (root / prose.DEVIL_INDEX).unlink()
    assert prose.missing_packages(str(root)) == ["dict-devil"]
    with pytest.raises(
        FileNotFoundError,
        match=r"packages dict-devil .*apt-get install fortunes-min fortunes cfi-en dict-devil",
    ):
        prose.prose_documents(str(root))


def test_interleave_spreads_both_lists_evenly_by_characters():
    a = [f"a{i}" * 5 for i in range(6)]  # 60 characters
    b = ["B" * 30, "C" * 30]  # 60 characters
    mixed = interleave(a, b)
    assert sorted(mixed) == sorted(a + b)
    assert [d for d in mixed if d.startswith("a")] == a  # order within each list is kept
    # the next document comes from the list with the smaller share used (ties: the first list)
    assert mixed == (a[0], b[0], a[1], a[2], a[3], b[1], a[4], a[5])
    assert interleave([], ["x"]) == ("x",) and interleave(["x"], []) == ("x",)


def test_installed_prose_and_the_default_plus_prose_corpus():
    docs = prose.prose_documents()  # scripts/install_offline_prose.sh installs the packages
    assert len(docs) > 1000 and sum(map(len, docs)) > 1_500_000
    text = "\n".join(docs)
    assert "hacker" in text and "Mark Twain" in text and "AUCTIONEER" in text
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.93 * len(text)  # prose, not code
    plain = default_corpus()
    mixed = load_corpus("default+prose")
    assert mixed.name == "python-stdlib-docs+prose"
    assert mixed.fingerprint.startswith(plain.fingerprint.split("-")[0] + "+prose-")
    assert mixed.fingerprint.endswith(hash_documents(list(mixed)))
    assert sorted(mixed) == sorted([*plain, *docs])
    first_half = list(mixed)[: len(list(mixed)) // 2]
    share = sum(len(d) for d in first_half if d in set(docs)) / sum(map(len, first_half))
    assert 0.4 < share < 0.65  # training text (the start) and held-out text (the end) both mixed
    assert load_corpus(None).fingerprint == plain.fingerprint  # the default itself is unchanged
