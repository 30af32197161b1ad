"""Cost of Gemma Scope interventions on the Gemma 3 270M: SAE throughput and spliced forwards.

    python benchmarks/scope.py [--width 16384] [--tokens 4096] [--batch 4] [--seq 128] [--repeats 7]

(a) Encode + decode throughput (tokens/s) of a JumpReLU SAE of ``--width`` latents on real
    activations at blocks.9.resid_post, harvested with ``capture`` from the offline default corpus
    (English documentation). The SAE has random unit-norm directions and per-latent thresholds set
    so that about ``--l0`` latents fire per token, like a trained Gemma Scope SAE. Both the Penzai
    layer (``sae(x)``, named axes) and the plain-array twins (``encode_arrays``/``decode_arrays``)
    are timed.
(b) A full-logits forward with the SAE spliced in (with and without the error term) relative to
    the clean forward, batch ``--batch`` x ``--seq``.

Times are medians of ``--repeats`` runs after a warm-up (compile) run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import machine_info, median_seconds
from penzai import pz

SITE = "blocks.9.resid_post"


def _harvest(
    model, tokenizer, n_tokens: int, seq: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(activations [n, d_model] at SITE without BOS, the token contexts used)."""
    import gemma_scope_pz as gs
    from gemma_scope_pz.data.corpus import default_corpus
    from gemma_scope_pz.data.packing import pack_contexts

    n_contexts = -(-n_tokens // (seq - 1))
    n_contexts = -(-n_contexts // batch) * batch
    rows = itertools.islice(
        pack_contexts(default_corpus(), tokenizer, seq, tail="drop"), n_contexts
    )
    contexts = np.stack(list(rows))
    acts = [
        np.asarray(gs.capture(model, contexts[i : i + batch], SITE)[SITE])[:, 1:]
        for i in range(0, len(contexts), batch)
    ]
    x = np.concatenate(acts).reshape(-1, model.config.d_model)[:n_tokens]
    return x.astype(np.float32), contexts


def _jumprelu_sae(x: np.ndarray, width: int, l0: float, seed: int = 0):
    """A random JumpReLU SAE whose thresholds make about ``l0`` latents fire per token of ``x``."""
    from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

    d = x.shape[1]
    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((width, d)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    mean = x.mean(0)
    w_enc = w_dec.T.copy()
    b_enc = -mean @ w_enc
    pre = jnp.asarray(x - mean) @ jnp.asarray(w_enc)
    threshold = np.asarray(jnp.quantile(pre, 1.0 - l0 / width, axis=0)).astype(np.float32)
    threshold = np.maximum(threshold, 1e-3)
    meta = SaeMeta(d_in=d, d_sae=width, d_out=d, site_in=SITE, site_out=SITE)
    return AutoEncoder.from_arrays(
        w_enc, b_enc, w_dec, mean, threshold, activation="jumprelu", meta=meta
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--l0", type=float, default=64.0)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", default=None, help="checkpoint source (default: offline 270M)")
    args = parser.parse_args()

    import gemma_scope_pz as gs
    from gemma_scope_pz.scope.layers import decode_arrays, encode_arrays

    model = gs.load_model(args.model)
    tokenizer = gs.load_tokenizer()
    start = time.perf_counter()
    x, contexts = _harvest(model, tokenizer, args.tokens, args.seq, args.batch)
    harvest_s = time.perf_counter() - start
    sae = _jumprelu_sae(x, args.width, args.l0)

    # (a) SAE encode + decode on the harvested activations.
    xs = jnp.asarray(x)
    layer_fn = jax.jit(lambda s, v: s(v))
    frozen_sae = pz.freeze_params(sae)
    layer_s = median_seconds(lambda: layer_fn(frozen_sae, xs), args.repeats)
    params = {k: jnp.asarray(v) for k, v in sae.to_arrays().items()}
    plain_fn = jax.jit(lambda p, v: decode_arrays(p, encode_arrays(p, v, "jumprelu")))
    plain_s = median_seconds(lambda: plain_fn(params, xs), args.repeats)
    latents = np.asarray(jax.jit(lambda p, v: encode_arrays(p, v, "jumprelu"))(params, xs))
    l0 = float((latents != 0).sum(-1).mean())
    x_hat = np.asarray(plain_fn(params, xs))
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

    # (b) Spliced forward vs clean forward (full logits).
    tokens = contexts[: args.batch]
    clean_s = median_seconds(lambda: gs.forward(model, tokens), args.repeats)
    spliced = gs.splice(model, sae, SITE)
    spliced_s = median_seconds(lambda: gs.forward(spliced, tokens), args.repeats)
    with_error = gs.splice(model, sae, SITE, include_error=True)
    with_error_s = median_seconds(lambda: gs.forward(with_error, tokens), args.repeats)
    n_forward = tokens.size

    print(
        json.dumps(
            {
                "benchmark": "scope",
                "model": model.config.name,
                "site": SITE,
                "sae_width": args.width,
                "sae_l0_measured": round(l0, 1),
                "sae_fvu_random_dictionary": round(fvu, 4),
                "harvest_tokens": int(x.shape[0]),
                "harvest_seconds": round(harvest_s, 2),
                "sae_layer_tokens_per_s": round(x.shape[0] / layer_s, 1),
                "sae_layer_median_s": round(layer_s, 4),
                "sae_plain_arrays_tokens_per_s": round(x.shape[0] / plain_s, 1),
                "sae_plain_arrays_median_s": round(plain_s, 4),
                "forward_batch": list(tokens.shape),
                "clean_forward_median_s": round(clean_s, 4),
                "clean_forward_tokens_per_s": round(n_forward / clean_s, 1),
                "spliced_forward_median_s": round(spliced_s, 4),
                "spliced_over_clean": round(spliced_s / clean_s, 3),
                "spliced_with_error_median_s": round(with_error_s, 4),
                "spliced_with_error_over_clean": round(with_error_s / clean_s, 3),
                "target_spliced_over_clean": 1.3,
                "repeats": args.repeats,
                **machine_info(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
