"""Causal sliding-window attention with one window per head: API, reference, custom_vjp.

Multi-scale window attention (MSWA, arXiv 2501.01039) gives each head (and layer) its own
window so that some heads see far and others near. Query i of head h sees key j iff
``i - w_h < j <= i``: ``w_h`` keys including itself (``w_h >= T`` is plain causal attention).
Packed documents add ``segment_ids``: attention never crosses a document boundary.

Three implementations behind one function:

- ``reference``: dense masked softmax in f32 (:func:`window_attention_reference`), the oracle
  every other implementation is tested against. Cost O(T^2) whatever the windows.
- ``xla_blocked``: pure jnp, queries in blocks that each gather only the key blocks inside the
  window (``blocked_attention.py``); cost O(T * w). The CPU workhorse.
- ``pallas``: flash attention (FlashAttention, arXiv 2205.14135; FlashAttention-2, arXiv
  2307.08691) that visits only the kv blocks intersecting each q block's window, forward and
  backward, tied together here with ``jax.custom_vjp``. Two kernel styles, chosen by
  ``jax.default_backend()`` at trace time: Triton (``window_attention_gpu.py``) and Mosaic TPU
  with scalar-prefetched block tables (``window_attention_tpu.py``). On CPU either style runs
  in interpret mode.

Layout everywhere: q [B, T, Hq, D]; k, v [B, T, Hkv, D] with Hkv dividing Hq (GQA: q head h
uses kv head h // (Hq // Hkv)); output [B, T, Hq, D] in q's dtype, softmax accumulated in f32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _compat
from pallas_kernels.window_inputs import check_inputs, resolve_scale  # noqa: F401 (API)
from pallas_kernels import window_attention_gpu
from pallas_kernels import window_attention_tpu

IMPLS = ("auto", "reference", "xla_blocked", "pallas")
_KERNELS = {"gpu": window_attention_gpu, "tpu": window_attention_tpu}


# --------------------------------------------------------------------------------------------
# Input checks shared by every implementation.
# --------------------------------------------------------------------------------------------
def window_mask(t: int, windows, segment_ids=None):
    """Boolean visibility [B or 1, H, T, T]: causal, within each head's window, same segment."""
    i = lax.broadcasted_iota(jnp.int32, (1, 1, t, t), 2)
    j = lax.broadcasted_iota(jnp.int32, (1, 1, t, t), 3)
    w = jnp.asarray([min(w, t) for w in windows], jnp.int32)[None, :, None, None]
    mask = (j <= i) & (j > i - w)
    if segment_ids is not None:
        mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return mask


