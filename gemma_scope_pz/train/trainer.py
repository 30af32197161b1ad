"""The SAE / transcoder training loop: ``train(config, data) -> TrainResult``.

Data interface (see :mod:`~gemma_scope_pz.train.sources`): ``data`` is any of

* a ``BatchSource``: an object with ``batch_at(step)`` (e.g. ``ActivationCache.batches(...)``),
* a callable ``batch_at(step)``,
* an array ``[n, d_in]`` or a pair of arrays ``(x_in, x_out)`` (shuffled per epoch from the
  config seed),
* an iterator of batches (resuming then re-reads and drops the batches already trained on, so
  it is exact only if the iterator replays the same stream),

returning ``[batch_size, d_in]`` float arrays, or ``(x_in, x_out)`` pairs for transcoders.
Because the data position is the step index, a resumed run sees exactly the batches the
uninterrupted run would have seen, and (on the same machine) ends with bit-identical params.

Before step 0 the normaliser (see :mod:`~gemma_scope_pz.train.normalize`) is estimated from the
first ``norm_estimation_batches`` batches, and ``b_dec`` is initialised to the geometric median
(or mean) of the normalised targets of those batches. Checkpoints (orbax, written to a temporary
directory and renamed, last ``keep_checkpoints`` kept) store the whole trainer state, including
the normaliser, the dead-latent counters and the data position, plus the config as JSON.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from gemma_scope_pz.io import write_atomically
from gemma_scope_pz.train import objectives
from gemma_scope_pz.train import step as step_lib
from gemma_scope_pz.train.config import TrainConfig
from gemma_scope_pz.train.normalize import Normaliser, geometric_median
from gemma_scope_pz.train.result import TrainResult
from gemma_scope_pz.train.sources import as_source


# --------------------------------------------------------------------------- batches
def _split_batch(
    batch: Any, config: TrainConfig, step: int
) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(batch, tuple | list):
        if len(batch) != 2:
            raise ValueError(
                f"train: batch at step {step} is a sequence of {len(batch)}, expected 2"
            )
        x_in, x_out = batch
    else:
        x_in, x_out = batch, None
    if config.sae.is_transcoder and x_out is None:
        raise ValueError(
            f"train: transcoder config needs (x_in, x_out) batches; step {step} gave one"
        )
    x_in = np.asarray(x_in, np.float32)
    if x_in.shape != (config.run.batch_size, config.sae.d_in):
        raise ValueError(
            f"train: x_in at step {step} has shape {x_in.shape}, expected "
            f"({config.run.batch_size}, {config.sae.d_in})"
        )
    if x_out is not None:
        x_out = np.asarray(x_out, np.float32)
        if x_out.shape != (config.run.batch_size, config.sae.out_dim):
            raise ValueError(
                f"train: x_out at step {step} has shape {x_out.shape}, expected "
                f"({config.run.batch_size}, {config.sae.out_dim})"
            )
    return x_in, x_out


# --------------------------------------------------------------------------- init / checkpoints
def initial_state(config: TrainConfig, source) -> tuple[step_lib.State, Normaliser]:
    """Estimates the normaliser, b_dec and the inputs' centre from the first batches;
    initialises parameters."""
    batches = [
        _split_batch(source.batch_at(i), config, i)
        for i in range(config.sae.norm_estimation_batches)
    ]
    x_in = [b[0] for b in batches]
    x_out = None if batches[0][1] is None else [b[1] for b in batches]
    if config.sae.normalization == "none":
        norm = Normaliser.identity(config.sae.d_in, config.sae.out_dim)
    else:
        norm = Normaliser.estimate(config.sae.normalization, x_in, x_out)
    how = config.sae.b_dec_init
    b_dec = _centre(norm.apply_out(np.concatenate(x_out if x_out is not None else x_in)), how)
    in_centre = None  # b_enc_init "zeros"
    if config.sae.b_enc_init == "centre":
        in_centre = b_dec if x_out is None else _centre(norm.apply_in(np.concatenate(x_in)), how)
    if config.sae.affine_skip:
        b_dec = np.zeros(config.sae.out_dim, np.float32)  # the skip path models the mean itself
    key = jax.random.PRNGKey(config.run.seed)
    params = objectives.init_params(config, key, b_dec, in_centre=in_centre)
    return step_lib.init_state(config, params, norm.to_arrays()), norm


def _centre(rows: np.ndarray, how: str) -> np.ndarray:
    """The centre that ``sae.b_dec_init`` names (zeros for "zeros") of the first 16384 finite
    ``rows``."""
    rows = rows[:16384]
    rows = rows[np.all(np.isfinite(rows), axis=1)]
    if how == "geometric_median":
        return geometric_median(rows)
    if how == "mean":
        return rows.mean(0).astype(np.float32)
    return np.zeros(rows.shape[1], np.float32)


def _manager(config: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.run.keep_checkpoints, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(os.path.abspath(config.run.checkpoint_dir), options=options)


def _check_resume(saved: dict, config: TrainConfig, where: str) -> None:
    """Refuses a checkpoint whose hyper-parameters differ from ``config``, naming every field."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # checkpoints of flat-config releases
        try:
            saved_config = TrainConfig.from_dict(saved, source=f"the config saved in {where}")
        except ValueError as exc:
            raise ValueError(f"train: cannot resume from {where}: {exc}") from None
    before, now = _resume_keys(saved_config), _resume_keys(config)
    diffs = [
        f"{k}: checkpoint {before.get(k)!r} vs config {now[k]!r}"
        for k in now
        if before.get(k) != now[k]
    ]
    if diffs:
        raise ValueError(f"train: cannot resume from {where}: " + "; ".join(diffs))


