"""End-to-end text → trained SAE on Gemma 3 270M: streaming vs the activation cache, and many dictionaries.

Usage: python benchmarks/e2e_train.py [--quick] [--tokens 200000] [--site blocks.9.resid_post]

Prints one JSON object. ``cache``: harvest the activations to host memory (``harvest_array``), then
``train``; ``stream``: ``train_streaming`` (forward, buffer of 4 refills and update on the
device). Both train the same JumpReLU and TopK (k=32) dictionaries (640 → ``--d-sae``, context
128, ``--batch`` tokens per step, ``--tokens`` tokens), and the wall times include compilation, as
a user waits for them.
``many``: three SAEs at blocks 3, 6 and 9 from one stream against streaming each alone.
The machine may be shared: ``load_average`` says how busy it was.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from common import machine_info

import gemma_scope_pz as gs
from gemma_scope_pz.train.config import TrainConfig
from gemma_scope_pz.train.harvest import harvest_array
from gemma_scope_pz.train.streaming import StreamConfig, train_streaming
from gemma_scope_pz.train.trainer import train


def _config(site: str, arch: str, args) -> TrainConfig:
    return TrainConfig(
        sae={"d_in": 640, "d_sae": args.d_sae, "site_in": site, "architecture": arch, "k": 32},
        run={"batch_size": args.batch, "total_tokens": args.tokens, "progress_bar": False},
    )


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cache_path(model, tok, config: TrainConfig, args) -> dict:
    """Harvest then train: seconds of each and tokens/s overall."""
    site = config.sae.site_in
    harvest_s, (rows, _) = _timed(
        lambda: harvest_array(
            model, tok, None, [site], n_tokens=args.tokens, batch_size=32, progress=False
        )  # fmt: skip
    )
    train_s, result = _timed(lambda: train(config, rows[site]))
    total = harvest_s + train_s
    return {"harvest_s": harvest_s, "train_s": train_s, "total_s": total,
            "tokens_per_s": args.tokens / total, "final_fvu": result.metrics[-1]["fvu"]}  # fmt: skip


def stream_path(model, tok, configs: dict, args) -> dict:
    """``train_streaming`` of ``configs``: wall time and tokens/s (end to end)."""
    stream = StreamConfig(context_len=128, buffer_refills=4, progress_bar=False, log_every=10**9)
    total, result = _timed(lambda: train_streaming(model, configs, None, tokenizer=tok,
                                                   stream=stream))  # fmt: skip
    return {
        "total_s": total,
        "tokens_per_s": args.tokens / total,
        "loop_tokens_per_s": result.tokens_per_second,
        "final_fvu": {n: r.metrics[-1]["fvu"] for n, r in result.dictionaries.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k tokens, 512 latents, batch 1024")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--site", default="blocks.9.resid_post")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.d_sae, args.batch = 20_000, 512, 1024
    model, tok = gs.load_model(), gs.load_tokenizer()
    report = {**machine_info(), "settings": vars(args), "paths": {}}
    for arch in ("jumprelu", "topk"):
        config = _config(args.site, arch, args)
        report["paths"][arch] = {
            "cache": cache_path(model, tok, config, args),
            "stream": stream_path(model, tok, {arch: config}, args),
        }
    many = {f"res{b}": _config(f"blocks.{b}.resid_post", "jumprelu", args) for b in (3, 6, 9)}
    together = stream_path(model, tok, many, args)
    alone = [stream_path(model, tok, {n: c}, args)["total_s"] for n, c in many.items()]
    report["many"] = {"together_s": together["total_s"], "one_by_one_s": sum(alone),
                      "speedup": sum(alone) / together["total_s"]}  # fmt: skip
    report["load_average"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
