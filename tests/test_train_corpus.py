"""Corpus sources, specs and the offline default corpus."""

import gzip
import json
import sys
import types

import pytest

from gemma_scope_pz.data import offline as corpus_mod
from gemma_scope_pz.data.corpus import Corpus, default_corpus, hash_documents, load_corpus


def test_texts_reiterable_and_fingerprint():
    c = Corpus.from_texts(["alpha", "beta"], name="two")
    assert list(c) == ["alpha", "beta"] == list(c)
    assert c.label == f"two@{c.fingerprint}"
    assert c.fingerprint == Corpus.from_texts(["alpha", "beta"]).fingerprint
    # Document boundaries count: the same characters split differently hash differently.
    assert hash_documents(["alph", "abeta"]) != c.fingerprint
    assert c.stats() == {"documents": 2, "chars": 9}
    assert list(c.head(1)) == ["alpha"]


def test_non_string_document_names_corpus():
    c = Corpus("broken", lambda: ["ok", 3])
    with pytest.raises(TypeError, match=r"'broken'.*document 1 is int"):
        list(c)


def test_files_glob_per_file_and_per_paragraph(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\n\nWith two paragraphs.\n")
    (tmp_path / "a.txt").write_text("First file, one paragraph.\n")
    (tmp_path / "skip.json").write_text("{}")
    per_file = load_corpus(str(tmp_path / "*.txt"))
    assert list(per_file) == [
        "First file, one paragraph.\n",
        "Second file.\n\nWith two paragraphs.\n",
    ]
    per_para = load_corpus(str(tmp_path / "*.txt"), split="paragraph")
    assert list(per_para) == ["First file, one paragraph.", "Second file.", "With two paragraphs."]
    # A directory means its text files; same bytes → same fingerprint regardless of location.
    assert list(load_corpus(str(tmp_path))) == list(per_file)
    other = tmp_path / "copy"
    other.mkdir()
    for name in ("a.txt", "b.txt"):
        (other / name).write_bytes((tmp_path / name).read_bytes())
    assert load_corpus(str(other / "*.txt")).fingerprint == per_file.fingerprint
    (other / "b.txt").write_text("changed")
    assert load_corpus(str(other / "*.txt")).fingerprint != per_file.fingerprint
    assert per_para.fingerprint != per_file.fingerprint


def test_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_corpus(str(tmp_path / "nothing-here*.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(ValueError, match="bad.txt"):
        list(load_corpus(str(bad)))
    with pytest.raises(ValueError, match="split"):
        Corpus.from_files(str(bad), split="sentence")


def test_jsonl_field_gzip_and_errors(tmp_path):
    rows = [{"text": "one", "body": "uno"}, {"text": "two", "body": "dos"}]
    plain = tmp_path / "d.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "three", "body": "tres"}) + "\n")
    assert list(load_corpus(str(plain))) == ["one", "two"]
    assert list(load_corpus(str(plain), field="body")) == ["uno", "dos"]
    both = load_corpus([str(plain), str(tmp_path / "e.jsonl.gz")])
    assert list(both) == ["one", "two", "three"]
    with pytest.raises(ValueError, match=r"d\.jsonl:1: no field 'title'"):
        list(load_corpus(str(plain), field="title"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        list(load_corpus(str(broken)))


def test_list_spec_of_texts():
    c = load_corpus(["not a path", "another text"])
    assert list(c) == ["not a path", "another text"]
    assert load_corpus(c) is c


def test_hf_spec_with_fake_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config, *, split, streaming, revision):
        calls.append((name, config, split, streaming, revision))
        return iter([{"text": "hub doc 1"}, {"text": "hub doc 2"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    c = load_corpus("hf:some/dataset:cfg:validation")
    assert c.name == "hf:some/dataset:cfg:validation"
    assert list(c) == ["hub doc 1", "hub doc 2"]
    assert calls == [("some/dataset", "cfg", "validation", True, None)]
    assert c.fingerprint.startswith("spec-")  # no download needed to fingerprint
    assert c.fingerprint != load_corpus("hf:some/dataset:train").fingerprint
    assert list(load_corpus("hf:some/dataset:train")) == ["hub doc 1", "hub doc 2"]
    with pytest.raises(ValueError, match="no field 'content'"):
        list(load_corpus("hf:some/dataset:train", field="content"))
    with pytest.raises(ValueError, match="hf:<dataset>"):
        load_corpus("hf:a:b:c:d")


def test_hf_without_datasets_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    c = load_corpus("hf:some/dataset:train")
    with pytest.raises(ImportError, match="pip install datasets"):
        list(c)


def test_docstring_and_comment_extraction():
    source = '''"""Module doc."""
import os

# A comment block written in plain English words,
# spread over two lines.
x = 1  # trailing comments are not blocks
# x = compute(1, 2) + [3]

class A:
    """Class doc."""

    if True:
        def f(self):
            """Nested method doc."""
            def g():
                """Inner function doc."""
'''
    import ast

    docs = list(corpus_mod._docstrings(ast.parse(source)))
    assert sorted(docs) == sorted(
        ["Module doc.", "Class doc.", "Nested method doc.", "Inner function doc."]
    )
    blocks = list(corpus_mod._comment_blocks(source))
    assert blocks == ["A comment block written in plain English words,\nspread over two lines."]


@pytest.mark.slow
def test_default_corpus_deterministic_and_large():
    first = corpus_mod.build_default_documents()  # uncached build
    corpus = default_corpus()  # cached build
    assert hash_documents(first) == corpus.fingerprint.split("-")[-1]
    version = ".".join(map(str, sys.version_info[:3]))
    assert corpus.fingerprint.startswith(f"py{version}-")
    assert corpus.name == "python-stdlib-docs"
    assert default_corpus().fingerprint == corpus.fingerprint
    assert load_corpus(None).fingerprint == load_corpus("default").fingerprint
    docs = list(corpus)
    assert len(docs) == len(set(docs)) > 1000
    assert min(map(len, docs)) >= 200
    assert sum(map(len, docs)) > 1_000_000  # > ~250k tokens at ~4 chars/token


def test_moved_names_keep_working_with_a_deprecation_warning():
    import importlib
    import sys

    from gemma_scope_pz.data import packing
    from gemma_scope_pz.train import harvest

    for old in ("gemma_scope_pz.train.corpus", "gemma_scope_pz.train.default_corpus"):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match="moved to gemma_scope_pz.data"):
            module = importlib.import_module(old)
        assert module.default_corpus is default_corpus
    with pytest.warns(DeprecationWarning, match="data.packing.pack_contexts"):
        assert harvest.pack_contexts is packing.pack_contexts
    with pytest.raises(AttributeError, match="no_such_name"):
        harvest.no_such_name  # noqa: B018
