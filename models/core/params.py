"""Parameter creation with logical axis names.

Every weight in swiftlm carries logical axis names (`embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `vocab`, ...). train/sharding.py maps those names onto a device mesh, so model code
never mentions devices. Weights are stored in `param_dtype` (f32 master weights) and cast to the
compute dtype where they are used.

Non-trainable state that a model updates in its own training forward (a loss-free router bias,
a forward-pass counter for a capacity schedule) is a `TrainingState` variable: the trainer
carries it from step to step and checkpoints it, and neither gradients nor the optimizer see it.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _init_key(rngs: nnx.Rngs) -> jax.Array:
    """The next `params` key, re-wrapped for the "rbg" bit generator.

    Drawing initial weights with threefry makes XLA compile a long hash graph for every
    parameter shape (a 2-layer model took ~20 s to build on CPU); rbg is one RngBitGenerator
    op per draw and builds several times faster. The stream stays a deterministic function
    of the Rngs seed, which is all initialisation needs.
    """
    data = jax.random.key_data(rngs.params())
    if data.shape == (2,):  # threefry keys hold 2 words, rbg keys 4
        data = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])
    return jax.random.wrap_key_data(data, impl="rbg")


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *,
          init: str = "normal", stddev: float = 0.02, dtype=jnp.float32) -> nnx.Param:
    """A parameter of `shape` annotated with logical `axes` (one name per dimension)."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    if init == "normal":
        value = stddev * jax.random.truncated_normal(_init_key(rngs), -2.0, 2.0, shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}; valid: 'normal', 'ones', 'zeros'")
    # eager_sharding=False: the names are metadata only; train/sharding.py decides where each
    # array lives, so the same model builds with or without a mesh.
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class TrainingState(nnx.Variable):
    """Model state the training forward updates outside the gradient (see the module
    docstring). Update it only from stop-gradient values, and only while the module is in
    training mode (`deterministic` False); `model.eval()` freezes it for inference."""
