"""Which named axis of a parameter or activation is split over which mesh axis.

Penzai names every axis, so the rules are written over names, not positions:

* ``"model"`` (tensor parallelism): attention heads (``"head_groups"`` = key/value heads of
  grouped-query attention, else ``"heads"``, else the query heads of multi-query attention), the
  MLP hidden axis ``"neurons"``, the tied embedding's ``"vocabulary"`` and a dictionary's
  ``"latents"``. One mesh axis can split only one axis of an array, so each array uses the first
  of these names it has (a query weight ``[embedding, head_groups, query_heads, projection]`` is
  split by key/value head, so each device holds whole groups and attention needs no
  communication until the output projection).
* ``"data"`` (data parallelism): ``"batch"`` of activations and token inputs.

Everything else (``"embedding"``, ``"projection"``, norm scales) is replicated.
"""

from __future__ import annotations

import dataclasses

from gemma_scope_pz.parallel.mesh import DATA, MODEL

__all__ = ["DEFAULT_RULES", "ShardingRules"]


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Named-axis to mesh-axis rules.

    Attributes:
      model_axes: Axis names split over ``"model"``, in order of preference; an array uses the
        first one it has.
      data_axes: Axis names split over ``"data"`` (activations and inputs).
    """

    model_axes: tuple[str, ...] = (
        "head_groups",
        "heads",
        "query_heads",
        "neurons",
        "vocabulary",
        "latents",
    )
    data_axes: tuple[str, ...] = ("batch",)

    def axis_map(self, axis_names) -> dict[str, str]:
        """``{array axis name: mesh axis}`` for an array with these axis names."""
        names = tuple(axis_names)
        out = {}
        model = next((a for a in self.model_axes if a in names), None)
        if model is not None:
            out[model] = MODEL
        data = next((a for a in self.data_axes if a in names), None)
        if data is not None:
            out[data] = DATA
        return out


DEFAULT_RULES = ShardingRules()
