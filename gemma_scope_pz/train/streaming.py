"""Streaming training: text → LM forward → on-device shuffle buffer → every dictionary's update.

One jitted program per step runs, on the device, (every ``refill_every`` steps) the model forward on a
batch of packed contexts, stopping after the deepest site needed
(:func:`~gemma_scope_pz.scope.interventions.run_with_captures`), writes the activations into the ring
buffer (:mod:`~gemma_scope_pz.train.buffer`), draws one batch of slots and applies the training step
of every dictionary (:func:`~gemma_scope_pz.train.step.make_train_step`, the same step the cached
path runs). Only token ids go to the device and only metrics come back::

    configs = {"res9": TrainConfig(sae={"d_in": 640, "d_sae": 2048, "site_in": "blocks.9.resid_post"},
                                   run={"total_tokens": 200_000, "batch_size": 4096})}
    result = train_streaming(model, configs, load_corpus(None), tokenizer=tok)
    sae = result.dictionaries["res9"].to_autoencoder()

Data order: refill ``r`` takes contexts ``[r * n, (r + 1) * n)`` of the packed corpus (``n =
contexts_per_refill``; the corpus restarts when it runs out) into chunk ``r % buffer_refills``. Refills
``0 .. buffer_refills - 1`` fill the buffer before step 0; refill ``buffer_refills - 1 + s //
refill_every`` happens at step ``s > 0`` divisible by ``refill_every``, before that step's draw,
until the refills cover the run (``StreamConfig.drain``; ``stream_data.refill_at``). Step ``s``
trains on ``buffer.draw_slots(valid, stream.seed, s, batch_size)``. Everything is a function of the
step, so a checkpoint (every dictionary's trainer state, the buffer and the counters; orbax) resumes
to bit-identical weights. The normaliser and ``b_dec`` of each dictionary are estimated from the
first ``norm_estimation_batches`` batches of this order, as the cached trainer does (a refill that
falls among them is run again by the loop: one refill's forward more).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from penzai import pz
from tqdm.auto import tqdm

from gemma_scope_pz.data.corpus import Corpus, as_corpus
from gemma_scope_pz.models import stateful
from gemma_scope_pz.train import buffer as buffer_lib
from gemma_scope_pz.train import sharding, stream_data, trainer
from gemma_scope_pz.train import step as step_lib
from gemma_scope_pz.train.config import TrainConfig
from gemma_scope_pz.train.harvest import model_in_dtype
from gemma_scope_pz.train.normalize import Normaliser
from gemma_scope_pz.train.sources import CallableSource
from gemma_scope_pz.train.stream_data import ContextStream, StreamConfig

__all__ = ["StreamConfig", "StreamResult", "train_streaming"]


@dataclasses.dataclass
class StreamResult:
    """Outcome of :func:`train_streaming`.

    Attributes:
      dictionaries: One :class:`~gemma_scope_pz.train.trainer.TrainResult` per name.
      n_nonfinite_rows: Document rows dropped from the buffer for non-finite activations.
      tokens: Tokens trained on in this call (steps x batch size).
      seconds: Wall time of this call's training loop.
      step: Steps done (a run stopped with ``stop_at`` can be resumed from here).
      first_step_seconds: Wall time of the loop's first step, which compiles the step program
        (unless an earlier call with the same settings did).
    """

    dictionaries: dict[str, trainer.TrainResult]
    n_nonfinite_rows: int
    tokens: int
    seconds: float
    step: int
    first_step_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Training rate after the first step (compilation left out); with a single step, that
        step's rate."""
        batch = next(iter(self.dictionaries.values())).config.run.batch_size
        if self.tokens > batch:
            return (self.tokens - batch) / max(self.seconds - self.first_step_seconds, 1e-9)
        return self.tokens / max(self.seconds, 1e-9)


