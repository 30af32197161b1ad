"""Wall time and peak memory of `gs.attribute` on the offline 270M with transcoders on every layer.

Random JumpReLU transcoders (``--d-sae`` latents, thresholds set so a few dozen fire per token)
on all 18 layers; one fresh subprocess per prompt length, so each peak is its own. Reports the
first call (compilation included) and a second, warm call, and peak RSS (VmHWM).

Usage: python benchmarks/attribution.py [--lengths 16 64 256] [--d-sae 4096]
       [--max-feature-nodes 1024] [--batch-size 64] [--calls 2] [--circuit-tracer-python PY]
       [--timeout-s 1200] [--out FILE]
Prints one JSON object (and rewrites ``--out`` after every child, so a long run keeps what it
has). A child past ``--timeout-s`` is stopped and recorded as ``{"timed_out_after_s": ...}``.

With ``--circuit-tracer-python`` (a Python with torch, transformers<=4.57.3, nnsight==0.6.3 and
circuit-tracer==0.5.0; not project dependencies), the same 270M is written as a transformers
folder (with a stand-in word-level tokenizer: prompts are token ids) and circuit-tracer runs on
the same tokens and the same random transcoders (same numpy seeds), each in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_info

CHILD_BODY = r"""
import json, sys, time
import gemma_scope_pz as gs
from gemma_scope_pz.scope.layers import AutoEncoder

length, d_sae, cap, batch, calls = (int(a) for a in sys.argv[1:6])
model = gs.load_model()
d, n_layers = model.config.d_model, model.config.n_layers
transcoders = {
    i: AutoEncoder.from_arrays(a["w_enc"], np.zeros(d_sae, np.float32), a["w_dec"],
                               np.zeros(d, np.float32), np.full(d_sae, 2.5, np.float32))
    for i, a in enumerate(random_transcoder_arrays(d, d_sae, n_layers))
}
tokens = prompt(length)
base = peak_kib()
times = []
for _ in range(calls):
    start = time.perf_counter()
    graph = gs.attribute(model, transcoders, tokens, max_feature_nodes=cap, batch_size=batch)
    times.append(time.perf_counter() - start)
print(json.dumps({"tokens": length, "first_s": times[0], "warm_s": times[1] if calls > 1 else None,
                  "active_features": int(len(graph.active_features)),
                  "feature_nodes": int(graph.n_features),
                  "peak_rss_mib": peak_kib() / 1024, "rss_before_mib": base / 1024}))
"""


SETUP = r"""
import numpy as np

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0

def random_transcoder_arrays(d, d_sae, n_layers):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_layers):
        out.append(dict(
            w_enc=(rng.standard_normal((d, d_sae)) / np.sqrt(d)).astype(np.float32),
            w_dec=(0.02 * rng.standard_normal((d_sae, d))).astype(np.float32),
        ))
    return out

def prompt(length):
    rng = np.random.default_rng(1)
    return np.concatenate([[2], rng.integers(1000, 20000, length - 1)])
"""

TORCH_CHILD = (
    SETUP
    + r"""
import json, sys, time
import torch
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
from circuit_tracer.transcoder.activation_functions import JumpReLU

