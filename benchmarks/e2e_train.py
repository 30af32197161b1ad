"""End-to-end text → trained SAE on Gemma 3 270M: ours (streaming, cache; float32, bfloat16) against SAELens.

Usage: python benchmarks/e2e_train.py [--quick] [--tokens 200000] [--paths stream,stream_bf16,cache]
       [--saelens-python /work/scratch/saelens/bin/python] [--many]

Prints one JSON object (and writes it to ``--out``). Every path trains the same JumpReLU and TopK
(k=32) dictionaries, 640 → ``--d-sae`` at ``--site``, context 128, ``--batch`` tokens per step,
``--tokens`` tokens, from ``--corpus`` (default: the offline corpus; it restarts when it runs
out) with documents packed back to back (``packing="concat"``, as SAELens packs); wall times include compilation and model loading is
not counted, for ours or SAELens's.

* ``stream`` / ``stream_bf16``: ``train_streaming`` (forward, on-device buffer, update), the LM
  forward in float32 / bfloat16;
* ``cache``: ``harvest_array`` to host memory, then ``train``;
* ``saelens``: ``scripts/e2e_saelens.py`` run with ``--saelens-python`` (a scratch environment
  with sae-lens and torch; never a dependency): ``LanguageModelSAETrainingRunner`` on the same
  model converted to Hugging Face format and the same documents, same machine, same run;
  ``saelens_store8``: the same with 8 contexts per LM forward instead of its default 32
  (``store_batch_size_prompts``; on the 2-core CPUs here torch's forward, like ours, runs faster
  in small batches); ``saelens_bf16``: with SAELens's bfloat16 autocast (LM forward and SAE step).

Our paths run the LM forward ``--forward-contexts`` contexts at a time (8 by default, as
``StreamConfig`` does on a CPU).

``--cpu-matmul bfloat16`` runs our paths (and the evaluation of every SAE) with bfloat16 matmul
products on the CPU (``gemma_scope_pz.backend``); the JSON records the mode.

Quality: FVU, L0 and delta loss of every trained SAE (SAELens's included, read back from its
weights) by ``evaluate_sae`` on the same held-out contexts: the corpus's last documents, which
are left out of every path's training text. ``forward`` (a path name): tokens/s of the harvest
forward alone, float32 against bfloat16, and the bfloat16 activations' relative error.
``--many``: three SAEs at blocks 3, 6, 9 plus a transcoder at every layer from one stream,
against each alone (``--many-tokens`` each, a buffer of two refills). ``load_average`` says how
busy the (shared) machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import time

import numpy as np
from common import add_cpu_matmul_option, apply_cpu_matmul, machine_info
from tqdm.auto import tqdm

import gemma_scope_pz as gs
from gemma_scope_pz.data.corpus import Corpus
from gemma_scope_pz.data.packing import corpus_contexts, pack_contexts
from gemma_scope_pz.io import write_atomically
from gemma_scope_pz.scope.evaluate import evaluate_sae
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta
from gemma_scope_pz.train.config import TrainConfig
from gemma_scope_pz.train.harvest import harvest_array
from gemma_scope_pz.train.streaming import StreamConfig, train_streaming
from gemma_scope_pz.train.trainer import train

REPO = pathlib.Path(__file__).resolve().parents[1]
SAELENS_SCRIPT = REPO / "scripts" / "e2e_saelens.py"
PATHS = ("stream", "stream_bf16", "cache", "saelens", "saelens_store8", "saelens_bf16")


def _config(site: str, arch: str, args, site_out: str | None = None) -> TrainConfig:
    sae = {"d_in": 640, "d_sae": args.d_sae, "site_in": site, "architecture": arch, "k": 32}
    if site_out:
        sae["site_out"] = site_out
    steps = max(1, args.tokens // args.batch)
    # Our default warm-ups (1000 steps) are for long runs: here a tenth of the run, as SAELens's
    # runner, whose learning-rate warm-up defaults to 0, trains from the first step.
    warmup = max(1, steps // 10)
    return TrainConfig(
        sae=sae,
        optim={"warmup_steps": warmup},
        loss={"sparsity_warmup_steps": warmup},
        run={"batch_size": args.batch, "total_tokens": args.tokens, "progress_bar": False},
    )


def split_held_out(tok, docs: list[str], n_contexts: int) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the last documents that pack into
    ``n_contexts`` contexts of 128 are held out, so a run that wraps around the corpus never
    trains on the evaluation text."""
    n = 0
    for i in range(len(docs) - 1, 0, -1):
        n += sum(1 for _ in pack_contexts([docs[i]], tok, 128))
        if n >= n_contexts:
            return docs[:i], docs[i:]
    raise ValueError(f"the corpus has too few documents for {n_contexts} held-out contexts")


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cache_path(model, tok, config: TrainConfig, args) -> tuple[dict, object]:
    """Harvest to host memory then train: seconds of each, tokens/s overall, the trained SAE."""
    site = config.sae.site_in
    harvest_s, (rows, _) = _timed(
        lambda: harvest_array(
            model,
            tok,
            args.train_corpus,
            [site],
            n_tokens=args.tokens,
            batch_size=args.forward_contexts,
            packing="concat",
            progress=False,
        )  # fmt: skip
    )
    train_s, result = _timed(lambda: train(config, rows[site]))
    total = harvest_s + train_s
    timing = {"harvest_s": harvest_s, "train_s": train_s, "total_s": total,
              "tokens_per_s": args.tokens / total}  # fmt: skip
    return timing, result.to_autoencoder()