def _make_program(configs: Mapping[str, TrainConfig], data_step, mesh=None):
    """``program(model, states, buffer, tokens, step, refill) -> (states, buffer, n_bad, metrics)``:
    one step of the whole stream (refill, draw, every dictionary's update). On a ``mesh`` each batch
    is split over ``"data"``; states and buffer keep the shardings of ``sharding.place_stream``."""
    step_fns = {name: step_lib.make_train_step(c) for name, c in configs.items()}

    def program(model, states, buffer, tokens, step, refill):
        buffer, n_bad, slots = data_step(model, buffer, tokens, step, refill)
        new_states, metrics = {}, {}
        for name, config in configs.items():
            x_in, x_out = stream_data.batch_of(buffer, slots, config)
            x_in, x_out = (
                sharding.constrain_batch(x_in, mesh),
                sharding.constrain_batch(x_out, mesh),
            )
            new_states[name], metrics[name] = step_fns[name](states[name], x_in, x_out)
        if mesh is not None:
            new_states, buffer = sharding.place_stream(
                configs, new_states, buffer, mesh, constrain=True
            )
        return new_states, buffer, n_bad, metrics

    return program


@functools.lru_cache(maxsize=8)
def _programs(
    configs: tuple,
    sites: tuple[str, ...],
    stream: StreamConfig,
    pad_id: int,
    batch: int,
    mesh,
    group: int | None = None,
):
    """The jitted refill and draw (set-up: the forward is compiled once more, not twice) and the
    whole-step program, kept across calls with the same settings so a second run does not compile
    again. The whole-step program takes the model flattened: ``(model_def, model_leaves, states,
    buffer, tokens, step, refill)``."""
    fill, data_step = stream_data.make_data_step(sites, stream, pad_id, batch, group)
    program = _make_program(dict(configs), data_step, mesh)

    def draw(valid, step):
        return buffer_lib.draw_slots(valid, stream.seed, step, batch)

    def flat_program(model_def, model_leaves, *args):
        return program(jax.tree_util.tree_unflatten(model_def, model_leaves), *args)

    # The model travels as its leaves with a static tree structure: flattening a Penzai model
    # takes milliseconds of Python per call (~10 ms for the 270M here), as long as a GPU step.
    flat_program = jax.jit(flat_program, static_argnums=0, donate_argnums=(2, 3))
    return jax.jit(fill), jax.jit(draw), flat_program


# --------------------------------------------------------------------------- set-up
def _initial_buffer(model, fill, contexts: ContextStream, widths, stream: StreamConfig, mesh):
    """The buffer before step 0 (refills ``0 .. buffer_refills - 1``) and its non-finite count."""
    buffer = buffer_lib.init_buffer(
        widths, stream.buffer_refills, contexts.n_contexts * stream.context_len
    )
    if mesh is not None:
        buffer = jax.device_put(buffer, sharding.buffer_shardings(buffer, mesh))
    n_bad = 0
    for r in range(stream.buffer_refills):
        tokens = sharding.put_tokens(contexts.tokens(r), mesh)
        buffer, bad = fill(model, buffer, tokens, jnp.int32(r))
        n_bad += int(bad)
    return buffer, n_bad


def _initial_states(model, configs, programs, buffer, contexts, stream, mesh):
    """Fresh trainer states: normaliser and ``b_dec`` from the first batches of the stream (read
    back to the host once, as :func:`~gemma_scope_pz.train.trainer.initial_state` expects).
    ``programs`` are the jitted ``(fill, draw)``."""
    fill, draw = programs
    num_steps = next(iter(configs.values())).num_steps  # shared (stream_data.check_sites)
    n_batches = max(c.sae.norm_estimation_batches for c in configs.values())
    host: list[dict[str, tuple]] = []
    for step in range(n_batches):
        r = stream_data.refill_at(step, stream, num_steps)
        if r is not None:
            tokens = sharding.put_tokens(contexts.tokens(r), mesh)
            buffer, _ = fill(model, buffer, tokens, jnp.int32(r % stream.buffer_refills))
        slots = draw(buffer["valid"], jnp.int32(step))
        host.append(
            {n: jax.device_get(stream_data.batch_of(buffer, slots, c)) for n, c in configs.items()}
        )
    states = {}
    for name, config in configs.items():
        source = CallableSource(lambda i, name=name: _as_batch(host[i][name]))
        states[name] = trainer.initial_state(config, source)[0]
    return states


