"""Will it fit? Compiling Gemma 3 for a mesh ahead of time, without any weights.

``abstract_model`` builds the model tree with ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape`` on
the builder), ``compile_forward`` / ``compile_decode`` lower and compile the forward pass and one
KV-cached decode step for a mesh with the parameters sharded by ``parallel.rules``, and
``memory_per_device`` reads XLA's ``memory_analysis()`` of the compiled program (bytes per device).
``benchmarks/aot_memory.py`` prints the table for the released sizes.

XLA's CPU backend has no bfloat16 matmul: it converts every bf16 weight to a float32 copy, so a
bf16 program compiled for (simulated) CPU devices needs ~3x its weights. ``chip_estimate`` therefore
counts the bf16 arguments exactly (from their shardings) and takes the scratch space of the same
program compiled with float32 weights: an upper bound for a bf16 TPU/GPU, whose activations are
half that size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from penzai import pz
from penzai.models.transformer.sampling_mode import KVCachingTransformerLM

from gemma_scope_pz.models.config import Gemma3Config, param_shapes
from gemma_scope_pz.models.gemma3 import Gemma3LM
from gemma_scope_pz.parallel.mesh import DATA
from gemma_scope_pz.parallel.rules import DEFAULT_RULES, ShardingRules
from gemma_scope_pz.parallel.shard import shard_abstract

__all__ = [
    "DeviceMemory",
    "abstract_model",
    "argument_bytes",
    "chip_estimate",
    "compile_decode",
    "compile_forward",
    "memory_per_device",
]


def abstract_model(config: Gemma3Config, dtype=jnp.bfloat16) -> Gemma3LM:
    """The frozen model with ``jax.ShapeDtypeStruct`` leaves: shapes and dtypes, no memory."""
    shapes = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in param_shapes(config).items()}
    return jax.eval_shape(
        lambda p: pz.freeze_params(Gemma3LM.from_params(config, p, dtype=dtype)), shapes
    )


def _tokens(mesh: Mesh, batch: int, seq: int) -> jax.ShapeDtypeStruct:
    spec = P(DATA) if batch % mesh.shape[DATA] == 0 else P()
    return jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=NamedSharding(mesh, spec))


def _forward(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    named = pz.nx.wrap(tokens).tag("batch", "seq")
    out = model(named, token_positions=pz.nx.wrap(positions).tag("batch", "seq"))
    return out.unwrap("batch", "seq", "vocabulary")


def compile_forward(
    model: Gemma3LM, mesh: Mesh, batch: int, seq: int, rules: ShardingRules = DEFAULT_RULES
) -> jax.stages.Compiled:
    """The compiled forward pass (logits ``[batch, seq, vocabulary]``) of an abstract model."""
    placed = shard_abstract(model, mesh, rules)
    return jax.jit(_forward).lower(placed, _tokens(mesh, batch, seq)).compile()


def _decode(sampler_def, state, tokens):
    variables = [v.unfreeze_as_copy() for v in state]
    sampler = pz.bind_variables(sampler_def, variables)
    logits = sampler(pz.nx.wrap(tokens).tag("batch", "seq"))
    return logits.unwrap("batch", "seq", "vocabulary"), [v.freeze() for v in variables]


def _abstract_sampler(model, mesh, batch, cache_len, rules=DEFAULT_RULES):
    """(unbound KV-caching sampler, its frozen abstract state), sharded for ``mesh``."""

    def build(m):
        sampler = KVCachingTransformerLM.from_uncached(
            m, cache_len=cache_len, batch_axes={"batch": batch}, pad_id=0
        )
        sampler_def, variables = pz.unbind_state_vars(sampler)
        return sampler_def, [v.freeze() for v in variables]

    return shard_abstract(jax.eval_shape(build, model), mesh, rules)


def compile_decode(
    model: Gemma3LM, mesh: Mesh, batch: int, cache_len: int, rules: ShardingRules = DEFAULT_RULES
) -> jax.stages.Compiled:
    """One decode step (one new token per row) with a ``cache_len`` KV cache sharded like the heads.

    The cache is donated (updated in place), as in a generation loop.
    """

    sampler_def, state = _abstract_sampler(model, mesh, batch, cache_len, rules)
    step = jax.jit(_decode, donate_argnums=(1,))
    return step.lower(sampler_def, state, _tokens(mesh, batch, 1)).compile()


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device needs for a compiled program (XLA's ``memory_analysis``).

    Attributes:
      arguments: Inputs resident on the device (its shards of the parameters, caches, tokens).
      outputs: Results (donated inputs they alias are not counted twice).
      temporaries: Scratch space of the program.
      peak: ``arguments + outputs - aliased + temporaries``.
    """

    arguments: int
    outputs: int
    temporaries: int
    peak: int


def memory_per_device(compiled: jax.stages.Compiled) -> DeviceMemory:
    """The per-device memory of a compiled (SPMD-partitioned) program."""
    stats = compiled.memory_analysis()
    args, outs = stats.argument_size_in_bytes, stats.output_size_in_bytes
    temp, alias = stats.temp_size_in_bytes, stats.alias_size_in_bytes
    return DeviceMemory(args, outs, temp, args + outs - alias + temp)


def argument_bytes(tree: Any) -> int:
    """Bytes one device holds of an abstract tree with shardings (``shard_abstract``'s output)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def chip_estimate(
    config: Gemma3Config, mesh: Mesh, kind: str, batch: int, length: int
) -> DeviceMemory:
    """Per-device memory of the bf16 forward (``kind="forward"``, ``length`` tokens) or decode step
    (``kind="decode"``, a ``length``-token cache) on an accelerator with native bfloat16.

    Arguments: the bf16 parameter shards (+ KV cache, tokens), exact. Outputs and temporaries: from
    the program compiled with float32 weights (outputs halved to bf16; temporaries kept at their
    float32 size, so an upper bound).
    """
    compile_fn = {"forward": compile_forward, "decode": compile_decode}[kind]
    f32 = memory_per_device(compile_fn(abstract_model(config, jnp.float32), mesh, batch, length))
    bf16 = abstract_model(config, jnp.bfloat16)
    if kind == "forward":
        placed = (shard_abstract(bf16, mesh), _tokens(mesh, batch, length))
    else:
        placed = (_abstract_sampler(bf16, mesh, batch, length), _tokens(mesh, batch, 1))
    args = argument_bytes(placed)
    aliased = f32.arguments + f32.outputs + f32.temporaries - f32.peak  # donated KV cache
    outs = (f32.outputs - aliased) // 2
    return DeviceMemory(args, outs, f32.temporaries, args + outs + f32.temporaries)
