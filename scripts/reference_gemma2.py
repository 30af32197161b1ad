"""Tiny random Gemma 2 checkpoints written by transformers, and transformers' logits on them.

Run in a scratch environment with torch + transformers (not project dependencies)::

    /work/scratch/saelens/bin/python scripts/reference_gemma2.py

It writes, for each case below, a folder ``tests/data/gemma2_tiny/<case>/`` with the
``config.json`` and ``model.safetensors`` that ``Gemma2ForCausalLM.save_pretrained`` produces,
and ``tests/data/reference_gemma2.json`` with the fixed token ids and transformers' logits
(eager attention, the only implementation that applies the attention soft-cap). The cases
exercise what Gemma 2 adds over Gemma 3: attention and final-logit soft-capping (``small_caps``
uses caps small enough to bend the logits a lot), sliding-window layers with a window shorter
than the sequence, grouped-query attention, a query scalar that is not ``head_dim`` (as in the
27B) and bfloat16 weights. The test ``tests/test_gemma2_model.py`` compares our model with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Gemma2Config, Gemma2ForCausalLM

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "tests" / "data" / "gemma2_tiny"
OUTPUT = REPO / "tests" / "data" / "reference_gemma2.json"
SEQ_LEN = 12
N_ROWS = 2

BASE = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    sliding_window=5,
    query_pre_attn_scalar=24,
    initializer_range=0.2,
)
CASES = {
    # Published caps (50, 30); float32 weights.
    "float32": dict(dtype=torch.float32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    # Caps small enough that tanh is far from linear on these logits.
    "small_caps": dict(
        dtype=torch.float32, attn_logit_softcapping=2.0, final_logit_softcapping=3.0
    ),
    # bfloat16 weights on disk (logits computed in float32 from the stored bf16 values).
    "bfloat16": dict(
        dtype=torch.bfloat16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0
    ),
}


def make_model(case: str, seed: int) -> Gemma2ForCausalLM:
    spec = CASES[case]
    torch.manual_seed(seed)
    config = Gemma2Config(
        **BASE,
        attn_logit_softcapping=spec["attn_logit_softcapping"],
        final_logit_softcapping=spec["final_logit_softcapping"],
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights, so that (1 + w) is not all ones
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    return model.to(spec["dtype"])


def main() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, BASE["vocab_size"], size=(N_ROWS, SEQ_LEN))
    tokens[:, 0] = 2  # BOS
    record = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "attn_implementation": "eager",
        "tokens": tokens.tolist(),
        "cases": {},
    }
    for seed, case in enumerate(CASES):
        model = make_model(case, seed)
        out_dir = FOLDER / case
        model.save_pretrained(out_dir, safe_serialization=True)
        # Read back what was written, computed in float32 (a fresh load also recomputes RoPE's
        # inverse frequencies in float32; model.float() would keep the bf16-rounded buffer).
        reference = Gemma2ForCausalLM.from_pretrained(
            out_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            logits = reference(torch.tensor(tokens)).logits.numpy()
        record["cases"][case] = {
            "folder": str(out_dir.relative_to(REPO)),
            "logits": np.round(logits.astype(np.float64), 7).tolist(),
        }
        print(case, "max |logit|", float(np.abs(logits).max()), file=sys.stderr)
    OUTPUT.write_text(json.dumps(record) + "\n")
    print("wrote", OUTPUT, file=sys.stderr)


if __name__ == "__main__":
    main()