def stream_path(model, tok, configs: dict, args, model_dtype: str = "float32", refills: int = 4):
    """``train_streaming`` of ``configs``: wall time, tokens/s (end to end), the trained SAEs."""
    stream = StreamConfig(context_len=128, buffer_refills=refills, progress_bar=False,
                          log_every=10**9, packing="concat", model_dtype=model_dtype,
                          forward_contexts=args.forward_contexts)  # fmt: skip
    total, result = _timed(
        lambda: train_streaming(model, configs, args.train_corpus, tokenizer=tok, stream=stream)
    )
    timing = {"total_s": total, "tokens_per_s": args.tokens / total,
              "loop_tokens_per_s": result.tokens_per_second}  # fmt: skip
    return timing, {n: r.to_autoencoder() for n, r in result.dictionaries.items()}


def saelens_path(
    arch: str,
    args,
    docs_path: pathlib.Path,
    autocast: bool = False,
    options: list[str] = (),
    tag: str = "",
    store_batch: int = 32,
) -> tuple[dict, object]:
    """SAELens's runner in its own environment (``autocast``: its bfloat16 mixed precision;
    ``options``: fields of its SAE config as ``FIELD=JSON`` texts, later ones winning); its SAE
    rebuilt from the weights it wrote."""
    store = "" if store_batch == 32 else f"_store{store_batch}"
    out = args.work / f"saelens_{arch}{'_bf16' if autocast else ''}{store}{tag}.npz"
    command = [args.saelens_python, str(SAELENS_SCRIPT), "--docs", str(docs_path), "--arch", arch,
               "--out", str(out), "--tokens", str(args.tokens), "--d-sae", str(args.d_sae),
               "--batch", str(args.batch), "--layer", args.site.split(".")[1],
               "--store-batch", str(store_batch)]  # fmt: skip
    command += ["--autocast"] if autocast else []
    for option in options:
        command += ["--sae-option", option]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    timing = json.loads(done.stdout.strip().splitlines()[-1])
    return timing, saelens_autoencoder(out, arch, args.site)


