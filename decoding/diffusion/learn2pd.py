"""Learn2PD's learned parallel-decoding filter (arXiv 2509.25188; ims-kdks/Learning-to-Parallel-
Decoding @342293c `llada/generate.py` generate_learn2parallel, `llada/generate_training_data.py`,
spec decoding.md section 4.6): "learn2pd".

The filter f: R^BL -> R^BL reads the confidences (softmax probability of the argmax) of the
current block's BL positions, committed ones included as in the official code, and gives one
logit per position: "this position's current prediction is already the final token". A step
commits the baseline's top-k (one token per step by default, so >= 1 token always commits) and
every masked block position with sigmoid(f) > filter_threshold (0.96).

The filter is trained post hoc on the diffusion model's own confidences (learn2pd_train.py).
The official architecture file is unavailable (a ~2K-parameter MLP per the paper's summary,
class `LogisticRegression(input_dim=32)`); here it is one hidden layer of GELU units.

Weights travel inside the sampler as tuples (the sampler is a hashable jit static argument),
saved and loaded as .npz (DiffusionSamplerConfig.learn2pd_filter names the file).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from decoding.diffusion import remasking

PARAMS = ("w1", "b1", "w2", "b2")


def _tuples(a: np.ndarray):
    return tuple(map(_tuples, a)) if a.ndim > 1 else tuple(float(x) for x in a)


@dataclasses.dataclass(frozen=True)
class Filter:
    """The filter's weights as nested tuples (hashable): w1 [BL, H], b1 [H], w2 [H, BL],
    b2 [BL]."""
    w1: tuple
    b1: tuple
    w2: tuple
    b2: tuple

    @classmethod
    def from_params(cls, params: dict) -> "Filter":
        return cls(**{k: _tuples(np.asarray(params[k], np.float32)) for k in PARAMS})

    @property
    def block_length(self) -> int:
        return len(self.b2)

    def params(self) -> dict[str, jax.Array]:
        return {k: jnp.asarray(getattr(self, k), jnp.float32) for k in PARAMS}


def filter_logits(params: dict, conf_block: jax.Array) -> jax.Array:
    """f32[..., BL]: the filter's logit per block position."""
    h = jax.nn.gelu(conf_block @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def block_confidences(conf: jax.Array, block_start: jax.Array, block_length: int
                      ) -> tuple[jax.Array, jax.Array]:
    """(conf f32[B, BL] of each row's current block, its buffer positions int32[B, BL]);
    positions past the buffer read confidence 0."""
    length = conf.shape[1]
    pos = block_start[:, None] + jnp.arange(block_length, dtype=jnp.int32)[None, :]
    got = jnp.take_along_axis(conf, jnp.minimum(pos, length - 1), axis=1)
    return jnp.where(pos < length, got, 0.0), pos


def accept(filt: Filter, conf: jax.Array, block_start: jax.Array, candidates: jax.Array,
           threshold: float) -> jax.Array:
    """bool[B, L]: the candidates the filter accepts (sigmoid(f) > threshold)."""
    block_length = filt.block_length
    conf_block, _ = block_confidences(conf, block_start, block_length)
    ok = jax.nn.sigmoid(filter_logits(filt.params(), conf_block)) > threshold  # [B, BL]
    offset = jnp.arange(conf.shape[1], dtype=jnp.int32)[None, :] - block_start[:, None]
    inside = (offset >= 0) & (offset < block_length)
    return candidates & inside & jnp.take_along_axis(
        ok, jnp.clip(offset, 0, block_length - 1), axis=1)


def learn2pd_commit(filt: Filter, conf: jax.Array, block_start: jax.Array,
                    candidates: jax.Array, k: jax.Array, threshold: float) -> jax.Array:
    """bool[B, L]: the top-k schedule's commits plus the filter's (>= 1 token per row)."""
    return (remasking.topk_commit(conf, candidates, k)
            | accept(filt, conf, block_start, candidates, threshold))


def save_filter(path: str, filt: Filter) -> None:
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in filt.params().items()})


def load_filter(path: str) -> Filter:
    """The filter saved at path (cached per file version)."""
    try:
        return _load(path, os.path.getmtime(path))
    except OSError as e:
        raise ValueError(f"learn2pd_filter={path!r} is not a filter file (.npz with "
                         f"{PARAMS}; train one with decoding.diffusion.learn2pd_train, "
                         f"e.g. by experiments.bench.diffusion): {e}") from None


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> Filter:
    del mtime  # part of the cache key only
    try:
        with np.load(path) as f:
            params = {k: f[k] for k in PARAMS}
    except (OSError, KeyError) as e:
        raise ValueError(f"learn2pd_filter={path!r} is not a filter file (.npz with "
                         f"{PARAMS}; train one with decoding.diffusion.learn2pd_train, "
                         f"e.g. by experiments.bench.diffusion): {e}") from None
    return Filter.from_params(params)