def _as_batch(pair):
    return pair[0] if pair[1] is None else pair


# --------------------------------------------------------------------------- checkpoints
def _meta(configs, stream: StreamConfig, step: int) -> dict:
    return {
        "configs": {n: c.to_dict() for n, c in configs.items()},
        "stream": stream.resume_keys(),
        "data_position": step,
        "format_version": 1,
    }


def _check_meta(meta: dict, configs, stream: StreamConfig, where: str) -> None:
    if sorted(meta["configs"]) != sorted(configs):
        raise ValueError(
            f"train_streaming: cannot resume from {where}: it trains {sorted(meta['configs'])}, "
            f"not {sorted(configs)}"
        )
    for name, config in configs.items():
        trainer._check_resume(meta["configs"][name], config, f"{where} (dictionary {name!r})")
    diffs = [
        f"stream.{k}: checkpoint {meta['stream'].get(k)!r} vs {v!r}"
        for k, v in stream.resume_keys().items()
        if meta["stream"].get(k) != v
    ]
    if diffs:
        raise ValueError(f"train_streaming: cannot resume from {where}: " + "; ".join(diffs))


def _restore(manager, configs, widths, stream, n_contexts: int, where: str):
    """``(states, buffer, n_bad)`` of the latest checkpoint, or None."""
    latest = manager.latest_step()
    if latest is None:
        return None
    meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    _check_meta(meta, configs, stream, f"{where} step {latest}")
    abstract = {
        "states": {n: trainer._abstract_state(c) for n, c in configs.items()},
        "buffer": jax.eval_shape(
            lambda: buffer_lib.init_buffer(
                widths, stream.buffer_refills, n_contexts * stream.context_len
            )
        ),
        "n_bad": jax.ShapeDtypeStruct((), jnp.int32),
    }
    restore = ocp.args.StandardRestore(abstract)
    saved = manager.restore(latest, args=ocp.args.Composite(state=restore))["state"]
    return saved["states"], saved["buffer"], int(saved["n_bad"])


def _save(manager, step: int, states, buffer, n_bad: int, configs, stream) -> None:
    tree = {"states": states, "buffer": buffer, "n_bad": jnp.int32(n_bad)}
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(_meta(configs, stream, step))
        ),
        force=True,
    )
    manager.wait_until_finished()


def _start(model, configs, widths, stream, contexts, programs, manager, resume: bool, mesh):
    """``(states, buffer, n_bad)``: from the latest checkpoint (with ``resume``) or fresh (earlier
    checkpoints deleted without ``resume``); placed on ``mesh`` when one is given."""
    restored = None
    if manager is not None and resume:
        where = str(manager.directory)
        restored = _restore(manager, configs, widths, stream, contexts.n_contexts, where)
    elif manager is not None:
        for old in manager.all_steps():
            manager.delete(old)
    if restored is not None:
        states, buffer, n_bad = restored
    else:
        buffer, n_bad = _initial_buffer(model, programs[0], contexts, widths, stream, mesh)
        states = _initial_states(model, configs, programs, buffer, contexts, stream, mesh)
    if mesh is not None:
        states, buffer = sharding.place_stream(configs, states, buffer, mesh)
    return states, buffer, n_bad


# --------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class _Run:
    """What the loop needs besides the device arrays."""

    configs: Mapping[str, TrainConfig]
    stream: StreamConfig
    contexts: ContextStream
    program: Any
    manager: Any
    histories: dict[str, list[dict]]
    mesh: Any = None


