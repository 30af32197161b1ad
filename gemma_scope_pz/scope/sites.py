"""Named sites of Gemma 3 ("blocks.9.resid_post") and how to attach layers to them.

A site is a point in the residual computation where Gemma Scope 2 dictionaries were trained:

==============  ==============================================================  ==================
kind            activation                                                      width
==============  ==============================================================  ==================
resid_pre       input of block L (the embedding output for L = 0)               d_model
resid_post      output of block L                                               d_model
attn_out        input of the attention output projection, heads concatenated    n_heads × head_dim
mlp_in          output of the pre-FFN RMSNorm (scale included)                  d_model
mlp_out         output of the post-FFN RMSNorm, before the residual add         d_model
==============  ==============================================================  ==================

A layer attached at a site sees a named array with axes ("batch", "seq", "embedding") and whatever it
returns replaces the activation. At ``attn_out`` the heads are flattened (heads-major) into "embedding"
and unflattened afterwards, so one SAE class serves every site.
"""

from __future__ import annotations

import dataclasses
import re

from penzai import pz
from penzai.models.transformer.model_parts import TransformerBlock

from gemma_scope_pz.models.config import Gemma3Config

SITE_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out")
# ASCII digits without leading zeros, and nothing after the kind (``$`` would accept a final "\n").
_SITE_RE = re.compile(r"blocks\.(0|[1-9][0-9]*)\.([a-z_]+)", re.ASCII)


@dataclasses.dataclass(frozen=True, order=True)
class Site:
    """A parsed site name.

    Attributes:
      layer: Decoder block index.
      kind: One of ``SITE_KINDS``.
    """

    layer: int
    kind: str

    @classmethod
    def parse(cls, name: str | Site) -> Site:
        if isinstance(name, Site):
            return name
        match = _SITE_RE.fullmatch(name) if isinstance(name, str) else None
        if not match or match.group(2) not in SITE_KINDS:
            raise ValueError(
                f"Unknown site {name!r}: expected 'blocks.<layer>.<kind>' with kind in {SITE_KINDS}"
            )
        return cls(int(match.group(1)), match.group(2))

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name

    def width(self, config: Gemma3Config) -> int:
        return config.attn_width if self.kind == "attn_out" else config.d_model

    def check(self, config: Gemma3Config) -> None:
        if not 0 <= self.layer < config.n_layers:
            raise ValueError(f"Site {self.name}: the model has blocks 0..{config.n_layers - 1}")

    @property
    def last_block(self) -> int:
        """The last block whose computation the site depends on (-1: the embedding)."""
        return self.layer - 1 if self.kind == "resid_pre" else self.layer


@pz.pytree_dataclass
class FlattenHeads(pz.nn.Layer):
    """Presents per-head activations as one "embedding" axis to ``inner`` and restores the heads.

    Attributes:
      inner: Layer applied to the flattened activation.
      head_axes: Names of the head axes in flattening order (outermost first).
    """

    inner: pz.nn.Layer
    head_axes: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
        axes = (*self.head_axes, "projection")
        sizes = [x.named_shape[a] for a in axes]
        flat = pz.nx.nmap(lambda v: v.reshape(-1))(x.untag(*axes)).tag("embedding")
        out = self.inner(flat, **side_inputs)
        return pz.nx.nmap(lambda v: v.reshape(sizes))(out.untag("embedding")).tag(*axes)


def _block_selection(model: pz.nn.Layer, layer: int) -> pz.Selection:
    return pz.select(model).at_instances_of(TransformerBlock).pick_nth_selected(layer)


def _group(selection: pz.Selection, name: str) -> pz.Selection:
    return selection.at_instances_of(pz.nn.NamedGroup).where(lambda g: g.name == name)


def attach(model: pz.nn.Layer, site: str | Site, layer: pz.nn.Layer) -> pz.nn.Layer:
    """Returns a copy of ``model`` with ``layer`` applied to the activation at ``site``."""
    site = Site.parse(site)
    config: Gemma3Config | None = getattr(model, "config", None)
    if config is not None:
        site.check(config)
    block = _block_selection(model, site.layer)
    if site.kind == "resid_pre" and block.count() == 0:
        # A body truncated before this block (``truncate_after_block``): resid_pre is what the
        # truncated body returns, including layers attached after the previous block.
        previous_ok = site.layer == 0 or _block_selection(model, site.layer - 1).count() == 1
        if previous_ok and isinstance(model, pz.nn.Sequential):
            return pz.nn.Sequential([*model.sublayers, layer])
    if block.count() != 1:
        raise ValueError(f"Site {site.name}: the model has no decoder block {site.layer}")
    if site.kind == "resid_pre":
        return block.insert_before(layer)
    if site.kind == "resid_post":
        return block.insert_after(layer)
    if site.kind == "mlp_in":
        return _group(block, "pre_ffw_norm").insert_after(layer)
    if site.kind == "mlp_out":
        return _group(block, "post_ffw_norm").insert_after(layer)
    # attn_out: in front of the output projection, with the head axes flattened.
    linear = _group(block, "attention_output").at_instances_of(pz.nn.Linear)
    heads = tuple(a for a in linear.get().in_axis_names if a != "projection")
    return linear.insert_before(FlattenHeads(inner=layer, head_axes=heads))


def truncate_after_block(model: pz.nn.Layer, last_block: int) -> pz.nn.Layer:
    """The model's body up to and including block ``last_block`` (no final norm or unembedding).

    Layers attached between block ``last_block`` and the next block (a splice or steering vector
    at its ``resid_post``) are kept, so the truncated body returns ``blocks.{last_block + 1}``'s
    ``resid_pre`` as the full model computes it. Works on a ``Gemma3LM`` (its body is returned)
    or on a body ``Sequential``.
    """
    body = getattr(model, "body", model)
    kept, seen = [], -1
    for sub in body.sublayers:
        if isinstance(sub, TransformerBlock):
            if seen == last_block:
                break
            seen += 1
        elif isinstance(sub, pz.nn.EmbeddingDecode) or (
            isinstance(sub, pz.nn.NamedGroup) and sub.name == "final_norm"
        ):
            break
        kept.append(sub)
    if last_block >= 0 and seen != last_block:
        raise ValueError(f"Cannot stop after block {last_block}: the model has {seen + 1} blocks")
    return pz.nn.Sequential(kept)
