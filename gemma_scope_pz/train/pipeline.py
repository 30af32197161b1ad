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
import shutil

import numpy as np

from gemma_scope_pz.data.corpus import Corpus, load_corpus
from gemma_scope_pz.scope.sites import Site
from gemma_scope_pz.train.config import TrainConfig
from gemma_scope_pz.train.harvest import harvest, harvest_info
from gemma_scope_pz.train.store import ActivationCache


def default_cache_root() -> pathlib.Path:
    """``$GEMMA_SCOPE_PZ_CACHE`` or ``~/.cache/gemma_scope_pz``."""
    return pathlib.Path(
        os.environ.get("GEMMA_SCOPE_PZ_CACHE", pathlib.Path.home() / ".cache" / "gemma_scope_pz")
    )


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
) -> ActivationCache:
    """Fills (or resumes) an on-disk activation cache with ``n_tokens`` rows per site.

    One forward pass serves all ``sites`` (e.g. a resid_post SAE site plus an mlp_in/mlp_out pair).
    A cache written for other weights, sites, corpus or harvest settings is refused with both
    named; so is a second process filling the same cache at once (naming the holder's pid).
    """
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    info = harvest_info(
        model, corpus, sites, n_tokens=n_tokens, context_len=context_len, model_name=model_name
    )
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
    """

    sae: object
    folder: pathlib.Path
    reused: bool


def train_dictionary(
    config: TrainConfig,
    cache: ActivationCache,
    out_dir: str | os.PathLike,
    *,
    reuse: bool = True,
    saelens: bool = False,
) -> TrainedDictionary:
    """Trains ``config`` on ``cache`` (checkpointing in ``out_dir/checkpoints``) and exports it.

    The export (Gemma Scope 2 format, loadable with ``gs.load_sae``) lands in ``out_dir/gemma_scope_2``;
    with ``reuse`` a finished export is loaded instead of training again. With ``saelens`` the
    SAELens format is written to ``out_dir/saelens`` too.
    """
    from gemma_scope_pz.scope.formats import load_sae
    from gemma_scope_pz.train.export import export_gemma_scope_2
    from gemma_scope_pz.train.trainer import train

    out_dir = pathlib.Path(out_dir)
    folder = out_dir / "gemma_scope_2"
    if reuse and (folder / "params.safetensors").exists():
        return TrainedDictionary(load_sae(folder), folder, True)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config.replace(
        checkpoint_dir=config.run.checkpoint_dir or str((out_dir / "checkpoints").resolve()),
        log_path=config.run.log_path or str(out_dir / "metrics.jsonl"),
    )
    config.to_json(out_dir / "train_config.json")
    result = train(config, cache_batches(cache, config))
    if folder.exists():
        shutil.rmtree(folder)
    export_gemma_scope_2(result, folder)
    if saelens:
        from gemma_scope_pz.train.export import export_saelens

        if (out_dir / "saelens").exists():
            shutil.rmtree(out_dir / "saelens")
        export_saelens(result, out_dir / "saelens")
    return TrainedDictionary(load_sae(folder), folder, False)


def site_widths(model, sites: list[str]) -> list[int]:
    return [Site.parse(s).width(model.config) for s in sites]