def _log(run: _Run, states, metrics, step: int, n_bad, bar) -> None:
    host = jax.device_get(metrics)
    shown = {}
    for name, config in run.configs.items():
        row = trainer._metrics_row(config, states[name], host[name], step)
        run.histories[name].append(row)
        shown[name] = f"L0 {row['l0']:.1f} FVU {row['fvu']:.3f} dead {row['dead_fraction']:.2f}"
    n_bad = int(n_bad)
    if n_bad and any(c.run.nan_policy == "error" for c in run.configs.values()):
        raise FloatingPointError(
            f"train_streaming: {n_bad} activation rows with non-finite values by step {step}; "
            "nan_policy='error'"
        )
    bar.set_postfix_str(" | ".join(f"{k}: {v}" for k, v in shown.items()) + f" | nonfinite {n_bad}")


def _loop(run: _Run, model, states, buffer, n_bad, start: int, stop: int):
    """Steps ``start .. stop - 1``: refills, updates, logging, checkpoints. Returns the states,
    the buffer, the non-finite row count and the seconds to the end of the first step (which
    compiles the step program)."""
    began = time.perf_counter()
    first_s = 0.0
    first = next(iter(run.configs.values()))
    total, batch = first.num_steps, first.run.batch_size
    stream = run.stream
    tokens = sharding.put_tokens(
        np.zeros((run.contexts.n_contexts, stream.context_len), np.int32), run.mesh
    )
    n_bad = jnp.int32(n_bad)
    model_leaves, model_def = stateful.flat(model)
    bar = tqdm(total=total * batch, initial=start * batch, unit="tok", unit_scale=True,
               disable=not stream.progress_bar, desc="stream", leave=False)  # fmt: skip
    try:
        for step in range(start, stop):
            refill = stream_data.refill_at(step, stream, total)
            if refill is not None:  # tokenised on the host while the device runs earlier steps
                tokens = sharding.put_tokens(run.contexts.tokens(refill), run.mesh)
            states, buffer, bad, metrics = run.program(
                model_def, model_leaves, states, buffer, tokens, jnp.int32(step),
                jnp.bool_(refill is not None),
            )  # fmt: skip
            n_bad = n_bad + bad
            if step == start:  # the first step compiles: its time is reported apart
                jax.block_until_ready(bad)
                first_s = time.perf_counter() - began
            done = step + 1
            if done % stream.log_every == 0 or done in (total, stop):
                _log(run, states, metrics, step, n_bad, bar)
            bar.update(batch)
            if run.manager is not None and (done % stream.checkpoint_every == 0 or done == stop):
                _save(run.manager, done, states, buffer, int(n_bad), run.configs, stream)
    finally:
        bar.close()
    return states, buffer, int(n_bad), first_s


