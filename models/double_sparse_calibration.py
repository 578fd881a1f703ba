"""Offline channel calibration for Double Sparsity (Yang et al. 2024, arXiv 2408.07092).

Double Sparsity's label cache keeps r of each key's D channels. Which r is decided once, offline,
as DoubleSparse's ``config/offline_calibration.py`` does with its "qk" ranking: run calibration
text through the model and, per layer and head, average |q * k| channel by channel *after RoPE*
with every token attending to itself ("Method 1"); the channels with the largest mean carry
most of q.k. Here a ranking is per **KV head** (the label cache is per KV head): the mean over
the G query heads of the group. (The Hugging Face rotate-half layout needs no permutation: this
codebase's RoPE uses the same layout.)

A calibration file stores the full ranking [n_layers, n_kv_heads, head_dim] (a model built with
any r takes the first r), the architecture it was computed on and its hash. Loading it onto a
model of another architecture is an error, as is double-sparse decoding without one.

    ranking = calibrate(model, token_rows)              # [L, Hkv, D] channel ids, best first
    save_calibration(path, model, ranking, source=...)
    ds_model = with_double_sparse(model, path, ds_token_sparsity=1/8)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.core import double_sparse

FORMAT_VERSION = 1
FILENAME = "double_sparse_channels.json"  # in a workdir, beside the checkpoints
_ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "rope_theta",
                "tie_embeddings")


def architecture(config) -> dict[str, Any]:
    """The config fields a calibration depends on (not decoding or compute settings)."""
    arch = {name: getattr(config, name) for name in _ARCH_FIELDS}
    arch.update(head_dim=config.resolved_head_dim, mlp_dim=config.resolved_mlp_dim)
    return arch


def architecture_hash(config) -> str:
    canonical = json.dumps(architecture(config), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def calibration_path(workdir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(workdir), FILENAME)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------
@nnx.jit
def _layer_stats(model, tokens):
    """Sum over tokens of |q * k| per (layer, kv head, channel), after RoPE: [L, Hkv, D]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = model.embed(tokens)
    stats = []
    for block in model.blocks:
        q, k, _ = block.attn.project(block.attn_norm(x), positions)
        b, t, hq, d = q.shape
        hkv = k.shape[2]
        qk = jnp.abs(q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32)
                     * k.astype(jnp.float32)[:, :, :, None, :])
        stats.append(qk.mean(axis=3).sum(axis=(0, 1)))
        x = block(x, positions)
    return jnp.stack(stats)


def calibrate(model, token_rows: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Channel ranking [n_layers, n_kv_heads, head_dim] (best first) from rows of token ids,
    each row one forward pass (all rows the same length: one compilation)."""
    rows = np.asarray(token_rows, np.int32)
    if rows.ndim != 2 or rows.size == 0:
        raise ValueError(f"calibration needs token rows [N, T]; got shape {rows.shape}")
    total = None
    for row in rows:
        s = np.asarray(_layer_stats(model, jnp.asarray(row[None])))
        total = s if total is None else total + s
    # Stable descending sort: ties keep the lower channel first (deterministic files).
    return np.argsort(-total, axis=-1, kind="stable").astype(np.int32)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def save_calibration(path: str | os.PathLike, model, ranking: np.ndarray, *,
                     source: str = "", num_tokens: int = 0) -> str:
    config = model.config
    expected = (config.n_layers, config.n_kv_heads, config.resolved_head_dim)
    if tuple(ranking.shape) != expected:
        raise ValueError(f"ranking of shape {tuple(ranking.shape)}; the model needs {expected}")
    payload = {"format_version": FORMAT_VERSION, "method": "qk (mean |q*k| after RoPE)",
               "architecture": architecture(config), "architecture_hash":
                   architecture_hash(config), "source": source, "num_tokens": int(num_tokens),
               "ranking": np.asarray(ranking).tolist()}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)  # never leave a half-written file behind
    return path


def load_ranking(path: str | os.PathLike, config) -> np.ndarray:
    """The ranking in `path` (a file or a workdir), checked against `config`'s architecture."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = calibration_path(path)
    if not os.path.exists(path):
        raise ValueError(f"no Double Sparsity calibration at {path!r}; "
                         + double_sparse.CALIBRATE_HINT)
    with open(path) as f:
        payload = json.load(f)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"calibration {path!r} has format_version "
                         f"{payload.get('format_version')!r}, expected {FORMAT_VERSION}; "
                         "recalibrate: " + double_sparse.CALIBRATE_HINT)
    ours = architecture_hash(config)
    if payload.get("architecture_hash") != ours:
        theirs = payload.get("architecture", {})
        diff = ", ".join(f"{k}={theirs.get(k)!r} (file) vs {v!r} (model)"
                         for k, v in architecture(config).items() if theirs.get(k) != v)
        raise ValueError(f"calibration {path!r} is for another model (architecture hash "
                         f"{payload.get('architecture_hash')} vs {ours}: {diff}); "
                         + double_sparse.CALIBRATE_HINT)
    return np.asarray(payload["ranking"], np.int32)


def with_double_sparse(model, calibration: str | os.PathLike | np.ndarray, **settings):
    """A double-sparse copy of `model` (sharing its weights) with calibrated channels attached.

    calibration: a calibration file, a workdir holding one, or a ranking array.
    settings: TransformerConfig overrides (ds_token_sparsity, ds_label_channels,
    ds_min_context, ds_label_bits, ds_dense_layers, ds_selection).
    """
    config = dataclasses.replace(model.config, decode_attention="double_sparse", **settings)
    ranking = (np.asarray(calibration, np.int32) if isinstance(calibration, np.ndarray)
               else load_ranking(calibration, config))
    abstract = nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    new = nnx.merge(graphdef, nnx.state(model))
    double_sparse.set_channels(new, ranking)
    return new


def load_channels(model, calibration: str | os.PathLike) -> None:
    """Attaches a calibration file's channels to a model built with
    decode_attention='double_sparse'."""
    double_sparse.set_channels(model, load_ranking(calibration, model.config))


__all__ = ["architecture_hash", "calibrate", "calibration_path", "load_channels",
           "load_ranking", "save_calibration", "with_double_sparse"]