def saelens_autoencoder(path: pathlib.Path, arch: str, site: str) -> AutoEncoder:
    """The SAE in ``scripts/e2e_saelens.py``'s ``.npz`` as our ``AutoEncoder``.

    SAELens's training SAEs encode ``(x - b_dec) @ W_enc + b_enc`` (``apply_b_dec_to_input``,
    True by default in sae-lens 6.54.12 for JumpReLU and TopK); ours encodes ``x @ w_enc +
    b_enc``, so ``b_dec @ W_enc`` is folded into ``b_enc`` (the same pre-activations exactly).
    Files written before the flag was recorded were all trained with the default, True.
    """
    with np.load(path) as w:
        arrays = {key: w[key] for key in w.files}
    b_enc = arrays["b_enc"]
    if bool(arrays.get("apply_b_dec_to_input", True)):
        b_enc = b_enc - arrays["b_dec"] @ arrays["W_enc"]
    d_in, d_sae = arrays["W_enc"].shape
    meta = SaeMeta(d_in=d_in, d_sae=d_sae, d_out=arrays["W_dec"].shape[1], site_in=site,
                   site_out=site)  # fmt: skip
    return AutoEncoder.from_arrays(
        arrays["W_enc"], b_enc, arrays["W_dec"], arrays["b_dec"],
        arrays.get("threshold"), activation=arch, k=32 if arch == "topk" else None, meta=meta,
    )  # fmt: skip


def quality(model, sae, held_out: np.ndarray, site: str) -> dict:
    """FVU, L0, delta loss (nats) and dead fraction on the held-out contexts."""
    e = evaluate_sae(model, sae, held_out, site=site, progress=False)
    return {"fvu": e.fvu, "l0": e.l0, "delta_loss": e.delta_loss, "dead_fraction": e.dead_fraction}


def forward_rates(tok, args) -> dict:
    """Harvest-forward tokens/s in float32 and bfloat16 (same contexts) and the bf16 error."""
    model = gs.load_model()
    out = {}
    rows = {}
    for dtype in ("float32", "bfloat16"):

        def run(n, dtype=dtype):  # noqa: E306
            return harvest_array(model, tok, args.train_corpus, [args.site], n_tokens=n,
                                 batch_size=args.forward_contexts,
                                 packing="concat", model_dtype=dtype, progress=False)[0]  # fmt: skip

        run(127 * 32)  # compile
        seconds, rows[dtype] = _timed(lambda run=run: run(args.forward_tokens))
        out[f"{dtype}_tokens_per_s"] = args.forward_tokens / seconds
    a, b = rows["bfloat16"][args.site], rows["float32"][args.site]
    out["bf16_relative_error"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    out["bf16_speedup"] = out["bfloat16_tokens_per_s"] / out["float32_tokens_per_s"]
    return out


def many_path(model, tok, args) -> dict:
    """Three SAEs and a transcoder at every layer from one stream, against each alone, on
    ``--many-tokens`` tokens each: wall times (compilation included) and loop tokens/s."""
    short = argparse.Namespace(**{**vars(args), "tokens": args.many_tokens})
    many = {f"res{b}": _config(f"blocks.{b}.resid_post", "jumprelu", short) for b in (3, 6, 9)}
    for layer in range(model.config.n_layers):
        many[f"tc{layer}"] = _config(
            f"blocks.{layer}.mlp_in", "jumprelu", short, site_out=f"blocks.{layer}.mlp_out"
        )
    together, _ = stream_path(model, tok, many, short, refills=2)
    alone = {n: stream_path(model, tok, {n: c}, short, refills=2)[0] for n, c in tqdm(many.items())}
    one_by_one = sum(t["total_s"] for t in alone.values())
    loop_s = sum(args.many_tokens / t["loop_tokens_per_s"] for t in alone.values())
    return {"n_dictionaries": len(many), "tokens": args.many_tokens,
            "together_s": together["total_s"], "one_by_one_s": one_by_one,
            "speedup": one_by_one / together["total_s"],
            "together_loop_tokens_per_s": together["loop_tokens_per_s"],
            "one_by_one_loop_tokens_per_s": args.many_tokens / loop_s,
            "alone": alone}  # fmt: skip


def _run(name: str, model, tok, arch: str, config: TrainConfig, args, docs_path):
    """(timing, trained SAE) of one path."""
    if name.startswith("saelens"):
        store = 8 if name == "saelens_store8" else 32
        return saelens_path(
            arch, args, docs_path, autocast=name == "saelens_bf16", store_batch=store
        )
    if name == "cache":
        return cache_path(model, tok, config, args)
    dtype = "bfloat16" if name == "stream_bf16" else "float32"
    return stream_path(model, tok, {arch: config}, args, dtype)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k tokens, 512 latents, batch 1024")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--site", default="blocks.9.resid_post")
    parser.add_argument(
        "--corpus", default=None, help="load_corpus spec (default: the offline corpus)"
    )
    parser.add_argument("--archs", default="jumprelu,topk")
    parser.add_argument("--paths", default="forward,stream,stream_bf16,cache,saelens")
    parser.add_argument("--saelens-python", default="/work/scratch/saelens/bin/python")
    parser.add_argument("--held-out", type=int, default=32, help="held-out contexts of 128")
    parser.add_argument("--forward-tokens", type=int, default=127 * 32 * 4)
    parser.add_argument("--forward-contexts", type=int, default=8, help="contexts per LM forward")
    parser.add_argument("--many", action="store_true")
    parser.add_argument("--many-tokens", type=int, default=32_768, help="tokens of each --many run")
    add_cpu_matmul_option(parser)
    parser.add_argument("--work", type=pathlib.Path, default=REPO / "runs" / "e2e")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.d_sae, args.batch, args.held_out = 20_000, 512, 1024, 8
    return args


