"""Double Sparsity decode attention in the model (Yang et al. 2024, arXiv 2408.07092).

`decode_attention="double_sparse"` (a TransformerConfig field) makes `extend` attend, per query
and KV-head group, only to the top-k cached tokens ranked by *label scores* (q and the keys
restricted to r calibrated "outlier" channels), with an exact softmax over those tokens and all
channels. The kernels and the GQA semantics are in pallas_kernels/double_sparse.py; this file
holds what the model keeps and decides:

- The **label cache**: `LabeledKV` is a LayerKV with `label[B, L, Hkv, r]` beside the keys
  (the keys' calibrated channels, after RoPE), in the cache dtype, or 8- or 4-bit integers
  (int8 storage) with one scale per (token, head) (`label_scale[B, L, Hkv]`). `extend` writes
  the labels of every new token (prefill, decode, speculative drafts/verification) at the same
  positions as the keys, so `rewind` (which only moves lengths) rewinds them too: stale labels
  past a row's length are masked exactly like stale keys and overwritten later.
- **Which tokens**: per KV-head group (`ds_selection="kv_group"`, the default: the group's G
  query heads share one token set, ranked by the max of their label scores) or per query head
  (`"query_head"`, the official code's semantics). A query that sees `ctx` keys keeps
  `ceil(ctx * token_sparsity)` of them,
  or all of them while `ctx <= min_context` (dense below a minimum context, as DoubleSparse
  decodes densely while pos < heavy_const). Each query selects over its own causal prefix, so
  a multi-token verification computes exactly what the same tokens decoded one by one would,
  and speculative decoding stays lossless against the double-sparse target.
- **Dense first layers**: the first `dense_layers` layers (DoubleSparse's evaluation code,
  `evaluation/modify_llama.py`, keeps layers 0 and 1 dense: `if self.layer_idx < 2:
  flash_forward`) attend densely and keep no labels; `set_channels` turns them back to dense.
- **Prefill**: an extend of more than `MAX_SPARSE_QUERIES` tokens is a prompt; it writes labels
  and attends densely (DoubleSparse applies sparsity at decode only).

The channels come from offline calibration (models/double_sparse_calibration.py) and are
attached with `set_channels`; decoding without them raises an error saying what to run.
"""
from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from models.core.kv_cache import LayerKV
from pallas_kernels.double_sparse import (LABEL_BITS, SELECT_PER, double_sparse_attention,
                                          make_labels, quantize_labels)

DECODE_ATTENTIONS = ("dense", "double_sparse")
MAX_SPARSE_QUERIES = 64  # longer extends are prefills: attended densely
CALIBRATE_HINT = ("run `python -m experiments.calibrate_double_sparsity --workdir=DIR` (or "
                  "--pretrained=smollm2) and load the result with "
                  "models.double_sparse_calibration.load_channels")


@dataclasses.dataclass(frozen=True)
class DoubleSparseSettings:
    """What a double-sparse attention layer needs besides its channels (static)."""
    label_channels: int       # r
    token_sparsity: float     # fraction of the context each query attends
    min_context: int          # contexts up to this many keys are attended densely
    label_bits: int           # 16: labels in the cache dtype; 8 or 4: integers + per-token scale
    dense_layers: int         # the first this many layers decode densely (DoubleSparse: 2)
    select_per: str = "kv_group"  # one token set per KV-head group, or per query head


def check_decode_attention(value: str) -> str:
    if value not in DECODE_ATTENTIONS:
        raise ValueError(f"unknown decode_attention {value!r}; valid: {DECODE_ATTENTIONS}")
    return value


