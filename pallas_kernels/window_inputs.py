"""Input checks shared by the window-attention entry points (pallas_kernels/window_attention.py
and pallas_kernels/blocked_attention.py): shapes, GQA head counts, static per-head windows,
segment ids, and the default softmax scale. Kept apart so the two entry points, which dispatch
to each other, do not import each other."""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp


def check_inputs(q, k, v, windows, segment_ids=None) -> tuple[int, ...]:
    """Validates shapes and windows; returns the windows as a tuple of Python ints."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("window attention expects q, k, v of shape [batch, time, heads, "
                         f"head_dim]; got q{q.shape}, k{k.shape}, v{v.shape}.")
    b, t, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"k{k.shape} and v{v.shape} must both be [{b}, {t}, Hkv, {d}] to "
                         f"match q{q.shape}.")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    hkv = k.shape[2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"q has {hq} heads, which is not a multiple of the {hkv} kv heads of "
                         "k and v (GQA needs Hkv to divide Hq).")
    if isinstance(windows, jax.Array) or not isinstance(windows, (tuple, list)):
        raise ValueError("windows must be a static tuple of Python ints, one per q head; got "
                         f"{type(windows).__name__} {windows!r}.")
    if len(windows) != hq:
        raise ValueError(f"windows has {len(windows)} entries {tuple(windows)} but q has {hq} "
                         "heads; give one window per q head.")
    out = []
    for h, w in enumerate(windows):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise ValueError(f"windows[{h}]={w!r} is not an int; windows must be static ints.")
        if w < 1:
            raise ValueError(f"windows[{h}]={w} is invalid: a window counts the keys a query "
                             "sees including itself, so it must be >= 1.")
        out.append(int(w))
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (b, t):
            raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected "
                             f"[batch, time] = ({b}, {t}).")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids has dtype {segment_ids.dtype}; expected integers.")
    return tuple(out)


def resolve_scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