def _manager(checkpoint_dir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(os.path.abspath(checkpoint_dir), options=options)


def _results(configs, states, finished: bool) -> dict[str, trainer.TrainResult]:
    """One ``TrainResult`` per dictionary; a finished run is checked for skipped steps."""
    out = {}
    for name, config in configs.items():
        host = jax.device_get(states[name])
        if finished:
            trainer._check_skipped(config, int(host["n_skipped"]), int(host["first_bad_step"]))
        out[name] = trainer.TrainResult(
            params={k: np.asarray(v) for k, v in host["params"].items()},
            metrics=[],
            normaliser=Normaliser.from_arrays(host["norm"], config.sae.normalization),
            config=config,
            n_skipped=int(host["n_skipped"]),
            inference_threshold=float(host["inference_threshold"]),
        )
    return out


def train_streaming(
    model,
    configs: Mapping[str, TrainConfig] | TrainConfig,
    corpus: Corpus | Iterable[str] | str | None,
    *,
    tokenizer: Any = None,
    stream: StreamConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    stop_at: int | None = None,
    mesh: Any = None,
) -> StreamResult:
    """Trains every dictionary of ``configs`` from one stream of model activations.

    Args:
      model: A ``Gemma3LM``.
      configs: ``{name: TrainConfig}`` (a single config is named after its ``sae.site_in``); each
        names its ``sae.site_in`` (and ``sae.site_out`` for a transcoder). All share
        ``run.batch_size`` and the step count.
      corpus: A ``Corpus``, any iterable of ``str`` or a ``load_corpus`` spec.
      tokenizer: Text tokenizer (default: the model's, ``models.tokenizer.load_tokenizer``).
      stream: Packing, buffer and logging settings.
      checkpoint_dir: Orbax checkpoints of the whole stream (every dictionary, the buffer).
      resume: Continue from the latest checkpoint there (``False``: start afresh, deleting them).
      stop_at: Stop (and checkpoint) after this many steps; a later call resumes.
      mesh: A ``("data", "model")`` mesh (``parallel.make_mesh``): each refill's contexts and
        each batch split over ``"data"`` (gradients averaged over it), latents over ``"model"``
        (:mod:`~gemma_scope_pz.train.sharding`). The model is replicated over the mesh unless it
        is on it already (``gs.load_model(..., mesh=mesh)``). Same data order, same result (to
        float tolerance) as without a mesh.

    Raises:
      ValueError: a dictionary whose site or width does not match the model, dictionaries that
        disagree on batch size or length, a buffer that does not fit in memory, a checkpoint of
        other settings, token ids outside the vocabulary.
      FloatingPointError: non-finite activations with ``nan_policy="error"``; too many skipped
        steps (see ``run.max_skipped_fraction``).
    """
    if isinstance(configs, TrainConfig):
        configs = {configs.sae.site_in or "dictionary": configs}
    configs, stream = dict(configs), stream or StreamConfig()
    widths = stream_data.check_sites(model, configs)
    first = next(iter(configs.values()))
    n_contexts = stream.n_contexts(first.run.batch_size)
    if mesh is not None:
        sharding.check_stream_mesh(mesh, configs, n_contexts)
    buffer_lib.check_fits(widths, stream.buffer_refills * n_contexts * stream.context_len)
    if tokenizer is None:
        from gemma_scope_pz.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model)
    contexts = ContextStream(
        as_corpus(corpus),
        tokenizer,
        n_contexts,
        stream.context_len,
        model.config.vocab_size,
        packing_kind=stream.packing,
    )
    fill, draw, program = _programs(
        tuple(configs.items()),
        tuple(widths),
        stream,
        contexts.ignored_ids,
        first.run.batch_size,
        mesh,
        stream.forward_group(n_contexts, mesh),
    )
    # Cast once here, not in every refill's program (``stream.model_dtype``).
    frozen = model_in_dtype(pz.freeze_params(model), stream.model_dtype)
    if mesh is not None:
        frozen = sharding.on_mesh(frozen, mesh)
    manager = _manager(checkpoint_dir, first.run.keep_checkpoints) if checkpoint_dir else None
    states, buffer, n_bad = _start(
        frozen, configs, widths, stream, contexts, (fill, draw), manager, resume, mesh
    )
    start = int(jax.device_get(next(iter(states.values()))["step"]))
    stop = first.num_steps if stop_at is None else min(int(stop_at), first.num_steps)
    run = _Run(configs, stream, contexts, program, manager, {n: [] for n in configs}, mesh)
    began = time.perf_counter()
    states, buffer, n_bad, first_s = _loop(run, frozen, states, buffer, n_bad, start, stop)
    seconds = time.perf_counter() - began
    if n_bad:
        warnings.warn(
            f"train_streaming: {n_bad} activation rows had non-finite values and were dropped",
            stacklevel=2,
        )
    results = _results(configs, states, finished=stop == first.num_steps)
    for name, result in results.items():
        result.metrics = run.histories[name]
    return StreamResult(
        results, n_bad, (stop - start) * first.run.batch_size, seconds, stop, first_s
    )
