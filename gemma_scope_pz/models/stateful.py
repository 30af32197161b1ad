"""Running models that hold ``pz.StateVariable``s (the Penzai tutorial idiom) through jitted runners.

A model edited the tutorial's way, e.g. with penzai's ``SaveIntermediate`` inserted after a block,
holds mutable ``pz.StateVariable``s, which ``jax.jit`` cannot take as arguments. The runners
(``forward``, ``capture``, ``evaluate_sae``, ``top_features``, ``generate``) therefore jit with
penzai's own `pz.variable_jit`: it unbinds the variables, passes their frozen values through the
compiled function and writes the new values back, so a state variable ends up holding what a direct
``model(...)`` call would have left in it. This module holds what the runners need for that:

* `jit`: the runners' ``jax.jit``; it takes the `pz.variable_jit` path only when an argument holds
  a variable (that path costs one more walk over the model per call, ~60 ms on 18 blocks); the
  plain path passes a model's leaves, flattened once per model (`flat`), so a call does not walk
  the model's tree (~10 ms on the 270M: as long as a small batch's forward on a GPU);
* `has_variables` / `state_variables`: whether a tree holds variables, and its state variables;
* `detach_state`: a copy whose state variables are fresh copies, for the *derived* models a runner
  builds internally (spliced, ablated, KV-cached), so that only the model the user passed writes to
  the user's variables;
* `frozen`: ``pz.freeze_params`` of a model, remembered with `per_model`;
* `per_model`: a value derived from a model (its KV-caching sampler, its state variables), built once
  and reused while the model lives and its parameters hold the same arrays, so that repeated calls
  do not walk the model's tree again (each walk costs tens of milliseconds on the 270M).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import itertools
import weakref
from collections.abc import Callable, Hashable
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

    Calls with plain pytrees run the ``jax.jit`` version, every argument passed by keyword and
    flattened (a penzai tree's leaves remembered per tree: `flat`); calls whose arguments hold
    variables run `pz.variable_jit`, which threads the variables' values through and writes them
    back. Use ``static_argnames`` (not ``static_argnums``) for static arguments.
    """
    if set(jit_kwargs) - {"static_argnames"}:  # the flattened plain path honours only these
        raise TypeError(f"stateful.jit takes only static_argnames, got {sorted(jit_kwargs)}")
    static = frozenset(jit_kwargs.get("static_argnames", ()))
    names = _keyword_names(fun)
    with_variables = pz.variable_jit(fun, **jit_kwargs)

    def flat_fun(structures, leaves, static_items):
        parts = [
            jax.tree_util.tree_unflatten(d, x) for (_, d), x in zip(structures, leaves, strict=True)
        ]
        dynamic = dict(zip((name for name, _ in structures), parts, strict=True))
        return fun(**dynamic, **dict(static_items))

    # The plain path takes every argument flattened, a Penzai model's leaves remembered per model
    # (`flat`): jax.jit would walk the model's tree again on every call (~10 ms on the 270M).
    plain = jax.jit(flat_fun, static_argnums=(0, 2))

    @functools.wraps(fun)
    def call(*args, **kwargs):
        facts = [mesh_and_variables(arg) for arg in (*args, *kwargs.values())]
        if len({id(mesh) for mesh, _ in facts if mesh is not None}) > 1:
            mesh_of((args, kwargs))  # sharded over two meshes: its clear error, not a reshard
        if any(held for _, held in facts) or names is None or len(args) > len(names):
            return with_variables(*args, **kwargs)
        kwargs = {**dict(zip(names, args)), **kwargs}
        static_items = tuple(sorted((k, v) for k, v in kwargs.items() if k in static))
        parts = {k: flat(v) for k, v in kwargs.items() if k not in static}
        structures = tuple((k, structure) for k, (_, structure) in parts.items())
        return plain(structures, [leaves for leaves, _ in parts.values()], static_items)

    return call