def window_attention_reference(q, k, v, windows, *, segment_ids=None, scale=None):
    """Dense masked attention computed in f32; the oracle for every other implementation."""
    windows = check_inputs(q, k, v, windows, segment_ids)
    t, hq, d = q.shape[1:]
    g = hq // k.shape[2]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    kf, vf = (jnp.repeat(f32(x), g, axis=2) for x in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", f32(q), kf) * resolve_scale(scale, d)
    s = jnp.where(window_mask(t, windows, segment_ids), s, -jnp.inf)  # every row sees itself
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vf).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Pallas path: custom_vjp around the forward and backward kernels.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    """Everything static about one Pallas call (a nondiff argument of the custom_vjp)."""
    backend: str  # kernel style: "gpu" (Triton) or "tpu" (Mosaic)
    windows: tuple[int, ...]
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: Any

    def kwargs(self, backward: bool = False) -> dict:
        return dict(windows=self.windows, scale=self.scale, interpret=self.interpret,
                    block_q=self.block_q_bwd if backward else self.block_q,
                    block_k=self.block_k_bwd if backward else self.block_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _pallas_attention(q, k, v, segment_ids, cfg: _KernelConfig):
    return _KERNELS[cfg.backend].forward(q, k, v, segment_ids, **cfg.kwargs())[0]


def _pallas_attention_fwd(q, k, v, segment_ids, cfg):
    out, lse = _KERNELS[cfg.backend].forward(q, k, v, segment_ids, **cfg.kwargs())
    return out, (q, k, v, segment_ids, out, lse)


def _pallas_attention_bwd(cfg, residuals, do):
    q, k, v, segment_ids, out, lse = residuals
    dq, dk, dv = _KERNELS[cfg.backend].backward(q, k, v, segment_ids, out, lse, do,
                                                **cfg.kwargs(backward=True))
    return dq, dk, dv, None  # segment ids are integers: no cotangent


_pallas_attention.defvjp(_pallas_attention_fwd, _pallas_attention_bwd)


def default_blocks(backend: str, t: int) -> tuple[int, int, int, int]:
    """(block_q, block_k, block_q_bwd, block_k_bwd) when the caller gives none.

    GPU follows jax's Triton flash attention: 128 forward, smaller backward tiles (which hold
    more live accumulators). TPU uses splash attention's default 128. Neither is tuned on
    hardware yet (kernels.md §3a "Blocking").
    """
    if backend == "gpu":
        fwd = min(128, max(_compat.TRITON_MIN_DOT_DIM, _next_power_of_2(t)))
        return fwd, fwd, min(64, fwd), min(64, fwd)
    fwd = min(128, -(-t // _compat.TPU_SUBLANES) * _compat.TPU_SUBLANES)
    return fwd, fwd, fwd, fwd


def _next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def check_block_sizes(backend: str, **blocks: int) -> None:
    """Rejects tiles the backend's compiler cannot lower (named in the error)."""
    check = {"gpu": _compat.check_triton_block_size, "tpu": _compat.check_tpu_block_size}
    for name, value in blocks.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name}={value!r} must be a positive int.")
        check[backend](name, int(value))


def _pad_time(x, t_pad: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, t_pad - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def _pallas(q, k, v, windows, segment_ids, scale, block_q, block_k, interpret, backend):
    interpret, backend = _compat.resolve_style(interpret, backend,
                                               "impl='reference' / 'xla_blocked'")
    t = q.shape[1]
    bq, bk, bq_bwd, bk_bwd = default_blocks(backend, t)
    if block_q is not None:
        bq = bq_bwd = block_q
    if block_k is not None:
        bk = bk_bwd = block_k
    check_block_sizes(backend, block_q=bq, block_k=bk, block_q_bwd=bq_bwd, block_k_bwd=bk_bwd)
    # Causality makes right-padding of the sequence exact: no real query sees a padded key, and
    # padded queries get a zero cotangent, so they add nothing to dk/dv.
    step = math.lcm(bq, bk, bq_bwd, bk_bwd)
    t_pad = -(-t // step) * step
    if t_pad != t:
        q, k, v = (_pad_time(x, t_pad) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = _pad_time(segment_ids, t_pad, value=-1)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    cfg = _KernelConfig(backend=backend, windows=tuple(min(w, t_pad) for w in windows),
                        scale=scale, block_q=bq, block_k=bk, block_q_bwd=bq_bwd,
                        block_k_bwd=bk_bwd, interpret=interpret)
    return _pallas_attention(q, k, v, segment_ids, cfg)[:, :t]


def window_attention(q, k, v, windows, *, segment_ids=None, scale=None, impl="auto",
                     block_q=None, block_k=None, interpret=None, backend=None):
    """Causal attention where q head h sees the last ``windows[h]`` keys (itself included).

    Args:
      q: [B, T, Hq, D]. k, v: [B, T, Hkv, D], Hkv dividing Hq.
      windows: static tuple of ints >= 1, one per q head; w >= T means plain causal.
      segment_ids: optional int [B, T]; attention stays within equal ids (packed documents).
      scale: softmax scale, default 1/sqrt(D).
      impl: "auto" (pallas on GPU/TPU, reference on CPU unless ``interpret`` is set),
        "reference" (dense), "xla_blocked" (pure jnp, O(T*w)), "pallas".
      block_q, block_k: Pallas tiles (forward and backward); for "xla_blocked" the query block
        (block_q, else block_k). Default per backend; T is padded to a multiple of the tiles.
      interpret: run the Pallas kernel in interpret mode (True or ``pltpu.InterpretParams``);
        default: only on CPU.
      backend: Pallas kernel style, "gpu" (Triton) or "tpu" (Mosaic); default
        ``jax.default_backend()`` ("gpu" on CPU). Other styles need interpret mode.

    Returns:
      [B, T, Hq, D] in q's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"Unknown impl {impl!r}; valid: {IMPLS}.")
    windows = check_inputs(q, k, v, windows, segment_ids)
    if impl == "auto":
        on_device = jax.default_backend() in _compat.BACKENDS
        impl = "pallas" if on_device or interpret else "reference"
    if impl == "reference":
        return window_attention_reference(q, k, v, windows, segment_ids=segment_ids,
                                          scale=scale)
    if impl == "xla_blocked":
        # Imported here: only this path needs the blocked implementation.
        from pallas_kernels.blocked_attention import blocked_window_attention
        return blocked_window_attention(q, k, v, windows, segment_ids=segment_ids, scale=scale,
                                        block=block_q if block_q is not None else block_k)
    return _pallas(q, k, v, windows, segment_ids, resolve_scale(scale, q.shape[-1]), block_q,
                   block_k, interpret, backend)
