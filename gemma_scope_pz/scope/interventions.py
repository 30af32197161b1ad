"""Capture, splice, steer, clamp and ablate: layers that attach at sites, and jitted runners.

Every intervention is an ordinary Penzai layer inserted with ``sites.attach``; the returned model is
still a ``Gemma3LM`` and runs through ``models.gemma3.forward`` or ``models.sampling.generate``
(KV cache included). Position 0 (BOS) is never modified: the layers read the "token_positions" side
input, which the forward pass and the KV-caching sampler both provide.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer.model_parts import TransformerBlock, TransformerFeedForward
from penzai.toolshed.save_intermediates import SaveIntermediate

from gemma_scope_pz.models import stateful
from gemma_scope_pz.models.gemma3 import Gemma3LM, check_token_ids, positions_for, vocab_size_of
from gemma_scope_pz.models.inputs import as_token_batch
from gemma_scope_pz.models.stateful import (
    frozen,
    model_mesh,
    model_state_variables,
    per_model,
    state_variables,
)
from gemma_scope_pz.parallel.shard import batch_on_mesh
from gemma_scope_pz.scope.crosscoder import Crosscoder
from gemma_scope_pz.scope.formats.hook_names import check_model_family
from gemma_scope_pz.scope.sites import Site, attach, truncate_after_block


def _not_bos(x: pz.nx.NamedArray, side_inputs: dict) -> pz.nx.NamedArray:
    """Boolean named array, False at position 0 (BOS) and at padding (position -1)."""
    positions = side_inputs["token_positions"]
    return positions > 0


def _keep_bos(new: pz.nx.NamedArray, old: pz.nx.NamedArray, side_inputs: dict) -> pz.nx.NamedArray:
    keep_new = _not_bos(old, side_inputs)
    return pz.nx.nmap(jnp.where)(keep_new, new.astype(old.dtype), old)


def __getattr__(name: str):
    if name == "SaveActivation":  # deprecated alias, one release
        warnings.warn(
            "SaveActivation is penzai's SaveIntermediate: import it from "
            "penzai.toolshed.save_intermediates",
            DeprecationWarning,
            stacklevel=2,
        )
        return SaveIntermediate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@pz.pytree_dataclass
class SpliceSAE(pz.nn.Layer):
    """Replaces an activation by an SAE's reconstruction (BOS left untouched).

    With ``include_error`` the SAE's error term ``x - sae(x)`` is added back, so the output equals the
    input exactly unless latents are edited. Latent edits set ``latents[edit_ids] = edit_values``
    before decoding (clamping; a value of 0 ablates).

    Attributes:
      sae: An ``AutoEncoder`` (anything with ``encode``/``decode``/``skip_connection`` on
        "embedding"/"latents").
      include_error: Whether to add back the reconstruction error.
      edit_ids: Int array of latent indices to overwrite, or None.
      edit_values: Float array of the values written there.
    """

    sae: pz.nn.Layer
    include_error: bool = dataclasses.field(default=False, metadata={"pytree_node": False})
    edit_ids: jax.Array | None = None
    edit_values: jax.Array | None = None

    def reconstruct(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
        latents = self.sae.encode(x)
        # A skip transcoder's output is decode(encode(x)) + x @ W_skip (zero without a skip).
        skip = self.sae.skip_connection(x)
        x_hat = self.sae.decode(latents) + skip
        if self.edit_ids is None:
            return x_hat + (x - x_hat) if self.include_error else x_hat
        edited = pz.nx.nmap(lambda f: f.at[self.edit_ids].set(self.edit_values.astype(f.dtype)))(
            latents.untag("latents")
        ).tag("latents")
        x_edit = self.sae.decode(edited) + skip
        return x_edit + (x - x_hat) if self.include_error else x_edit

    def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
        compute_x = x.astype(jnp.float32)
        return _keep_bos(self.reconstruct(compute_x), x, side_inputs)


@pz.pytree_dataclass
class ReplaceMLP(pz.nn.Layer):
    """Replaces a block's MLP (+ post-FFN norm) by a transcoder mapping mlp_in → mlp_out.

    Attributes:
      transcoder: ``AutoEncoderSkip`` (or ``AutoEncoder``) taking mlp_in and predicting mlp_out.
      original: The replaced ``[TransformerFeedForward, post_ffw_norm]`` sequence, used for the error.
      include_error: Add back ``original(x) - transcoder(x)``.
      edit_ids: Latent indices to overwrite, or None.
      edit_values: Values written there.
    """

    transcoder: pz.nn.Layer
    original: pz.nn.Layer
    include_error: bool = dataclasses.field(default=False, metadata={"pytree_node": False})
    edit_ids: jax.Array | None = None
    edit_values: jax.Array | None = None

    def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
        exact = self.original(x, **side_inputs)
        splice = SpliceSAE(self.transcoder, False, self.edit_ids, self.edit_values)
        out = splice.reconstruct(x.astype(jnp.float32))
        if self.include_error:
            out = out + (exact.astype(jnp.float32) - self.transcoder(x.astype(jnp.float32)))
        return _keep_bos(out, exact, side_inputs)


@pz.pytree_dataclass
class AddVector(pz.nn.Layer):
    """Steering: adds ``coeff * d`` (or ``coeff * ||x|| * d`` when norm-scaled) after BOS.

    Attributes:
      direction: Unit vector over "embedding".
      coeff: Steering strength (a traced scalar, so sweeping it does not recompile).
      norm_scaled: Scale by the per-token norm of the activation, as in the Gemma Scope 2 tutorial.
    """

    direction: pz.nx.NamedArray
    coeff: jax.Array
    norm_scaled: bool = dataclasses.field(default=True, metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
        xf = x.astype(jnp.float32)
        scale = self.coeff
        if self.norm_scaled:
            scale = scale * pz.nx.nmap(jnp.linalg.norm)(xf.untag("embedding"))
        return _keep_bos(xf + scale * self.direction, x, side_inputs)


# ---------------------------------------------------------------------------------------------
# Model transformations


def splice(
    model: Gemma3LM,
    sae: pz.nn.Layer,
    site: str | None = None,
    *,
    include_error: bool = False,
    clamp: dict[int, float] | None = None,
) -> Gemma3LM:
    """A copy of ``model`` whose activation at ``site`` goes through ``sae``.

    ``site`` defaults to ``sae.meta.site_in``. For a transcoder (``site_in`` an ``mlp_in`` site and
    ``site_out`` the matching ``mlp_out``) the block's MLP is replaced. ``clamp`` maps latent index →
    value (0 ablates); with ``include_error`` everything not edited stays exact.
    """
    if isinstance(sae, Crosscoder):
        raise TypeError(
            "splice takes a one-site dictionary; a Crosscoder spans several layers: use "
            "scope.multisite.crosscoder_logits or evaluate_crosscoder"
        )
    meta = getattr(sae, "meta", None)
    site = Site.parse(site or (meta.site_in if meta else None) or _missing_site())
    ids = vals = None
    if clamp:
        d_sae = getattr(meta, "d_sae", None)
        bad = [i for i in clamp if not 0 <= int(i) < (d_sae if d_sae is not None else int(i) + 1)]
        if bad:
            raise ValueError(f"clamp: latent indices {bad} are outside 0..{d_sae}-1 of this SAE")
        values = np.asarray(list(clamp.values()), dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"clamp: values must be finite, got {dict(clamp)}")
        ids = jnp.asarray(list(clamp.keys()), dtype=jnp.int32)
        vals = jnp.asarray(values, dtype=jnp.float32)
    _check_width(model, sae, site)
    site_out = getattr(meta, "site_out", None) if meta else None
    if site.kind == "mlp_in" and site_out and Site.parse(site_out).kind == "mlp_out":
        if Site.parse(site_out).layer != Site.parse(meta.site_in or site).layer:
            raise ValueError(
                f"Transcoder {meta.site_in} -> {site_out} spans blocks; splice replaces one MLP"
            )
        return _replace_mlp(model, sae, site.layer, include_error, ids, vals)
    return attach(model, site, SpliceSAE(sae, include_error, ids, vals))


def _missing_site():
    raise ValueError("No site given and the SAE's meta names none; pass site='blocks.L.kind'")


def _check_width(model: Gemma3LM, sae: pz.nn.Layer, site: Site) -> None:
    meta = getattr(sae, "meta", None)
    config = getattr(model, "config", None)
    if meta is not None and config is not None:
        sae_model = (meta.extra or {}).get("model_name")
        check_model_family(sae_model, config, f"SAE {meta.source or site.name}")
    if meta is not None and config is not None and meta.d_in != site.width(config):
        raise ValueError(
            f"SAE d_in={meta.d_in} does not match site {site.name} of width {site.width(config)}"
        )


def _replace_mlp(model, transcoder, layer, include_error, ids, vals) -> Gemma3LM:
    def rewrite(branch: pz.nn.Sequential) -> pz.nn.Sequential:
        # [pre_ffw_norm, (mlp_in layers), FFW, post_ffw_norm, (mlp_out layers)]: the FFW and the
        # post-FFN norm move into the ReplaceMLP; layers attached at mlp_in / mlp_out stay around it.
        post_norm = _named_group(branch, "post_ffw_norm")
        branch = post_norm.remove_from_parent()
        return (
            pz.select(branch)
            .at_instances_of(TransformerFeedForward)
            .apply(
                lambda ffw: ReplaceMLP(
                    transcoder, pz.nn.Sequential([ffw, post_norm.get()]), include_error, ids, vals
                )
            )
        )

    selection = (
        pz.select(model)
        .at_instances_of(TransformerBlock)
        .pick_nth_selected(layer)
        .at_instances_of(pz.nn.Residual)
        .where(lambda r: any(isinstance(x, TransformerFeedForward) for x in r.delta.sublayers))
        .at(lambda r: r.delta)
    )
    if selection.count() != 1:
        raise ValueError(f"Could not find the MLP branch of block {layer} to replace")
    return selection.apply(rewrite)


def _named_group(tree: pz.nn.Layer, name: str) -> pz.Selection:
    selection = pz.select(tree).at_instances_of(pz.nn.NamedGroup).where(lambda g: g.name == name)
    if selection.count() != 1:
        raise ValueError(f"expected one NamedGroup {name!r}, found {selection.count()}")
    return selection


def steer(
    model: Gemma3LM,
    site: str,
    direction,
    coeff: float,
    *,
    norm_scaled: bool = True,
) -> Gemma3LM:
    """A copy of ``model`` that adds a steering vector at ``site`` (BOS untouched).

    ``direction`` is normalised to unit length. ``coeff = 0`` computes the same function (logits agree
    to float rounding; XLA may fuse the modified program differently).
    """
    if not np.isfinite(coeff):
        raise ValueError(f"Steering coeff must be finite, got {coeff}")
    d = jnp.asarray(direction, dtype=jnp.float32)
    norm = jnp.linalg.norm(d)
    if d.ndim == 1 and not bool(jnp.isfinite(d).all()):
        raise ValueError(f"Steering direction has non-finite entries (shape {d.shape})")
    if d.ndim != 1 or not bool(norm > 0):
        raise ValueError(f"Steering direction must be a nonzero vector, got shape {d.shape}")
    config = getattr(model, "config", None)
    if config is not None and d.shape[0] != Site.parse(site).width(config):
        raise ValueError(
            f"Steering direction has width {d.shape[0]} but site {Site.parse(site).name} has width "
            f"{Site.parse(site).width(config)}"
        )
    layer = AddVector(
        pz.nx.wrap(d / norm).tag("embedding"), jnp.asarray(coeff, jnp.float32), norm_scaled
    )
    return attach(model, site, layer)


# ---------------------------------------------------------------------------------------------
# Capture


def run_with_captures(
    model: Gemma3LM,
    tokens: jax.Array,
    positions: jax.Array,
    site_names: Sequence[str],
    stop_early: bool,
) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """Traceable core of ``capture``: (logits or None when stopped early, {site: activation}).

    ``model`` must have frozen parameters (``pz.freeze_params``); call inside ``jax.jit``.
    """
    sites = [Site.parse(s) for s in site_names]
    body = model.body
    if stop_early:
        body = truncate_after_block(body, max(s.last_block for s in sites))
    stores = {}
    for site in sites:
        stores[site.name] = pz.StateVariable(value=None, label=f"capture/{site.name}")
        body = attach(body, site, SaveIntermediate(stores[site.name]))
    named_tokens = pz.nx.wrap(tokens).tag("batch", "seq")
    out = body(named_tokens, token_positions=pz.nx.wrap(positions).tag("batch", "seq"))
    logits = None if stop_early else out.unwrap("batch", "seq", "vocabulary")
    return logits, {
        name: var.value.unwrap("batch", "seq", "embedding") for name, var in stores.items()
    }


# stateful.jit: the model may hold state variables of its own (see models/stateful.py). Not
# penzai's Jitted wrapper: it jits a layer's __call__, while capture needs static site names.
@functools.partial(stateful.jit, static_argnames=("site_names", "stop_early"))
def _capture(model, tokens, positions, site_names: tuple[str, ...], stop_early: bool):
    return run_with_captures(model, tokens, positions, site_names, stop_early)[1]


def capture(
    model: Gemma3LM,
    tokens,
    sites: str | Sequence[str],
    *,
    pad_id: int | None = None,
    stop_early: bool = True,
) -> dict[str, jax.Array]:
    """Activations [batch, seq, width] at one or many sites from ONE jitted forward pass.

    The forward stops after the last block any site needs unless ``stop_early=False``. ``pad_id``
    as in ``models.gemma3.forward`` (left padding masked out).

    On a model that already has layers attached (steering, splicing), the value recorded at a site
    is the one entering those layers, i.e. before the intervention at that same site; capture the
    next site (e.g. ``blocks.{L+1}.resid_pre`` for ``blocks.{L}.resid_post``) to see its effect.
    """
    names = (sites,) if isinstance(sites, str) else tuple(sites)
    if not names:
        raise ValueError("capture needs at least one site")
    parsed = [Site.parse(s) for s in names]
    config = getattr(model, "config", None)
    if config is not None:
        for s in parsed:
            s.check(config)
    tokens, _ = as_token_batch(tokens, model)  # text, ids, ragged lists or [batch, seq]
    tokens = batch_on_mesh(
        jnp.asarray(check_token_ids(tokens, vocab_size_of(model))), model_mesh(model)
    )
    positions = positions_for(tokens, pad_id)
    unique = tuple(dict.fromkeys(s.name for s in parsed))
    if stop_early and _truncation_drops_state(model, max(s.last_block for s in parsed)):
        stop_early = False  # run the layers holding state variables, as a direct call does
    out = _capture(frozen(model), tokens, positions, unique, stop_early)
    return {name: out[Site.parse(name).name] for name in names}


def _truncation_drops_state(model: Gemma3LM, last_block: int) -> bool:
    """Whether stopping after ``last_block`` would skip a layer holding a state variable."""
    held = model_state_variables(model)
    if not held:
        return False
    return per_model(
        model,
        ("truncation_drops_state", last_block),
        lambda: len(state_variables(truncate_after_block(model, last_block))) < len(held),
    )
