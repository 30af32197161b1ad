"""How good is a dictionary at its site, and what it reads there: evaluation, latents, top features.

`evaluate_sae` gives FVU, L0, delta loss, CE recovered and KL with one jit per batch; the formulas
live in `gemma_scope_pz.scope.metrics`, the counted positions in `gemma_scope_pz.scope.tokens`
(every real token except BOS, and optionally the first ``exclude_prefix`` positions after it, e.g.
an instruction-tuned chat template). For the language-modelling metrics, the prediction made at
position t (of token t+1) counts when t is counted and t+1 is a real token. "Ablated" replaces the
site's activation (a transcoder's MLP output) by zeros.

`latents` encodes a batch at the dictionary's site, `top_features` gives one sequence's strongest
latents per token (BOS excluded by default) and `token_losses` the per-token loss with and without
the dictionary spliced in (for `gemma_scope_pz.analysis.plots.token_loss_svg`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from tqdm.auto import tqdm

from gemma_scope_pz.models import stateful
from gemma_scope_pz.models.gemma3 import Gemma3LM, check_token_ids, positions_for, vocab_size_of
from gemma_scope_pz.models.inputs import as_token_batch
from gemma_scope_pz.models.stateful import detach_state
from gemma_scope_pz.scope import metrics
from gemma_scope_pz.scope.crosscoder import Crosscoder
from gemma_scope_pz.scope.interventions import capture, run_with_captures, splice
from gemma_scope_pz.scope.multisite import crosscoder_latents, evaluate_crosscoder
from gemma_scope_pz.scope.sites import Site, attach
from gemma_scope_pz.scope.tokens import token_mask


@dataclasses.dataclass(frozen=True)
class SaeEvaluation:
    """Aggregated metrics over all counted tokens.

    Attributes:
      fvu: Fraction of variance unexplained, sum ||x - x̂||² / sum ||x - mean(x)||².
      l0: Mean number of active latents per token.
      ce_clean: Mean next-token cross-entropy of the unmodified model (nats).
      ce_spliced: The same with the SAE's reconstruction spliced in (no error term).
      delta_loss: ce_spliced - ce_clean.
      ce_ablated: The same with the site zero-ablated.
      ce_recovered: (ce_ablated - ce_spliced) / (ce_ablated - ce_clean).
      kl: Mean KL(clean || spliced) of next-token distributions.
      n_tokens: Number of tokens the activation metrics were averaged over.
      dead_fraction: Fraction of latents that never fired on these tokens.
    """

    fvu: float
    l0: float
    ce_clean: float
    ce_spliced: float
    delta_loss: float
    ce_ablated: float
    ce_recovered: float
    kl: float
    n_tokens: int
    dead_fraction: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@pz.pytree_dataclass
class ZeroOut(pz.nn.Layer):
    """Replaces an activation by zeros after BOS (zero-ablation baseline)."""

    def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
        keep = side_inputs["token_positions"] <= 0
        return pz.nx.nmap(jnp.where)(keep, x, jnp.zeros((), x.dtype))


def _logits_of(model, tokens, positions) -> jax.Array:
    out = model(
        pz.nx.wrap(tokens).tag("batch", "seq"),
        token_positions=pz.nx.wrap(positions).tag("batch", "seq"),
    )
    return out.unwrap("batch", "seq", "vocabulary")


def _activation_sums(sae, x_in, target, counted) -> dict[str, jax.Array]:
    """Per-batch sums for FVU, L0 and dead latents over the counted tokens."""
    x_named = pz.nx.wrap(x_in.astype(jnp.float32)).tag("batch", "seq", "embedding")
    f = sae.encode(x_named).unwrap("batch", "seq", "latents")
    x_hat = sae(x_named).unwrap("batch", "seq", "embedding")
    target = target.astype(jnp.float32)
    w = counted.astype(jnp.float32)[..., None]
    active = (f != 0) & counted[..., None]
    return {
        "n": jnp.sum(w),
        "sq_err": jnp.sum(w * (target - x_hat) ** 2),
        "sum_x": jnp.sum(w * target, axis=(0, 1)),
        "sum_sq": jnp.sum(w * target**2),
        "active": jnp.sum(active),
        "fired": jnp.any(active, axis=(0, 1)),
    }


# stateful.jit: the model may hold state variables (models/stateful.py); the derived copies are
# detached so that only the clean model writes them.
@functools.partial(
    stateful.jit,
    static_argnames=("site_in", "site_out", "exclude_prefix", "pad_id", "special_ids"),
)
def _batch_sums(
    clean,
    spliced,
    ablated,
    sae,
    tokens,
    positions,
    site_in,
    site_out,
    exclude_prefix,
    pad_id,
    special_ids=(),
):
    sites = tuple(dict.fromkeys((site_in, site_out)))
    logits, acts = run_with_captures(clean, tokens, positions, sites, stop_early=False)
    counted = token_mask(
        tokens, pad_id=pad_id, exclude_prefix=exclude_prefix, special_ids=special_ids
    )
    real = tokens != pad_id if pad_id is not None else jnp.ones(tokens.shape, bool)
    m = metrics.prediction_mask(counted, real).astype(jnp.float32)
    spliced_logits = _logits_of(spliced, tokens, positions)
    nll = {
        "ce_clean": metrics.next_token_nll(logits, tokens),
        "ce_spliced": metrics.next_token_nll(spliced_logits, tokens),
        "ce_ablated": metrics.next_token_nll(_logits_of(ablated, tokens, positions), tokens),
    }
    kl = metrics.kl_per_token(logits[:, :-1], spliced_logits[:, :-1])
    return {
        **_activation_sums(sae, acts[site_in], acts[site_out], counted),
        "n_pred": jnp.sum(m),
        **{key: jnp.sum(m * value) for key, value in nll.items()},
        "kl": jnp.sum(m * kl),
    }


def _finish(totals: dict[str, np.ndarray]) -> SaeEvaluation:
    """Metrics from the summed per-batch terms (host side, float64)."""
    if not totals or totals["n"] == 0:
        raise ValueError(
            "evaluate_sae: no counted tokens (all positions are BOS, prefix or padding)"
        )
    n, n_pred = float(totals["n"]), max(float(totals["n_pred"]), 1.0)
    ce = {key: float(totals[key]) / n_pred for key in ("ce_clean", "ce_spliced", "ce_ablated")}
    return SaeEvaluation(
        fvu=metrics.fvu_from_sums(totals["sq_err"], totals["sum_x"], totals["sum_sq"], n),
        l0=float(totals["active"]) / n,
        **ce,
        delta_loss=float(metrics.delta_loss(ce["ce_clean"], ce["ce_spliced"])),
        ce_recovered=float(
            metrics.ce_recovered(ce["ce_clean"], ce["ce_spliced"], ce["ce_ablated"])
        ),
        kl=float(totals["kl"]) / n_pred,
        n_tokens=int(n),
        dead_fraction=float(metrics.dead_fraction(totals["fired"].astype(np.int32))),
    )


def _sites_of(sae, site: str | None, site_out: str | None) -> tuple[str, str]:
    meta = getattr(sae, "meta", None)
    site_in = Site.parse(site or getattr(meta, "site_in", None) or "").name
    out_name = site_out or getattr(meta, "site_out", None) or site_in
    return site_in, Site.parse(out_name).name


def evaluate_sae(
    model: Gemma3LM,
    sae: pz.nn.Layer,
    batches: Iterable[np.ndarray] | np.ndarray,
    *,
    site: str | None = None,
    site_out: str | None = None,
    exclude_prefix: int = 0,
    pad_id: int = 0,
    special_ids: tuple[int, ...] = (),
    progress: bool = True,
    batch_size: int = 8,
) -> SaeEvaluation:
    """Evaluates an SAE (or transcoder) on token batches ([batch, seq] int arrays, right-padded).

    ``site``/``site_out`` default to the SAE's ``meta.site_in``/``meta.site_out``. Batches after the
    first should keep its shape so that the evaluation compiles once; one array is split into
    batches of ``batch_size`` contexts (three full-vocabulary forwards per batch: the memory
    grows with it). Counted positions follow
    `gemma_scope_pz.scope.tokens.token_mask` with ``pad_id``, ``exclude_prefix`` and ``special_ids``
    (e.g. ``scope.tokens.TURN_MARKER_IDS`` for chat transcripts). A `Crosscoder` is evaluated by
    `scope.multisite.evaluate_crosscoder` (all its layers spliced; FVU over all layers).
    """
    if batch_size < 1:
        raise ValueError(f"evaluate_sae: batch_size must be >= 1, got {batch_size}")
    if isinstance(batches, np.ndarray | jax.Array):
        array = np.asarray(batches)
        batches = [array[i : i + batch_size] for i in range(0, len(array), batch_size)]
    if isinstance(sae, Crosscoder):
        result = evaluate_crosscoder(model, sae, batches, pad_id=pad_id, progress=progress)
        fields = {f.name for f in dataclasses.fields(SaeEvaluation)}
        return SaeEvaluation(**{k: v for k, v in result.items() if k in fields})
    site_in, site_out = _sites_of(sae, site, site_out)
    spliced = detach_state(pz.freeze_params(splice(model, sae, site_in)).body)
    transcoder = Site.parse(site_out).kind == "mlp_out" and Site.parse(site_in).kind == "mlp_in"
    ablate_site = site_out if transcoder else site_in
    ablated = detach_state(pz.freeze_params(attach(model, ablate_site, ZeroOut())).body)
    frozen = (stateful.frozen(model), spliced, ablated, stateful.frozen(sae))
    special = tuple(int(i) for i in special_ids)
    totals: dict[str, np.ndarray] = {}
    for tokens in tqdm(batches, desc="evaluate", disable=not progress):
        tokens = jnp.asarray(check_token_ids(tokens, vocab_size_of(model)))
        positions = positions_for(tokens, pad_id)
        sums = _batch_sums(
            *frozen, tokens, positions, site_in, site_out, exclude_prefix, pad_id, special
        )
        metrics.accumulate_sums(totals, sums)
    return _finish(totals)


@stateful.jit  # the dictionary may hold state variables too (a probe inside its encoder)
def _encode(sae, x):
    return sae.encode(x)


def _as_batch(tokens, model) -> np.ndarray:
    """int32 [batch, seq] from anything ``models.inputs.as_token_batch`` accepts."""
    return as_token_batch(tokens, model)[0]


def latents(
    model: Gemma3LM,
    sae: pz.nn.Layer,
    tokens,
    *,
    site: str | None = None,
    pad_id: int | None = None,
) -> jax.Array:
    """The dictionary's latents ``[batch, seq, d_sae]`` (float32) for a batch of tokens.

    ``tokens`` is anything ``models.inputs.as_token_batch`` accepts: text (the model's tokenizer,
    BOS added), a list of ids, ragged lists of ids (right-padded) or an int ``[batch, seq]`` array.
    Captures ``site`` (default ``sae.meta.site_in``) in one jitted forward that stops after its
    block and encodes it. Every position is encoded, BOS and padding included: select the
    positions that count with `gemma_scope_pz.scope.tokens.token_mask`. ``pad_id`` as in
    `gemma_scope_pz.scope.interventions.capture` (left padding masked out of attention). A
    `Crosscoder` reads all its layers from the same forward (`scope.multisite.crosscoder_latents`).
    """
    if isinstance(sae, Crosscoder):
        return crosscoder_latents(model, sae, tokens, pad_id=pad_id)
    site = site or sae.meta.site_in
    x = capture(model, tokens, [site], pad_id=pad_id)[site].astype(jnp.float32)
    named = pz.nx.wrap(x).tag("batch", "seq", "embedding")
    return _encode(pz.freeze_params(sae), named).unwrap("batch", "seq", "latents")


def latent_encoder(model: Gemma3LM, sae: pz.nn.Layer):
    """``tokens [batch, seq] -> latents [batch, seq, d_sae]`` at ``sae.meta.site_in`` (jitted).

    The callable ``analysis.examples.collect_max_activating`` streams a corpus through.
    """
    if isinstance(sae, Crosscoder):
        return lambda tokens: crosscoder_latents(model, sae, tokens)
    frozen = pz.freeze_params(sae)

    def encode(tokens):
        return _encode(frozen, capture(model, tokens, [sae.meta.site_in])[sae.meta.site_in])

    return encode


def top_features(
    model: Gemma3LM,
    sae: pz.nn.Layer,
    tokens,
    *,
    k: int = 5,
    site: str | None = None,
    exclude_bos: bool = True,
) -> dict[str, np.ndarray]:
    """Per-token top-k latents for ONE sequence: a string, a list of ids or a ``[seq]`` array.

    Returns ``{"values": [seq, k], "ids": [seq, k], "latents": [seq, d_sae], "mean": [d_sae],
    "mask": [seq]}``. With ``exclude_bos`` (the default) BOS (position 0, whose huge activations
    would dwarf every real token) does not count: its latents are zeroed (so its ids are 0..k-1 with
    value 0) and ``mean`` averages the counted positions only; ``mask`` says which positions count.
    """
    tokens = _as_batch(tokens, model)
    if tokens.shape[0] != 1:
        raise ValueError(f"top_features takes one sequence [seq], got shape {tokens.shape}")
    mask = token_mask(tokens[0], pad_id=None, exclude_bos=exclude_bos)
    f = np.asarray(latents(model, sae, tokens, site=site))[0]
    f = np.where(mask[:, None], f, 0.0).astype(np.float32)
    values, ids = jax.lax.top_k(jnp.asarray(f), k)
    mean = f[mask].mean(axis=0) if mask.any() else f.mean(axis=0)
    return {
        "values": np.asarray(values),
        "ids": np.asarray(ids),
        "latents": f,
        "mean": mean,
        "mask": mask,
    }


@functools.partial(stateful.jit, static_argnames=("pad_id",))
def _token_nll(model, spliced, tokens, pad_id):
    positions = positions_for(tokens, pad_id)
    clean = metrics.next_token_nll(_logits_of(model, tokens, positions), tokens)
    return clean, metrics.next_token_nll(_logits_of(spliced, tokens, positions), tokens)


def token_losses(
    model: Gemma3LM, sae: pz.nn.Layer, tokens, *, site: str | None = None
) -> dict[str, np.ndarray]:
    """Next-token loss (nats) at every position of ONE sequence (a string, ids or a ``[seq]``
    array), clean and with ``sae`` spliced in.

    Returns ``{"clean": [seq - 1], "spliced": [seq - 1]}``; entry t is the loss of predicting
    token t + 1 (so the first entry is the prediction made at BOS).
    """
    tokens = _as_batch(tokens, model)
    if tokens.shape[0] != 1 or tokens.shape[1] < 2:
        raise ValueError(
            f"token_losses takes one sequence of >= 2 tokens, got shape {tokens.shape}"
        )
    site = Site.parse(site or sae.meta.site_in).name
    spliced = detach_state(pz.freeze_params(splice(model, sae, site)).body)
    clean, with_sae = _token_nll(pz.freeze_params(model).body, spliced, jnp.asarray(tokens), None)
    return {"clean": np.asarray(clean)[0], "spliced": np.asarray(with_sae)[0]}
