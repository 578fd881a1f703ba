"""Parameter creation with logical axis names.

Every weight in swiftlm carries logical axis names (`embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `vocab`, ...). train/sharding.py maps those names onto a device mesh, so model code
never mentions devices. Weights are stored in `param_dtype` (f32 master weights) and cast to the
compute dtype where they are used.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *,
          init: str = "normal", stddev: float = 0.02, dtype=jnp.float32) -> nnx.Param:
    """A parameter of `shape` annotated with logical `axes` (one name per dimension)."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    if init == "normal":
        value = stddev * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}; valid: 'normal', 'ones', 'zeros'")
    # eager_sharding=False: the names are metadata only; train/sharding.py decides where each
    # array lives, so the same model builds with or without a mesh.
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)