def _resume_keys(config: TrainConfig) -> dict[str, Any]:
    # total_steps and total_tokens may be given either way: compare the step count they imply.
    keys = config.hyperparameters()
    del keys["run.total_steps"], keys["run.total_tokens"]
    keys["num_steps"] = config.num_steps
    return keys


def _load_metrics(path: str | None, before_step: int) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["step"] < before_step]
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _abstract_state(config: TrainConfig) -> Any:
    """Shapes/dtypes of the trainer state (what orbax restores into)."""

    def make():
        params = objectives.init_params(config, jax.random.PRNGKey(0))
        norm = Normaliser.identity(config.sae.d_in, config.sae.out_dim).to_arrays()
        return step_lib.init_state(config, params, norm)

    shapes = jax.eval_shape(make)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)


def _save(manager: ocp.CheckpointManager, step: int, state: Any, config: TrainConfig) -> None:
    meta = {"config": config.to_dict(), "data_position": step, "format_version": 2}
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    manager.wait_until_finished()


def _start(config: TrainConfig, source, manager, resume: bool):
    """``(state, normaliser, metrics so far)``: restored from the latest checkpoint or fresh."""
    latest = manager.latest_step() if manager is not None and resume else None
    if manager is not None and not resume:
        for old_step in manager.all_steps():  # a fresh run replaces an earlier run's checkpoints
            manager.delete(old_step)
    if latest is None:
        state, norm = initial_state(config, source)
        if config.run.log_path and os.path.exists(config.run.log_path):
            os.remove(config.run.log_path)
        return state, norm, []
    meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    _check_resume(meta["config"], config, f"{config.run.checkpoint_dir} step {latest}")
    restore = ocp.args.StandardRestore(_abstract_state(config))
    state = manager.restore(latest, args=ocp.args.Composite(state=restore))["state"]
    norm = Normaliser.from_arrays(jax.device_get(state["norm"]), config.sae.normalization)
    return state, norm, _load_metrics(config.run.log_path, int(state["step"]))


# --------------------------------------------------------------------------- the loop
def _compile(config: TrainConfig, state: step_lib.State, mesh):
    """``(state on device, jitted step, put)``, sharded over ``mesh`` when one is given."""
    step_fn = step_lib.make_train_step(config)
    if mesh is None:
        put = lambda x: None if x is None else jax.device_put(x)  # noqa: E731
        return jax.device_put(state), jax.jit(step_fn, donate_argnums=(0,)), put
    from gemma_scope_pz.train import sharding

    sharding.check_divisible(mesh, config.run.batch_size, config.sae.d_sae)
    state_sh = sharding.state_shardings(state, mesh, config.sae.d_sae)
    batch_sh = sharding.batch_sharding(mesh)
    jitted = jax.jit(
        step_fn,
        donate_argnums=(0,),
        in_shardings=(state_sh, batch_sh, batch_sh),
        out_shardings=(state_sh, None),
    )
    put = lambda x: None if x is None else jax.device_put(x, batch_sh)  # noqa: E731
    return jax.device_put(state, state_sh), jitted, put


