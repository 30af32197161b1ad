"""Streaming training throughput and FLOP utilisation on a randomly initialised Gemma (no weights).

Usage: python benchmarks/stream_throughput.py [--preset 270m] [--tokens 2000000] [--d-sae 16384]
       [--many] [--peak] [--peak-tflops 989]

Speed does not depend on the weights' values, so this runs anywhere the package runs, an
accelerator machine with no model files included: a Gemma 3 preset with ``random_params``, and
synthetic documents of random token ids (a whitespace tokenizer: document text is the ids).
Prints one JSON object:

* ``forward``: tokens/s of the jitted LM forward alone, stopped after the deepest site (the
  refill's forward, ``run_with_captures``), in ``--model-dtype``;
* ``one``: ``train_streaming`` of one JumpReLU SAE (``--d-sae`` latents) at ``--site``;
* ``many`` (``--many``): SAEs at three residual sites and a transcoder at every layer, from one
  stream (``--many-d-sae`` latents each);

each with tokens/s trained in the loop of a second run with the same settings (the first, a few
steps long, compiles the programs: ``setup_s`` is its wall time) and the model FLOPs per second: the
forward's matmul FLOPs (``2 * weights`` per token through the deepest block, plus attention
scores and values, ``4 * context * heads * head_dim`` per token and layer, the full square as
computed) for every token forwarded, plus ``10 * batch * d_in * d_sae`` per dictionary and step.
With ``--peak`` (a bfloat16 ``8192^3`` matmul on the device, ``common.peak_flops``) and
``--peak-tflops`` (the datasheet's dense bfloat16 rate) each reports ``mfu`` / ``mfu_datasheet``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import add_cpu_matmul_option, apply_cpu_matmul, machine_info, peak_flops
from penzai import pz

from gemma_scope_pz.data.corpus import Corpus
from gemma_scope_pz.io import write_atomically
from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.gemma3 import Gemma3LM, random_params
from gemma_scope_pz.scope.interventions import run_with_captures
from gemma_scope_pz.train.config import TrainConfig
from gemma_scope_pz.train.harvest import model_in_dtype
from gemma_scope_pz.train.streaming import StreamConfig, train_streaming


class IdTokenizer:
    """Text is whitespace-separated token ids; BOS 2, EOS 1, padding 0."""

    bos_id, eos_id, pad_id = 2, 1, 0

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = [int(t) for t in text.split()]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos


def synthetic_corpus(vocab: int, n_docs: int = 400, seed: int = 0) -> Corpus:
    """Documents of 100..1500 random token ids (ids 3..vocab-1)."""
    rng = np.random.default_rng(seed)
    docs = [
        " ".join(map(str, rng.integers(3, vocab, int(n)))) for n in rng.integers(100, 1500, n_docs)
    ]
    return Corpus.from_texts(docs, name="synthetic")


def forward_flops_per_token(config: Gemma3Config, last_block: int, context: int) -> float:
    """Matmul FLOPs per token of the forward through block ``last_block`` (module docstring)."""
    c = config
    weights = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.d_model * c.d_ff
    attention = 4 * context * c.n_heads * c.head_dim
    return (last_block + 1) * (2 * weights + attention)


def _sae(site: str, d_in: int, d_sae: int, batch: int, tokens: int, site_out: str | None = None):
    sae = {"d_in": d_in, "d_sae": d_sae, "site_in": site, "architecture": "jumprelu"}
    if site_out:
        sae["site_out"] = site_out
    return TrainConfig(
        sae=sae, run={"batch_size": batch, "total_tokens": tokens, "progress_bar": False}
    )


def _utilisation(flops_per_s: float, peak: float | None, args) -> dict:
    out = {"model_flops_per_s": flops_per_s}
    if peak:
        out["mfu"] = flops_per_s / peak
    if args.peak_tflops:
        out["mfu_datasheet"] = flops_per_s / (args.peak_tflops * 1e12)
    return out


def forward_rate(model, config: Gemma3Config, site: str, args, peak) -> dict:
    """Tokens/s of the truncated forward on one refill's worth of contexts."""
    n = StreamConfig(context_len=args.context).n_contexts(args.batch)
    tokens = jnp.asarray(
        np.random.default_rng(1).integers(3, config.vocab_size, (n, args.context)), jnp.int32
    )
    positions = jnp.broadcast_to(jnp.arange(args.context, dtype=jnp.int32), tokens.shape)
    frozen = model_in_dtype(pz.freeze_params(model), args.model_dtype)
    run = jax.jit(lambda m, t: run_with_captures(m, t, positions, (site,), True)[1])
    jax.block_until_ready(run(frozen, tokens))
    repeats = 10
    start = time.perf_counter()
    for _ in range(repeats):
        out = run(frozen, tokens)
    jax.block_until_ready(out)
    rate = repeats * tokens.size / (time.perf_counter() - start)
    last = int(site.split(".")[1])
    flops = rate * forward_flops_per_token(config, last, args.context)
    return {"tokens_per_s": rate, **_utilisation(flops, peak, args)}


