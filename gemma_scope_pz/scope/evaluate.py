"""How good is a dictionary at its site: FVU, L0, delta loss, CE recovered, KL — one jit per batch.

Token positions counted: every valid (non-pad) position except BOS (position 0) and, optionally, the
first ``exclude_prefix`` positions after it (e.g. an instruction-tuned chat template). For the language
modelling metrics, the prediction made at position t (of token t+1) counts when t is counted and t+1 is a
real token. "Ablated" replaces the site's activation (a transcoder's MLP output) by zeros.
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

from gemma_scope_pz.models.gemma3 import Gemma3LM, positions_for
from gemma_scope_pz.scope.interventions import capture, run_with_captures, splice
from gemma_scope_pz.scope.sites import Site, attach


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


def counted_positions(
    tokens: jax.Array, positions: jax.Array, exclude_prefix: int = 0
) -> jax.Array:
    """Bool [batch, seq]: real tokens after BOS and after ``exclude_prefix`` further positions."""
    return positions > exclude_prefix


def _next_token_terms(logits, ref_logits, tokens, counted, positions):
    """Per-position NLL of the next token, KL to ``ref_logits``, and the prediction mask."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    mask = counted[:, :-1] & (positions[:, 1:] >= 0)  # the next token is real (not ``pad_id``)
    if ref_logits is None:
        return nll, None, mask
    ref = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)[:, :-1]
    kl = jnp.sum(jnp.exp(ref) * (ref - logp[:, :-1]), axis=-1)
    return nll, kl, mask


@functools.partial(jax.jit, static_argnames=("site_in", "site_out", "exclude_prefix"))
def _batch_sums(clean, spliced, ablated, sae, tokens, positions, site_in, site_out, exclude_prefix):
    sites = tuple(dict.fromkeys((site_in, site_out)))
    logits, acts = run_with_captures(clean, tokens, positions, sites, stop_early=False)
    counted = counted_positions(tokens, positions, exclude_prefix)
    x_in = pz.nx.wrap(acts[site_in].astype(jnp.float32)).tag("batch", "seq", "embedding")
    latents = sae.encode(x_in)
    x_hat = sae(x_in).unwrap("batch", "seq", "embedding")
    target = acts[site_out].astype(jnp.float32)
    w = counted.astype(jnp.float32)[..., None]
    n = jnp.sum(w)
    active = (latents.unwrap("batch", "seq", "latents") != 0) & counted[..., None]
    spliced_logits = spliced(
        pz.nx.wrap(tokens).tag("batch", "seq"),
        token_positions=pz.nx.wrap(positions).tag("batch", "seq"),
    )
    ablated_logits = ablated(
        pz.nx.wrap(tokens).tag("batch", "seq"),
        token_positions=pz.nx.wrap(positions).tag("batch", "seq"),
    )
    nll_clean, _, mask = _next_token_terms(logits, None, tokens, counted, positions)
    nll_spliced, kl, _ = _next_token_terms(
        spliced_logits.unwrap("batch", "seq", "vocabulary"), logits, tokens, counted, positions
    )
    nll_ablated, _, _ = _next_token_terms(
        ablated_logits.unwrap("batch", "seq", "vocabulary"), None, tokens, counted, positions
    )
    m = mask.astype(jnp.float32)
    return {
        "n": n,
        "sq_err": jnp.sum(w * (target - x_hat) ** 2),
        "sum_x": jnp.sum(w * target, axis=(0, 1)),
        "sum_sq": jnp.sum(w * target**2),
        "active": jnp.sum(active),
        "fired": jnp.any(active, axis=(0, 1)),
        "n_pred": jnp.sum(m),
        "ce_clean": jnp.sum(m * nll_clean),
        "ce_spliced": jnp.sum(m * nll_spliced),
        "ce_ablated": jnp.sum(m * nll_ablated),
        "kl": jnp.sum(m * kl),
    }