def _refuse_non_finite_batch(x_in, x_out, step: int) -> None:
    for name, x in (("x_in", x_in), ("x_out", x_out)):
        if x is not None and not np.all(np.isfinite(x)):
            raise FloatingPointError(
                f"train: non-finite values in {name} of the batch at step {step} "
                f"({int(np.sum(~np.isfinite(x)))} entries); nan_policy='error'"
            )


def _metrics_row(config: TrainConfig, state, metrics, step: int) -> dict[str, float]:
    row = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
    if config.run.nan_policy == "error" and row["skipped"] > 0:
        bad = int(jax.device_get(state["first_bad_step"]))
        raise FloatingPointError(
            f"train: non-finite loss or gradient at step {bad}; nan_policy='error'"
        )
    return row


def _run_steps(config, source, state, jitted, put, manager, history: list[dict]):
    """Steps from ``state["step"]`` to the end: logging, progress bar, checkpoints."""
    start, total = int(jax.device_get(state["step"])), config.num_steps
    log_path = config.run.log_path
    log_file = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
    bar = tqdm(
        total=total, initial=start, disable=not config.run.progress_bar, desc="train", leave=False
    )
    try:
        for step in range(start, total):
            x_in, x_out = _split_batch(source.batch_at(step), config, step)
            if config.run.nan_policy == "error":
                _refuse_non_finite_batch(x_in, x_out, step)
            state, metrics = jitted(state, put(x_in), put(x_out))
            done = step + 1
            if done % config.run.log_every == 0 or done == total:
                row = _metrics_row(config, state, metrics, step)
                history.append(row)
                if log_file:
                    log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                bar.set_postfix(
                    loss=f"{row['loss']:.4g}",
                    l0=f"{row['l0']:.1f}",
                    dead=f"{row['dead_fraction']:.2f}",
                )
            bar.update(1)
            if manager is not None and (done % config.run.checkpoint_every == 0 or done == total):
                _save(manager, done, state, config)
    finally:
        bar.close()
        if log_file:
            log_file.close()
        if manager is not None:
            manager.wait_until_finished()
    return state


def _check_skipped(config: TrainConfig, n_skipped: int, first_bad: int) -> None:
    """Refuses to hand back a dictionary most of whose steps were skipped (non-finite data)."""
    total = config.num_steps
    if n_skipped > config.run.max_skipped_fraction * total:
        raise FloatingPointError(
            f"train: {n_skipped} of {total} steps were skipped for non-finite data or gradients "
            f"(first at step {first_bad}); the dictionary is not trained "
            f"(run.max_skipped_fraction={config.run.max_skipped_fraction})"
        )


def train(config: TrainConfig, data: Any, *, resume: bool = True, mesh=None) -> TrainResult:
    """Trains an SAE or transcoder.

    Args:
      config: The run configuration.
      data: Batches: anything :func:`gemma_scope_pz.train.sources.as_source` accepts.
      resume: Continue from the latest checkpoint in ``config.run.checkpoint_dir`` if there is one
        (refused, naming the fields, if its hyper-parameters differ); with ``False`` existing
        checkpoints there are deleted and training starts afresh.
      mesh: Optional ``jax.sharding.Mesh`` with axes ("data", "model") (see
        :mod:`~gemma_scope_pz.train.sharding`); ``None`` runs on the default device.

    Returns:
      A :class:`TrainResult` (``n_skipped`` counts steps skipped for non-finite values).

    Raises:
      FloatingPointError: with ``nan_policy="error"`` on the first non-finite batch or gradient;
        and whenever more than ``run.max_skipped_fraction`` of the steps were skipped.
      ValueError: on malformed batches or a checkpoint with other hyper-parameters.
    """
    source = as_source(
        data,
        batch_size=config.run.batch_size,
        seed=config.run.seed,
        replay=config.sae.norm_estimation_batches,
    )
    manager = _manager(config) if config.run.checkpoint_dir else None
    state, norm, history = _start(config, source, manager, resume)
    state, jitted, put = _compile(config, state, mesh)
    state = _run_steps(config, source, state, jitted, put, manager, history)
    host = jax.device_get(state)
    _check_skipped(config, int(host["n_skipped"]), int(host["first_bad_step"]))
    return TrainResult(
        params={k: np.asarray(v) for k, v in host["params"].items()},
        metrics=history,
        normaliser=norm,
        config=config,
        n_skipped=int(host["n_skipped"]),
        inference_threshold=float(host["inference_threshold"]),
    )