def prepare(args, docs_name: str) -> tuple[object, object, pathlib.Path, np.ndarray]:
    """The model, tokenizer, training documents (``args.train_corpus``, and as JSON lines under
    ``args.work / docs_name`` for SAELens) and held-out contexts of a benchmark run. Applies
    ``--cpu-matmul`` first, before JAX starts."""
    apply_cpu_matmul(args)
    args.work.mkdir(parents=True, exist_ok=True)
    model, tok = gs.load_model(), gs.load_tokenizer()
    train_docs, held_docs = split_held_out(tok, list(gs.load_corpus(args.corpus)), args.held_out)
    args.train_corpus = Corpus.from_texts(train_docs, name="train")
    docs_path = args.work / docs_name
    write_atomically(docs_path, "\n".join(json.dumps({"text": d}) for d in train_docs) + "\n")
    held_out = corpus_contexts(tok, held_docs, args.held_out, from_end=True)
    return model, tok, docs_path, held_out


def main() -> None:
    args = _parse()
    model, tok, docs_path, held_out = prepare(args, "docs.jsonl")
    paths = args.paths.split(",")
    report = {**machine_info(), "settings": {k: str(v) for k, v in vars(args).items() if k != "train_corpus"},
              "load_average_start": os.getloadavg(), "paths": {}}  # fmt: skip
    if "forward" in paths:
        report["forward"] = forward_rates(tok, args)
        _save(report, args)
    for arch in args.archs.split(","):
        config = _config(args.site, arch, args)
        names = [n for n in PATHS if n in paths]
        runs = ((n, _run(n, model, tok, arch, config, args, docs_path)) for n in names)  # lazily
        out = report["paths"].setdefault(arch, {})
        for name, (timing, sae) in runs:
            sae = sae[arch] if isinstance(sae, dict) else sae
            out[name] = {**timing, **quality(model, sae, held_out, args.site)}
            _save(report, args)  # partial results survive an interrupted run
        for base in ("saelens", "saelens_store8"):
            if base in out:
                for name in out:
                    out[name][f"speedup_vs_{base}"] = out[base]["total_s"] / out[name]["total_s"]
    if args.many:
        report["many"] = many_path(model, tok, args)
    print(_save(report, args))


def _save(report: dict, args) -> str:
    """``report`` as JSON (with the current load average), also written to ``--out``."""
    report["load_average"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    if args.out:
        write_atomically(args.out, text + "\n")
    return text


if __name__ == "__main__":
    main()
