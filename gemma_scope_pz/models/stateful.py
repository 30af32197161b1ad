"""Running models that hold ``pz.StateVariable``s (the Penzai tutorial idiom) through jitted runners.

A model edited the tutorial's way, e.g. with penzai's ``SaveIntermediate`` inserted after a block,
holds mutable ``pz.StateVariable``s, which ``jax.jit`` cannot take as arguments. The runners
(``forward``, ``capture``, ``evaluate_sae``, ``top_features``, ``generate``) therefore jit with
penzai's own `pz.variable_jit`: it unbinds the variables, passes their frozen values through the
compiled function and writes the new values back, so a state variable ends up holding what a direct
``model(...)`` call would have left in it. This module holds what the runners need for that:

* `jit`: the runners' ``jax.jit``; it takes the `pz.variable_jit` path only when an argument holds
  a variable (that path costs one more walk over the model per call, ~60 ms on 18 blocks);
* `has_variables` / `state_variables`: whether a tree holds variables, and its state variables;
* `detach_state`: a copy whose state variables are fresh copies, for the *derived* models a runner
  builds internally (spliced, ablated, KV-cached), so that only the model the user passed writes to
  the user's variables.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
from penzai import pz

from gemma_scope_pz.parallel.shard import mesh_of

_COPIES = itertools.count()


def has_variables(tree: Any) -> bool:
    """Whether ``tree`` holds a penzai variable (a ``pz.StateVariable`` or an unfrozen parameter)."""
    return any(isinstance(leaf, pz.AbstractVariable) for leaf in jax.tree_util.tree_leaves(tree))


def jit(fun: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fun, **jit_kwargs)`` that also accepts arguments holding variables.

    Calls with plain pytrees run the ``jax.jit`` version; calls whose arguments hold variables run
    `pz.variable_jit`, which threads the variables' values through and writes them back.
    Use ``static_argnames`` (not ``static_argnums``) for static arguments.
    """
    plain = jax.jit(fun, **jit_kwargs)
    with_variables = pz.variable_jit(fun, **jit_kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        mesh_of((args, kwargs))  # arrays sharded over two meshes: a clear error, not a reshard
        if has_variables((args, kwargs)):
            return with_variables(*args, **kwargs)
        return plain(*args, **kwargs)

    return call


def state_variables(tree: Any) -> tuple[pz.StateVariable, ...]:
    """The distinct mutable ``pz.StateVariable``s held in ``tree`` (empty for a plain model)."""
    _, variables = pz.unbind_state_vars(tree)
    return tuple(variables)


def detach_state(tree: Any) -> Any:
    """A copy of ``tree`` whose state variables are new variables with the same values.

    Running the copy leaves the original variables untouched. A variable shared by several layers
    stays shared in the copy; labels get a unique suffix so both trees can enter one jitted call.
    """
    if not state_variables(tree):
        return tree
    suffix = f"detached{next(_COPIES)}"
    copies: dict[int, pz.StateVariable] = {}

    def copy(var: pz.StateVariable) -> pz.StateVariable:
        if id(var) not in copies:
            copies[id(var)] = pz.StateVariable(value=var.value, label=f"{var.label}:{suffix}")
        return copies[id(var)]

    return pz.select(tree).at_instances_of(pz.StateVariable).apply(copy)