def evaluate_sae(
    model: Gemma3LM,
    sae: pz.nn.Layer,
    batches: Iterable[np.ndarray] | np.ndarray,
    *,
    site: str | None = None,
    site_out: str | None = None,
    exclude_prefix: int = 0,
    pad_id: int = 0,
    progress: bool = True,
) -> SaeEvaluation:
    """Evaluates an SAE (or transcoder) on token batches ([batch, seq] int arrays, right-padded).

    ``site``/``site_out`` default to the SAE's ``meta.site_in``/``meta.site_out``. Batches after the
    first should keep its shape so that the evaluation compiles once.
    """
    meta = getattr(sae, "meta", None)
    site_in = Site.parse(site or getattr(meta, "site_in", None) or "").name
    out_name = site_out or getattr(meta, "site_out", None) or site_in
    site_out = Site.parse(out_name).name
    clean = pz.freeze_params(model)
    spliced = pz.freeze_params(splice(model, sae, site_in)).body
    if Site.parse(site_out).kind == "mlp_out" and Site.parse(site_in).kind == "mlp_in":
        ablate_site = site_out
    else:
        ablate_site = site_in
    ablated = pz.freeze_params(attach(model, ablate_site, ZeroOut())).body
    frozen_sae = pz.freeze_params(sae)
    if isinstance(batches, np.ndarray | jax.Array):
        batches = [np.asarray(batches)]
    totals: dict[str, np.ndarray] = {}
    for tokens in tqdm(batches, desc="evaluate", disable=not progress):
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = positions_for(tokens, pad_id)
        sums = _batch_sums(
            clean,
            spliced,
            ablated,
            frozen_sae,
            tokens,
            positions,
            site_in,
            site_out,
            exclude_prefix,
        )
        for key, value in sums.items():
            value = np.asarray(value, np.float64)
            if key == "fired":
                totals[key] = totals.get(key, False) | value.astype(bool)
            else:
                totals[key] = totals.get(key, 0.0) + value
    if not totals or totals["n"] == 0:
        raise ValueError(
            "evaluate_sae: no counted tokens (all positions are BOS, prefix or padding)"
        )
    n, n_pred = float(totals["n"]), max(float(totals["n_pred"]), 1.0)
    mean = totals["sum_x"] / n
    variance = float(totals["sum_sq"]) - n * float(np.sum(mean**2))
    ce_clean = float(totals["ce_clean"]) / n_pred
    ce_spliced = float(totals["ce_spliced"]) / n_pred
    ce_ablated = float(totals["ce_ablated"]) / n_pred
    denom = ce_ablated - ce_clean
    return SaeEvaluation(
        fvu=float(totals["sq_err"]) / max(variance, 1e-30),
        l0=float(totals["active"]) / n,
        ce_clean=ce_clean,
        ce_spliced=ce_spliced,
        delta_loss=ce_spliced - ce_clean,
        ce_ablated=ce_ablated,
        ce_recovered=(ce_ablated - ce_spliced) / denom if abs(denom) > 1e-12 else float("nan"),
        kl=float(totals["kl"]) / n_pred,
        n_tokens=int(n),
        dead_fraction=float(1.0 - np.mean(totals["fired"])),
    )


@functools.partial(jax.jit, static_argnames=("k",))
def _top_features(sae, x, k):
    latents = sae.encode(pz.nx.wrap(x).tag("seq", "embedding")).unwrap("seq", "latents")
    values, ids = jax.lax.top_k(latents, k)
    return values, ids, latents


def top_features(
    model: Gemma3LM, sae: pz.nn.Layer, tokens, *, k: int = 5, site: str | None = None
) -> dict[str, np.ndarray]:
    """Per-token top-k latents for ONE sequence ``tokens`` [seq].

    Returns ``{"values": [seq, k], "ids": [seq, k], "latents": [seq, d_sae], "mean": [d_sae]}``;
    ``mean`` averages activations over the positions after BOS.
    """
    site = site or sae.meta.site_in
    tokens = np.asarray(tokens, np.int32).reshape(1, -1)
    x = capture(model, tokens, [site])[site][0].astype(jnp.float32)
    values, ids, latents = _top_features(pz.freeze_params(sae), x, k)
    latents = np.asarray(latents)
    mean = latents[1:].mean(axis=0) if latents.shape[0] > 1 else latents.mean(axis=0)
    return {"values": np.asarray(values), "ids": np.asarray(ids), "latents": latents, "mean": mean}


@jax.jit
def _encode(sae, x):
    return sae.encode(x)


def latent_encoder(model: Gemma3LM, sae: pz.nn.Layer):
    """``tokens [batch, seq] -> latents [batch, seq, d_sae]`` at ``sae.meta.site_in`` (jitted).

    The callable ``analysis.examples.collect_max_activating`` streams a corpus through.
    """
    frozen = pz.freeze_params(sae)

    def encode(tokens):
        return _encode(frozen, capture(model, tokens, [sae.meta.site_in])[sae.meta.site_in])

    return encode
