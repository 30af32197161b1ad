"""A crosscoder inside the model: its latents from one forward, its splice, steering along a latent.

Latents (`crosscoder_latents`): one jitted forward captures the residual stream at every layer of
the crosscoder (`interventions.capture`, stopping after the deepest one) and encodes them jointly.

Splice (`crosscoder_logits`, `evaluate_crosscoder`): the residual stream at each of the crosscoder's
layers ``L_0 < L_1 < ...`` is replaced by its reconstruction, layer by layer, in one forward (BOS
and padding untouched). A latent can only be computed once every layer it reads has been reached:
its *read position* is the deepest layer with a nonzero encoder column
(`Crosscoder.read_positions`). At layer ``L_k`` the pre-activations are summed from the activations
that reached ``L_0 .. L_k`` in this same forward (each after the earlier replacements), the latents
whose read position is ``<= k`` are final and the reconstruction ``y_k = f @ w_dec[k] + b_dec[k]``
is written. For weakly causal weights (the released kind, `Crosscoder.is_weakly_causal`) no latent
writes before its read position, so this is exact in one forward. For acausal weights (e.g. a dense
random crosscoder, where every latent reads the deepest layer), the latents not yet computable at
``L_k`` take their values from a clean forward that stops after the deepest layer (reusing
`interventions.run_with_captures`): a second, shorter pass inside the same jit. With
``include_error`` the error ``x_k - y_k`` is added back, so only latent edits (``clamp``) change
the model.

Steering (`steer_crosscoder`): adds ``coeff * w_dec[k][latent]`` at each layer's ``resid_post``
(through `interventions.steer`, so the result is an ordinary ``Gemma3LM``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer.model_parts import TransformerBlock
from tqdm.auto import tqdm

from gemma_scope_pz.models import stateful
from gemma_scope_pz.models.gemma3 import Gemma3LM, check_token_ids, positions_for, vocab_size_of
from gemma_scope_pz.models.inputs import as_token_batch
from gemma_scope_pz.scope import metrics
from gemma_scope_pz.scope import sae as sae_math
from gemma_scope_pz.scope.crosscoder import Crosscoder
from gemma_scope_pz.scope.interventions import capture, run_with_captures, steer
from gemma_scope_pz.scope.sites import Site
from gemma_scope_pz.scope.tokens import token_mask

__all__ = [
    "crosscoder_latents",
    "crosscoder_logits",
    "evaluate_crosscoder",
    "steer_crosscoder",
]


def _check(model: Gemma3LM, crosscoder: Crosscoder) -> None:
    if not isinstance(crosscoder, Crosscoder):
        raise TypeError(f"expected a Crosscoder, got {type(crosscoder).__name__}")
    kinds = {Site.parse(s).kind for s in crosscoder.sites()}
    if kinds != {"resid_post"}:
        raise ValueError(f"crosscoder sites {crosscoder.sites()}: only resid_post is supported")
    config = getattr(model, "config", None)
    if config is None:
        return
    for site in crosscoder.sites():
        Site.parse(site).check(config)
    if crosscoder.meta.d_in != config.d_model:
        raise ValueError(
            f"crosscoder d_model={crosscoder.meta.d_in} does not match the model's "
            f"d_model={config.d_model}"
        )


@stateful.jit
def _encode(crosscoder, xs):
    return crosscoder.encode([x.astype(jnp.float32) for x in xs])


def crosscoder_latents(
    model: Gemma3LM, crosscoder: Crosscoder, tokens, *, pad_id: int | None = None
) -> jax.Array:
    """The crosscoder's latents ``[batch, seq, d_sae]`` (float32) for a batch of tokens.

    ``tokens`` as in `interventions.capture`. One jitted forward (stopping after the deepest layer)
    captures every layer; every position is encoded, BOS and padding included.
    """
    _check(model, crosscoder)
    sites = crosscoder.sites()
    acts = capture(model, tokens, sites, pad_id=pad_id)
    return _encode(stateful.frozen(crosscoder), [acts[s] for s in sites])


# ---------------------------------------------------------------------------------------------
# The layer-by-layer splice


def _segments(body: pz.nn.Sequential, layers: tuple[int, ...]) -> list[pz.nn.Sequential]:
    """``body`` cut right after each block of ``layers``: len(layers) + 1 pieces."""
    cuts, seen = [], -1
    for index, sub in enumerate(body.sublayers):
        if isinstance(sub, TransformerBlock):
            seen += 1
            if seen in layers:
                cuts.append(index + 1)
    if len(cuts) != len(layers):
        raise ValueError(f"crosscoder layers {layers}: the model has blocks 0..{seen}")
    bounds = [0, *cuts, len(body.sublayers)]
    return [pz.nn.Sequential(body.sublayers[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def _edit(f: jax.Array, edits) -> jax.Array:
    if edits is None:
        return f
    ids, values = edits
    return f.at[..., ids].set(values.astype(f.dtype))


def _run_spliced(body, crosscoder, tokens, positions, plan, edits=None):
    """Traceable: (logits, [x_k], [y_k], latents) of the layer-by-layer splice (module docstring).

    ``plan``: (ready [n, d_sae] bool, mode) with mode "splice", "splice_error" or "zero".
    """
    ready, mode, clean_f = plan
    layers = crosscoder.layers
    pieces = _segments(body, layers)
    pos = pz.nx.wrap(positions).tag("batch", "seq")
    h = pieces[0](pz.nx.wrap(tokens).tag("batch", "seq"), token_positions=pos)
    z = crosscoder.b_enc.astype(jnp.float32)
    xs, ys, f = [], [], None
    for k in range(len(layers)):
        if k:
            h = pieces[k](h, token_positions=pos)
        x = h.unwrap("batch", "seq", "embedding")
        xf = x.astype(jnp.float32)
        z = z + sae_math.matmul(xf, crosscoder.w_enc[k])
        f = sae_math.jumprelu(z, crosscoder.threshold)
        if clean_f is not None:
            f = jnp.where(ready[k], f, clean_f)
        y = sae_math.decode(f, crosscoder.w_dec[k], crosscoder.b_dec[k])
        y_out = sae_math.decode(_edit(f, edits), crosscoder.w_dec[k], crosscoder.b_dec[k])
        if mode == "splice_error":
            y_out = y_out + (xf - y)
        elif mode == "zero":
            y_out = jnp.zeros_like(xf)
        keep = (positions > 0)[..., None]
        h = pz.nx.wrap(jnp.where(keep, y_out, xf).astype(x.dtype)).tag("batch", "seq", "embedding")
        xs.append(xf)
        ys.append(y)
    logits = pieces[-1](h, token_positions=pos).unwrap("batch", "seq", "vocabulary")
    return logits, xs, ys, f


def _plan(crosscoder: Crosscoder, mode: str):
    """Static part of the splice: which latents are final at each layer, and whether a clean pass is
    needed (acausal weights)."""
    read = crosscoder.read_positions()
    ready = np.stack([read <= k for k in range(len(crosscoder.layers))])
    return jnp.asarray(ready), mode, not crosscoder.is_weakly_causal()


def _clean_latents(model, crosscoder, tokens, positions):
    """The latents of the clean forward, which stops after the deepest layer."""
    sites = tuple(crosscoder.sites())
    _, acts = run_with_captures(model, tokens, positions, sites, stop_early=True)
    return crosscoder.encode([acts[s].astype(jnp.float32) for s in sites])


@functools.partial(stateful.jit, static_argnames=("mode", "acausal"))
def _spliced_logits(model, crosscoder, tokens, positions, ready, edits, mode, acausal):
    clean_f = _clean_latents(model, crosscoder, tokens, positions) if acausal else None
    return _run_spliced(model.body, crosscoder, tokens, positions, (ready, mode, clean_f), edits)[0]


def _as_edits(crosscoder: Crosscoder, clamp: dict[int, float] | None):
    if not clamp:
        return None
    d_sae = crosscoder.meta.d_sae
    bad = [i for i in clamp if not 0 <= int(i) < d_sae]
    if bad:
        raise ValueError(
            f"clamp: latent indices {bad} are outside 0..{d_sae - 1} of this crosscoder"
        )
    values = np.asarray(list(clamp.values()), dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"clamp: values must be finite, got {dict(clamp)}")
    return jnp.asarray(list(clamp), jnp.int32), jnp.asarray(values, jnp.float32)


def crosscoder_logits(
    model: Gemma3LM,
    crosscoder: Crosscoder,
    tokens,
    *,
    include_error: bool = False,
    clamp: dict[int, float] | None = None,
    pad_id: int | None = None,
) -> jax.Array:
    """Logits ``[batch, seq, vocabulary]`` with the crosscoder spliced in at all its layers.

    Layer-by-layer semantics in the module docstring. ``clamp`` maps latent → value (0 ablates);
    with ``include_error`` everything not edited stays exact.
    """
    _check(model, crosscoder)
    tokens, _ = as_token_batch(tokens, model)
    tokens = jnp.asarray(check_token_ids(tokens, vocab_size_of(model)))
    positions = positions_for(tokens, pad_id)
    ready, mode, acausal = _plan(crosscoder, "splice_error" if include_error else "splice")
    return _spliced_logits(
        stateful.frozen(model),
        stateful.frozen(crosscoder),
        tokens,
        positions,
        ready,
        _as_edits(crosscoder, clamp),
        mode,
        acausal,
    )


def steer_crosscoder(
    model: Gemma3LM, crosscoder: Crosscoder, latent: int, coeff: float
) -> Gemma3LM:
    """A copy of ``model`` adding ``coeff * w_dec[k][latent]`` at each layer ``L_k`` (BOS untouched).

    Layers where the latent's decoder is zero are left alone.
    """
    _check(model, crosscoder)
    if not 0 <= int(latent) < crosscoder.meta.d_sae:
        raise ValueError(f"latent {latent} is outside 0..{crosscoder.meta.d_sae - 1}")
    for site, w in zip(crosscoder.sites(), crosscoder.w_dec, strict=True):
        direction = np.asarray(w[int(latent)], np.float32)
        norm = float(np.linalg.norm(direction))
        if norm > 0:
            model = steer(model, site, direction, float(coeff) * norm, norm_scaled=False)
    return model


# ---------------------------------------------------------------------------------------------
# Evaluation


@functools.partial(stateful.jit, static_argnames=("acausal", "pad_id"))
def _batch_sums(model, crosscoder, tokens, positions, ready, acausal, pad_id):
    clean_logits, acts = run_with_captures(
        model, tokens, positions, tuple(crosscoder.sites()), stop_early=False
    )
    # Reconstruction error and sparsity are measured on the clean activations.
    xs = [acts[s].astype(jnp.float32) for s in crosscoder.sites()]
    f = crosscoder.encode(xs)
    plan = (ready, "splice", f if acausal else None)
    spliced = _run_spliced(model.body, crosscoder, tokens, positions, plan)[0]
    ablated = _run_spliced(model.body, crosscoder, tokens, positions, (ready, "zero", None))[0]
    counted = token_mask(tokens, pad_id=pad_id)
    real = tokens != pad_id if pad_id is not None else jnp.ones(tokens.shape, bool)
    m = metrics.prediction_mask(counted, real).astype(jnp.float32)
    w = counted.astype(jnp.float32)[..., None]
    active = (f != 0) & counted[..., None]
    nll = {
        "ce_clean": clean_logits,
        "ce_spliced": spliced,
        "ce_ablated": ablated,
    }
    return {
        "n": jnp.sum(w),
        "sq_err": jnp.stack([jnp.sum(w * (x - y) ** 2) for x, y in zip(xs, crosscoder.decode(f))]),
        "sum_x": jnp.stack([jnp.sum(w * x, axis=(0, 1)) for x in xs]),
        "sum_sq": jnp.stack([jnp.sum(w * x**2) for x in xs]),
        "active": jnp.sum(active),
        "fired": jnp.any(active, axis=(0, 1)),
        "n_pred": jnp.sum(m),
        **{k: jnp.sum(m * metrics.next_token_nll(v, tokens)) for k, v in nll.items()},
        "kl": jnp.sum(m * metrics.kl_per_token(clean_logits[:, :-1], spliced[:, :-1])),
    }


def evaluate_crosscoder(
    model: Gemma3LM,
    crosscoder: Crosscoder,
    batches,
    *,
    pad_id: int = 0,
    progress: bool = True,
) -> dict[str, float | list[float]]:
    """FVU (overall and per layer), L0, CE clean/spliced/ablated, delta loss, CE recovered, KL.

    ``batches``: int ``[batch, seq]`` arrays (right-padded with ``pad_id``) or one such array.
    "Spliced" is the layer-by-layer splice without the error term (module docstring), "ablated"
    zeroes the residual stream at every layer of the crosscoder (BOS kept); FVU and L0 are measured
    on the clean activations. Counted positions follow `scope.tokens.token_mask` (BOS excluded).
    """
    _check(model, crosscoder)
    ready, _, acausal = _plan(crosscoder, "splice")
    frozen = (stateful.frozen(model), stateful.frozen(crosscoder))
    if isinstance(batches, np.ndarray | jax.Array):
        batches = [batches]
    totals: dict[str, np.ndarray] = {}
    for tokens in tqdm(batches, desc="evaluate crosscoder", disable=not progress):
        tokens = jnp.asarray(check_token_ids(np.asarray(tokens), vocab_size_of(model)))
        sums = _batch_sums(*frozen, tokens, positions_for(tokens, pad_id), ready, acausal, pad_id)
        metrics.accumulate_sums(totals, sums)
    return _finish(totals)


def _finish(t: dict[str, np.ndarray]) -> dict[str, float | list[float]]:
    n, n_pred = float(t["n"]), max(float(t["n_pred"]), 1.0)
    per_layer = [
        metrics.fvu_from_sums(e, sx, sq, n)
        for e, sx, sq in zip(t["sq_err"], t["sum_x"], t["sum_sq"], strict=True)
    ]
    variance = sum(float(sq) - n * float(np.sum((sx / max(n, 1.0)) ** 2))
                   for sx, sq in zip(t["sum_x"], t["sum_sq"], strict=True))  # fmt: skip
    ce = {k: float(t[k]) / n_pred for k in ("ce_clean", "ce_spliced", "ce_ablated")}
    return {
        "fvu": float(np.sum(t["sq_err"])) / max(variance, 1e-30),
        "fvu_per_layer": [float(v) for v in per_layer],
        "l0": float(t["active"]) / max(n, 1.0),
        **ce,
        "delta_loss": float(metrics.delta_loss(ce["ce_clean"], ce["ce_spliced"])),
        "ce_recovered": float(
            metrics.ce_recovered(ce["ce_clean"], ce["ce_spliced"], ce["ce_ablated"])
        ),
        "kl": float(t["kl"]) / n_pred,
        "n_tokens": int(n),
        "dead_fraction": float(metrics.dead_fraction(t["fired"].astype(np.int32))),
    }