def _keyword_names(fun: Callable) -> tuple[str, ...] | None:
    """The parameter names of ``fun`` when every one can be passed by keyword, else None."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(fun).parameters.values()
    if any(p.kind not in kinds for p in parameters):
        return None
    return tuple(p.name for p in parameters)


def flat(tree: Any) -> tuple[list[Any], Any]:
    """``jax.tree_util.tree_flatten(tree)``, for a penzai tree (a frozen model, a dictionary)
    remembered with `per_model`."""
    if not isinstance(tree, pz.Struct):
        return jax.tree_util.tree_flatten(tree)
    return per_model(tree, "flat", lambda: jax.tree_util.tree_flatten(tree))


def mesh_and_variables(tree: Any) -> tuple[Any, bool]:
    """``(mesh_of(tree), has_variables(tree))``; for a penzai tree without variables (a frozen
    model, the runners' usual argument) remembered with `per_model`, since each walk of the 270M
    costs ~25 ms and the runners ask on every call."""

    def build():
        return mesh_of(tree), has_variables(tree)

    if not isinstance(tree, pz.Struct):
        return build()
    return per_model(tree, "mesh_and_variables", build, remember=lambda facts: not facts[1])


def model_mesh(model: Any) -> Any:
    """The mesh ``model`` is sharded over, or None (`mesh_and_variables` of its `frozen` copy,
    which holds the same arrays and, unlike the model, no parameter variables)."""
    return mesh_and_variables(frozen(model))[0]


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


@dataclasses.dataclass
class _Derived:
    """What `per_model` remembers of one model.

    Attributes:
      parameters: The model's mutable parameters with the array each held when the entry was made;
        a parameter holding another array since then invalidates every value.
      values: Built values by key, least recently used first.
    """

    parameters: list[tuple[pz.Parameter, Any]]
    values: collections.OrderedDict


_DERIVED: dict[int, _Derived] = {}


def per_model(
    model: Any,
    key: Hashable,
    build: Callable[[], Any],
    *,
    keep: int = 8,
    remember: Callable[[Any], bool] | None = None,
) -> Any:
    """``build()``, remembered for ``(model, key)`` while ``model`` lives and its parameters keep
    their values (``keep`` keys per model, least recently used dropped; a value for which
    ``remember`` says False is returned but not kept, e.g. one holding too much memory).

    A model is an immutable tree, so what is derived from its structure stays valid; only a
    ``pz.Parameter`` can be given a new value in place, and that is checked on every call (one
    identity test per parameter). An object that cannot be weakly referenced is never remembered.
    """
    entry = _DERIVED.get(id(model))
    if entry is None:
        try:
            weakref.finalize(model, _DERIVED.pop, id(model), None)
        except TypeError:
            return build()
        params = [
            leaf for leaf in jax.tree_util.tree_leaves(model) if isinstance(leaf, pz.Parameter)
        ]
        entry = _DERIVED[id(model)] = _Derived(
            [(p, p.value) for p in params], collections.OrderedDict()
        )
    elif any(param.value is not value for param, value in entry.parameters):
        entry.parameters = [(param, param.value) for param, _ in entry.parameters]
        entry.values = collections.OrderedDict()
    if key in entry.values:
        entry.values.move_to_end(key)
        return entry.values[key]
    value = build()
    if remember is not None and not remember(value):
        return value
    entry.values[key] = value
    while len(entry.values) > keep:
        entry.values.popitem(last=False)
    return value


def frozen(model: Any) -> Any:
    """``pz.freeze_params(model)``, remembered per model (`per_model`): the runners call it on
    every call, and the walk costs ~60 ms on the 270M (most of a small batch's time)."""
    return per_model(model, "frozen", lambda: pz.freeze_params(model))


def model_state_variables(model: Any) -> tuple[pz.StateVariable, ...]:
    """`state_variables` of a model, remembered per model (`per_model`)."""
    return per_model(model, "state_variables", lambda: state_variables(model))
