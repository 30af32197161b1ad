"""From a model and a corpus to a trained, exported dictionary: harvest → cache → train → export.

Used by ``gemma-scope-pz train`` and the tour. Each stage is resumable: the activation cache continues
at its last complete shard, the trainer at its last checkpoint, and a finished export is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import warnings

import numpy as np

from gemma_scope_pz.data.corpus import Corpus, load_corpus
from gemma_scope_pz.scope.sites import Site
from gemma_scope_pz.train.config import TrainConfig, apply_overrides
from gemma_scope_pz.train.harvest import harvest, harvest_info
from gemma_scope_pz.train.store import ActivationCache


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (cache keys)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def harvest_to_cache(
    model,
    tokenizer,
    corpus: Corpus | str | None,
    sites: list[str],
    path: str | os.PathLike,
    *,
    n_tokens: int,
    context_len: int = 128,
    batch_size: int = 8,
    shard_rows: int = 16_384,
    model_name: str | None = None,
    progress: bool = True,
    packing: str = "document",
    model_dtype: str = "float32",
) -> ActivationCache:
    """Fills (or resumes) an on-disk activation cache with ``n_tokens`` rows per site.

    One forward pass serves all ``sites`` (e.g. a resid_post SAE site plus an mlp_in/mlp_out pair).
    ``packing`` and ``model_dtype`` as in ``harvest`` (recorded in the cache's header). A cache
    written for other weights, sites, corpus or harvest settings is refused with both named; so is
    a second process filling the same cache at once (naming the holder's pid).
    """
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    info = harvest_info(
        model, corpus, sites, n_tokens=n_tokens, context_len=context_len, model_name=model_name,
        packing=packing, model_dtype=model_dtype,
    )  # fmt: skip
    # the writer's lock is held while filling; a second process on this cache is refused
    with ActivationCache.create_or_resume(path, **info.store_header()) as cache:
        if cache.n_rows < n_tokens:
            stream = harvest(
                model,
                tokenizer,
                corpus,
                sites,
                n_tokens=n_tokens,
                context_len=context_len,
                batch_size=batch_size,
                start_row=cache.n_rows,
                progress=progress,
                packing=packing,
                model_dtype=model_dtype,
            )
            _fill_cache(cache, stream, sites, shard_rows)
    if cache.n_rows == 0:
        raise ValueError(
            f"Corpus {corpus.name!r} produced no tokens for the activation cache {path}"
        )
    return cache


def _fill_cache(cache: ActivationCache, stream, sites: list[str], shard_rows: int) -> None:
    """Appends harvested rows to ``cache`` in shards of at least ``shard_rows`` rows."""
    pending: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    pending_rows = 0
    for rows in stream:
        for site in sites:
            pending[site].append(rows[site])
        pending_rows += len(rows[sites[0]])
        if pending_rows >= shard_rows:
            cache.append(*(np.concatenate(pending[s]) for s in sites))
            pending, pending_rows = {s: [] for s in sites}, 0
    if pending_rows:
        cache.append(*(np.concatenate(pending[s]) for s in sites))


def cache_batches(cache: ActivationCache, config: TrainConfig):
    """The trainer's data source for ``config`` from a cache holding its site(s)."""
    wanted = [config.sae.site_in] + (
        [config.sae.site_out]
        if config.sae.site_out and config.sae.site_out != config.sae.site_in
        else []
    )
    return cache.batches(config.run.batch_size, seed=config.run.seed, sites=wanted)


@dataclasses.dataclass
class TrainedDictionary:
    """Result of ``train_dictionary``.

    Attributes:
      sae: The Penzai ``AutoEncoder``/``AutoEncoderSkip`` (takes raw activations).
      folder: Gemma Scope 2 export folder.
      reused: Whether a finished export was loaded instead of training.
      n_skipped: Training steps skipped for non-finite data or gradients.
    """

    sae: object
    folder: pathlib.Path
    reused: bool
    n_skipped: int = 0


def _reusable_export(folder: pathlib.Path, config: TrainConfig):
    """The export in ``folder`` if its recorded training config has ``config``'s hyper-parameters
    (``run.data_fingerprint`` included: the same activations); otherwise ``None``."""
    from gemma_scope_pz.scope.formats.gemma_scope_2 import load_sae

    if not (folder / "params.safetensors").exists():
        return None
    sae = load_sae(folder)
    extra = sae.meta.extra
    if not isinstance(extra.get("train_config"), dict):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # exports of flat-config releases
        try:
            saved = TrainConfig.from_dict(extra["train_config"], source=str(folder))
        except ValueError:
            return None
    return sae if saved.hyperparameters() == config.hyperparameters() else None


def train_dictionary(
    config: TrainConfig,
    cache: ActivationCache,
    out_dir: str | os.PathLike,
    *,
    reuse: bool = True,
    saelens: bool = False,
) -> TrainedDictionary:
    """Trains ``config`` on ``cache`` (checkpointing in ``out_dir/checkpoints``) and exports it.

    The export (Gemma Scope 2 format, loadable with ``gs.load_sae``) lands in ``out_dir/gemma_scope_2``,
    replacing an earlier one atomically. With ``reuse`` a finished export is loaded instead of training
    again, but only if its recorded training config has the same hyper-parameters and it was trained
    on the same activations (``run.data_fingerprint``, set here from the cache's identity and row
    count unless given). Training resumes from
    ``out_dir/checkpoints`` when they exist (refused, naming the fields, if they were written with
    other hyper-parameters). With ``saelens`` the SAELens format is written to
    ``out_dir/saelens`` too.
    """
    from gemma_scope_pz.train.export import export_gemma_scope_2, export_saelens
    from gemma_scope_pz.train.trainer import train

    out_dir = pathlib.Path(out_dir)
    folder = out_dir / "gemma_scope_2"
    config = apply_overrides(
        config,
        {
            "run.checkpoint_dir": config.run.checkpoint_dir
            or str((out_dir / "checkpoints").resolve()),
            "run.log_path": config.run.log_path or str(out_dir / "metrics.jsonl"),
        },
    )
    if not config.run.data_fingerprint:
        config = apply_overrides(
            config, {"run.data_fingerprint": fingerprint(cache.header, cache.n_rows)}
        )
    reused = _reusable_export(folder, config) if reuse else None
    if reused is not None:
        return TrainedDictionary(
            reused, folder, True, int(reused.meta.extra.get("n_skipped_steps", 0))
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.to_json(out_dir / "train_config.json")
    result = train(config, cache_batches(cache, config))
    export_gemma_scope_2(result, folder)
    if saelens:
        export_saelens(result, out_dir / "saelens")
    from gemma_scope_pz.scope.formats.gemma_scope_2 import load_sae

    return TrainedDictionary(load_sae(folder), folder, False, result.n_skipped)


def site_widths(model, sites: list[str]) -> list[int]:
    return [Site.parse(s).width(model.config) for s in sites]