def stream_rate(model, config: Gemma3Config, configs: dict, args, peak) -> dict:
    """``train_streaming`` of ``configs``: loop tokens/s (trained, steady) and model FLOP/s."""
    stream = StreamConfig(context_len=args.context, progress_bar=False, log_every=10**9,
                          packing="concat", model_dtype=args.model_dtype)  # fmt: skip
    corpus = synthetic_corpus(config.vocab_size)

    def run(stop_at=None):
        return train_streaming(model, configs, corpus, tokenizer=IdTokenizer(), stream=stream,
                               stop_at=stop_at)  # fmt: skip

    start = time.perf_counter()
    run(stop_at=2 * stream.refill_every)  # compiles the programs (kept for the same settings)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    result = run()
    total = time.perf_counter() - start
    last = max(int((c.sae.site_out or c.sae.site_in).split(".")[1]) for c in configs.values())
    # Tokens forwarded per token trained: each refill forwards n contexts for refill_every batches.
    n = stream.n_contexts(args.batch)
    forwarded = n * args.context / (stream.refill_every * args.batch)
    per_token = forwarded * forward_flops_per_token(config, last, args.context) + sum(
        10 * c.sae.d_in * c.sae.d_sae for c in configs.values()
    )
    rate = result.tokens_per_second
    return {"n_dictionaries": len(configs), "setup_s": setup, "total_s": total, "tokens_per_s": rate,
            "forwarded_per_trained_token": forwarded,
            **_utilisation(rate * per_token, peak, args)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="270m")
    parser.add_argument("--site", default=None, help="default: the middle block's resid_post")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--model-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--many", action="store_true")
    parser.add_argument("--many-d-sae", type=int, default=4096)
    parser.add_argument("--many-tokens", type=int, default=2_000_000)
    parser.add_argument("--out", default=None, help="also write the JSON here after each part")
    parser.add_argument("--peak", action="store_true", help="measure the bf16 peak; report MFU")
    parser.add_argument("--peak-tflops", type=float, default=None, help="datasheet bf16 peak")
    add_cpu_matmul_option(parser)
    args = parser.parse_args()
    apply_cpu_matmul(args)
    config = Gemma3Config.preset(args.preset)
    site = args.site or f"blocks.{config.n_layers // 2}.resid_post"
    began = time.perf_counter()
    model = Gemma3LM.from_params(config, random_params(config))
    report = {**machine_info(), "load_average": os.getloadavg(), "preset": args.preset,
              "settings": vars(args), "site": site, "model_build_s": time.perf_counter() - began}  # fmt: skip
    peak = peak_flops() if args.peak else None
    report["peak_flops_per_s"] = peak
    report["forward"] = _save(report, args) and forward_rate(model, config, site, args, peak)
    one = {"sae": _sae(site, config.d_model, args.d_sae, args.batch, args.tokens)}
    report["one"] = _save(report, args) and stream_rate(model, config, one, args, peak)
    if args.many:
        d = config.d_model
        many = {}
        for b in (config.n_layers // 4, config.n_layers // 2, 3 * config.n_layers // 4):
            many[f"res{b}"] = _sae(
                f"blocks.{b}.resid_post", d, args.many_d_sae, args.batch, args.many_tokens
            )
        for layer in range(config.n_layers):
            many[f"tc{layer}"] = _sae(f"blocks.{layer}.mlp_in", d, args.many_d_sae, args.batch,
                                      args.many_tokens, site_out=f"blocks.{layer}.mlp_out")  # fmt: skip
        report["many"] = _save(report, args) and stream_rate(model, config, many, args, peak)
    print(_save(report, args))


def _save(report: dict, args) -> str:
    """``report`` as JSON, also written to ``--out`` (so an interrupted run leaves its parts)."""
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        write_atomically(args.out, text + "\n")
    return text


if __name__ == "__main__":
    main()