def settings_from_config(config) -> DoubleSparseSettings | None:
    """The settings of a TransformerConfig (None for dense decoding); checks the values."""
    check_decode_attention(config.decode_attention)
    if config.decode_attention != "double_sparse":
        return None
    d = config.resolved_head_dim
    r = config.ds_label_channels if config.ds_label_channels is not None else max(1, d // 16)
    if not 1 <= r <= d:
        raise ValueError(f"ds_label_channels={r} must be in [1, head_dim={d}]")
    if not 0.0 < config.ds_token_sparsity <= 1.0:
        raise ValueError(f"ds_token_sparsity={config.ds_token_sparsity} must be in (0, 1] "
                         "(the fraction of the context each query attends)")
    if config.ds_min_context < 1:
        raise ValueError(f"ds_min_context={config.ds_min_context} must be at least 1")
    if config.ds_label_bits not in LABEL_BITS:
        raise ValueError(f"ds_label_bits={config.ds_label_bits!r}; valid: {LABEL_BITS}")
    if not 0 <= config.ds_dense_layers < config.n_layers:
        raise ValueError(f"ds_dense_layers={config.ds_dense_layers} must be in [0, n_layers="
                         f"{config.n_layers}) (the first layers decode densely; at least one "
                         "layer must be double-sparse)")
    if config.ds_selection not in SELECT_PER:
        raise ValueError(f"ds_selection={config.ds_selection!r}; valid: {SELECT_PER} (one "
                         "token set per KV-head group, or per query head as DoubleSparse)")
    if config.window is not None:
        raise ValueError(f"decode_attention='double_sparse' needs full attention; got "
                         f"window={config.window}")
    return DoubleSparseSettings(r, float(config.ds_token_sparsity), int(config.ds_min_context),
                                int(config.ds_label_bits), int(config.ds_dense_layers),
                                config.ds_selection)


# --------------------------------------------------------------------------------------------
# The label cache
# --------------------------------------------------------------------------------------------
@flax.struct.dataclass
class LabeledKV(LayerKV):
    label: jax.Array               # [B, max_length, kv_heads, r]: cache dtype, or int8
    label_scale: jax.Array | None  # [B, max_length, kv_heads] f32 for integer labels, else None

    @classmethod
    def from_layer(cls, kv: LayerKV, settings: DoubleSparseSettings) -> "LabeledKV":
        b, length, hkv, _ = kv.k.shape
        shape = (b, length, hkv, settings.label_channels)
        if settings.label_bits < 16:
            return cls(k=kv.k, v=kv.v, label=jnp.zeros(shape, jnp.int8),
                       label_scale=jnp.zeros(shape[:3], jnp.float32))
        return cls(k=kv.k, v=kv.v, label=jnp.zeros(shape, kv.k.dtype), label_scale=None)

    def write_labels(self, k_new: jax.Array, channels: jax.Array, positions: jax.Array,
                     bits: int = 16) -> "LabeledKV":
        """Writes the labels of new keys k_new [B, S, Hkv, D] at positions [B, S] (integer
        labels of `bits` bits when the cache holds scales)."""
        labels = make_labels(k_new, channels)
        rows = jnp.arange(k_new.shape[0])[:, None]
        if self.label_scale is None:
            return self.replace(label=self.label.at[rows, positions].set(
                labels.astype(self.label.dtype), mode="drop"))
        q, scale = quantize_labels(labels, bits)
        return self.replace(label=self.label.at[rows, positions].set(q, mode="drop"),
                            label_scale=self.label_scale.at[rows, positions].set(
                                scale, mode="drop"))


def with_label_caches(layers, settings: DoubleSparseSettings | None):
    """init_cache helper: the layers' caches with label caches added (unchanged if dense, and
    for the first settings.dense_layers layers, which decode densely)."""
    if settings is None:
        return layers
    return tuple(kv if i < settings.dense_layers else LabeledKV.from_layer(kv, settings)
                 for i, kv in enumerate(layers))


def set_channels(model, channels) -> None:
    """Attaches calibrated channels [n_layers, n_kv_heads, >= r] (the first r are used) to
    every attention layer of `model` (static ints: a change recompiles, a decode step does
    not). The first `dense_layers` layers are turned back to dense attention."""
    blocks = list(model.blocks)
    if len(channels) != len(blocks):
        raise ValueError(f"got channels for {len(channels)} layers; the model has {len(blocks)}")
    for layer, block in enumerate(blocks):
        attn = block.attn
        settings = attn.double_sparse
        if settings is None:
            raise ValueError("set_channels needs a model built with "
                             "decode_attention='double_sparse'")
        rows = [list(map(int, row)) for row in channels[layer]]
        if len(rows) != attn.n_kv_heads or any(len(r) < settings.label_channels for r in rows):
            raise ValueError(f"layer {layer}: channels of shape ({len(rows)}, "
                             f"{len(rows[0]) if rows else 0}) do not give r="
                             f"{settings.label_channels} channels for each of the "
                             f"{attn.n_kv_heads} kv heads")
        if any(not 0 <= c < attn.head_dim for row in rows for c in row):
            raise ValueError(f"layer {layer}: a channel id is outside [0, {attn.head_dim})")
        attn.ds_channels = tuple(tuple(row[:settings.label_channels]) for row in rows)
        if layer < settings.dense_layers:  # no labels in its cache (with_label_caches)
            attn.double_sparse = None


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def token_budget(n: int, settings: DoubleSparseSettings) -> int:
    """Static top_k for a cache prefix of n slots: covers every query it may serve."""
    return min(n, max(math.ceil(n * settings.token_sparsity), settings.min_context))


def extend_attention(attn, q, k_new, kv: LabeledKV, positions, dense_attend, sizes):
    """The double-sparse part of Attention.extend, after the keys were written.

    q [B, S, Hq, D] (rotated); k_new [B, S, Hkv, D]; positions [B, S]. dense_attend(n) is the
    layer's own dense attention over the first n cache slots, and sizes the static prefixes it
    chooses from. Returns (out [B, S, Hq, D], kv); out is None for a prefill (attend densely).
    """
    settings = attn.double_sparse
    if attn.ds_channels is None:
        raise ValueError("decode_attention='double_sparse' has no calibrated label channels; "
                         + CALIBRATE_HINT)
    channels = jnp.asarray(attn.ds_channels, jnp.int32)
    kv = kv.write_labels(k_new, channels, positions, settings.label_bits)
    if q.shape[1] > MAX_SPARSE_QUERIES:  # a prompt: dense, like DoubleSparse's prefill
        return None, kv
    ctx = positions + 1  # query s sees cache slots [0, positions[b, s]]
    budget = jnp.ceil(ctx.astype(jnp.float32) * settings.token_sparsity).astype(jnp.int32)
    num_selected = jnp.where(ctx <= settings.min_context, ctx, jnp.maximum(budget, 1))

    def attend(n: int):
        if n <= settings.min_context:
            return dense_attend(n)
        return double_sparse_attention(
            q, kv.k[:, :n].astype(q.dtype), kv.v[:, :n].astype(q.dtype), kv.label[:, :n],
            channels, ctx, top_k=token_budget(n, settings), num_selected=num_selected,
            label_scale=None if kv.label_scale is None else kv.label_scale[:, :n],
            select_per=settings.select_per)

    needed = jnp.max(positions) + 1
    branch = jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < needed)
    return jax.lax.switch(branch, [lambda n=n: attend(n) for n in sizes]), kv
