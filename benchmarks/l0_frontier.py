"""JumpReLU FVU–L0 frontier on the real 270M: ours against SAELens's end-to-end runner, same text.

Usage: python benchmarks/l0_frontier.py --tokens 2000000 --corpus default+prose --held-out 64 \\
       --ours default,64,256 --saelens 64,256 --cpu-matmul bfloat16 --out runs/e2e/frontier.json

Both tools train JumpReLU SAEs of ``--d-sae`` latents at ``--site`` on the same documents (those
of the held-out contexts removed, as in ``benchmarks/e2e_train.py``), ``--tokens`` tokens in
steps of ``--batch``, and every SAE is scored by ``evaluate_sae`` on the same held-out contexts
(FVU, L0, delta loss, dead fraction). A point of the frontier is one sparsity setting:

* ours, ``default``: our default loss (L0 penalty ``loss.l0_coeff``);
* ours, a number T: the Gemma Scope 2 quadratic penalty around L0 = T (``loss.l0_coeff`` 0,
  ``loss.target_l0`` T, ``loss.target_l0_coeff`` 2 / T, SAELens's scale at coefficient 1);
* SAELens, a number T: ``jumprelu_sparsity_loss_mode="quadratic"``, ``target_l0`` T, its
  defaults otherwise, plus ``--saelens-option`` fields (e.g. ``normalize_activations=...``);
  ``default``: its defaults (the ``step`` L0 loss).

Our points train from one harvest of the activations (kept under ``--work`` as ``.npy``, reused
by later calls: train time is what a sweep costs once activations exist); SAELens's runner does
its own forward each time. Results accumulate in ``--out``: a point already there is not rerun,
so a later call can add points (say, ours at the L0 SAELens reached).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import numpy as np
from common import add_cpu_matmul_option, machine_info
from e2e_train import REPO, prepare, quality, saelens_path

from gemma_scope_pz.io import write_atomically
from gemma_scope_pz.train.config import TrainConfig
from gemma_scope_pz.train.harvest import harvest_array
from gemma_scope_pz.train.trainer import train


def our_config(point: str, args) -> TrainConfig:
    """Our JumpReLU config of one frontier point (``default`` or a target L0)."""
    steps = max(1, args.tokens // args.batch)
    warmup = max(1, steps // 10)  # as benchmarks/e2e_train.py: a tenth of the run
    loss: dict = {"sparsity_warmup_steps": warmup}
    if point != "default":
        target = float(point)
        loss.update(l0_coeff=0.0, target_l0=target, target_l0_coeff=2.0 / target)
    return TrainConfig(
        sae={"d_in": 640, "d_sae": args.d_sae, "site_in": args.site, "architecture": "jumprelu"},
        optim={"warmup_steps": warmup},
        loss=loss,
        run={"batch_size": args.batch, "total_tokens": args.tokens, "progress_bar": True},
    )


def saelens_options(point: str, args) -> list[str]:
    """SAELens's SAE config fields of one frontier point, as ``FIELD=JSON`` texts."""
    if point == "default":
        return list(args.saelens_option)
    quadratic = ['jumprelu_sparsity_loss_mode="quadratic"', f"target_l0={float(point)}"]
    return [*args.saelens_option, *quadratic]


def activations(model, tok, args) -> np.ndarray:
    """The training rows at ``--site`` (harvested once, then read from ``--work``)."""
    path = args.work / f"frontier_rows_{args.site}_{args.tokens}_{args.corpus}.npy"
    if not path.exists():
        rows, _ = harvest_array(model, tok, args.train_corpus, [args.site], n_tokens=args.tokens,
                                batch_size=32, packing="concat", progress=True)  # fmt: skip
        tmp = path.with_name(path.name + ".partial.npy")
        np.save(tmp, rows[args.site])
        os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def run_point(tool: str, point: str, model, tok, held_out, args, docs_path) -> dict:
    """Train one frontier point and score it on the held-out contexts."""
    if tool == "ours":
        rows = activations(model, tok, args)
        config = our_config(point, args)
        start = time.perf_counter()
        sae = train(config, np.asarray(rows)).to_autoencoder()
        timing = {"train_s": time.perf_counter() - start, "loss": dict(vars(config.loss))}
    else:
        options = saelens_options(point, args)
        timing, sae = saelens_path("jumprelu", args, docs_path, autocast=args.saelens_bf16,
                                   options=options, tag=f"_frontier_{point}")  # fmt: skip
    return {**timing, **quality(model, sae, held_out, args.site)}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--site", default="blocks.9.resid_post")
    parser.add_argument("--corpus", default="default+prose", help="load_corpus spec")
    parser.add_argument("--held-out", type=int, default=64, help="held-out contexts of 128")
    parser.add_argument("--ours", default="default,64,256", help="our points (default or T)")
    parser.add_argument("--saelens", default="64,256", help="SAELens's points (default or T)")
    parser.add_argument("--saelens-option", action="append", default=[], metavar="FIELD=JSON")
    parser.add_argument("--saelens-f32", dest="saelens_bf16", action="store_false",
                        help="SAELens without its bfloat16 autocast")  # fmt: skip
    parser.add_argument("--saelens-python", default="/work/scratch/saelens/bin/python")
    add_cpu_matmul_option(parser)
    parser.add_argument("--work", type=pathlib.Path, default=REPO / "runs" / "e2e")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    return parser.parse_args()


def main() -> None:
    args = _parse()
    model, tok, docs_path, held_out = prepare(args, "frontier_docs.jsonl")
    report = json.loads(args.out.read_text()) if args.out.exists() else {"points": {}}
    report.update(machine_info())
    report["settings"] = {k: str(v) for k, v in vars(args).items() if k != "train_corpus"}
    todo = [("saelens", p) for p in args.saelens.split(",") if p]
    todo += [("ours", p) for p in args.ours.split(",") if p]
    for tool, point in todo:
        name = f"{tool}_{point}" + (
            "_" + "_".join(args.saelens_option) if tool == "saelens" else ""
        )
        if name in report["points"]:
            continue
        load_before = os.getloadavg()
        result = run_point(tool, point, model, tok, held_out, args, docs_path)
        report["points"][name] = {**result, "load_average": [load_before, os.getloadavg()]}
        write_atomically(args.out, json.dumps(report, indent=2) + "\n")
        print(name, {k: result[k] for k in ("fvu", "l0", "delta_loss", "dead_fraction")})


if __name__ == "__main__":
    main()