hf_dir, length, d_sae, cap, batch, calls = sys.argv[1], *(int(a) for a in sys.argv[2:7])
cfg = json.load(open(hf_dir + "/config.json"))
d, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
layers = {}
for i, a in enumerate(random_transcoder_arrays(d, d_sae, n_layers)):
    tc = SingleLayerTranscoder(d, d_sae, JumpReLU(torch.full((d_sae,), 2.5)), i,
                               device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        tc.W_enc.copy_(torch.tensor(a["w_enc"].T.copy()))
        tc.W_dec.copy_(torch.tensor(a["w_dec"]))
    layers[i] = tc
tset = TranscoderSet(layers, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out")
model = ReplacementModel.from_pretrained_and_transcoders(
    hf_dir, tset, backend="nnsight", device=torch.device("cpu"), dtype=torch.float32)
tokens = torch.tensor(prompt(length))
base, times = peak_kib(), []
for _ in range(calls):
    start = time.perf_counter()
    graph = attribute(tokens, model, max_feature_nodes=cap, batch_size=batch)
    times.append(time.perf_counter() - start)
print(json.dumps({"tokens": length, "first_s": times[0], "warm_s": times[1] if calls > 1 else None,
                  "active_features": int(len(graph.active_features)),
                  "feature_nodes": int(len(graph.selected_features)),
                  "peak_rss_mib": peak_kib() / 1024, "rss_before_mib": base / 1024}))
"""
)


CHILD = SETUP + CHILD_BODY


def write_hf_folder(folder: Path) -> None:
    """The offline 270M as a transformers Gemma 3 folder (float32) with a stand-in tokenizer."""
    import numpy as np
    from safetensors.numpy import save_file

    from gemma_scope_pz.models.checkpoints import load_params
    from gemma_scope_pz.models.checkpoints.hf import HF_BLOCK_NAMES

    c, params = load_params()
    to_hf = {v: k for k, v in HF_BLOCK_NAMES.items()}
    tensors = {"model.embed_tokens.weight": params["embedding"],
               "model.norm.weight": params["final_norm"] - 1.0}  # fmt: skip
    for key, value in params.items():
        if not key.startswith("blocks."):
            continue
        _, i, short = key.split(".", 2)
        if short.endswith("norm"):
            value = value - 1.0
        elif short in ("attn.query", "attn.key", "attn.value"):
            value = value.transpose(1, 2, 0).reshape(-1, c.d_model)
        elif short == "attn.output":
            value = value.transpose(2, 0, 1).reshape(c.d_model, -1)
        else:
            value = value.T
        tensors[f"model.layers.{i}.{to_hf[short]}.weight"] = value
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              str(folder / "model.safetensors"))  # fmt: skip
    config = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "query_pre_attn_scalar": c.query_pre_attn_scalar, "sliding_window": c.sliding_window,
        "rope_theta": c.global_rope_base, "rope_local_base_freq": c.local_rope_base,
        "rms_norm_eps": c.norm_eps, "max_position_embeddings": c.max_seq_len,
        "layer_types": ["full_attention" if c.is_global(i) else "sliding_attention"
                        for i in range(c.n_layers)],
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        "torch_dtype": "float32",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    vocab = {f"t{i}": i for i in range(c.vocab_size)}
    vocab.update({"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3})
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    special = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**special, "tokenizer_class": "PreTrainedTokenizerFast"})
    )


def _child(python: str, code: str, argv: list, timeout_s: float) -> dict:
    load = os.getloadavg()[0]
    try:
        out = subprocess.run(
            [python, "-c", code, *map(str, argv)],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"tokens": argv[-5], "timed_out_after_s": timeout_s, "load_before": load}
    except subprocess.CalledProcessError as e:  # e.g. -9: killed by the kernel's OOM killer
        tail = e.stderr.strip().splitlines()[-1:] if e.stderr else []
        return {"tokens": argv[-5], "failed_returncode": e.returncode, "stderr_tail": tail}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {**row, "load_before": load, "load_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--max-feature-nodes", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calls", type=int, default=2, help="calls per process (1: no warm call)")
    parser.add_argument("--no-ours", action="store_true", help="only circuit-tracer")
    parser.add_argument("--timeout-s", type=float, default=1200.0, help="per child process")
    parser.add_argument("--out", default=None, help="JSON file rewritten after every child")
    parser.add_argument(
        "--circuit-tracer-python", default=None, help="a Python with circuit-tracer"
    )
    args = parser.parse_args()
    result = {"machine": machine_info(), "d_sae": args.d_sae, "gemma_scope_pz": []}
    result.update(max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)

    def record(key: str, row: dict) -> None:
        result.setdefault(key, []).append(row)
        print(json.dumps({key: row}), file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        if args.circuit_tracer_python:
            write_hf_folder(Path(tmp) / "hf")
        for length in args.lengths:  # interleaved: ours, then circuit-tracer, per length
            argv = [length, args.d_sae, args.max_feature_nodes, args.batch_size, args.calls]
            if not args.no_ours:
                record("gemma_scope_pz", _child(sys.executable, CHILD, argv, args.timeout_s))
            if args.circuit_tracer_python:
                py, hf = args.circuit_tracer_python, f"{tmp}/hf"
                record("circuit_tracer", _child(py, TORCH_CHILD, [hf, *argv], args.timeout_s))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
