"""Expert dispatch: computing sum_j w_tj * SwiGLU_{e_tj}(x_t) for N tokens routed to k of E
SwiGLU experts (Shazeer et al. 2017, arXiv 1701.06538; Lepikhin et al. 2020, arXiv 2006.16668).

Three interchangeable implementations, selected by name:

  ragged    dropless. Sort the N*k token-slots by expert and run each expert's matmul on its
            contiguous group with `jax.lax.ragged_dot` (grouped GEMM). Work grows with k on
            backends with a native grouped GEMM (TPU, recent GPUs); on XLA:CPU (jax 0.10)
            ragged_dot lowers to E masked dense matmuls, i.e. the dense reference's cost.
  capacity  GShard/Switch capacity-factor dispatch. Each expert takes at most
            C = ceil(capacity_factor * N * k / E) slots (first choices before second choices,
            earlier tokens first); overflow is dropped (contributes zero) and reported. The
            expert matmuls are one batched [E, C, d] x [E, d, h] GEMM: work grows with k.
            Dropping uses the whole batch, so in training a token's output can depend on
            later tokens when its expert overflows; `dropless=True` (decoding) sets C = N.
  dense     every expert on every token, combined with the (mostly zero) gate matrix: the
            reference the others are tested against; work grows with E.

Expert weights are [E, d, h] (gate, up) and [E, h, d] (down).
"""
import math

import jax
import jax.numpy as jnp

DISPATCHES = ("ragged", "capacity", "dense")


def check_dispatch(dispatch: str) -> str:
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown MoE dispatch {dispatch!r}; valid: {DISPATCHES}")
    return dispatch


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(cf * N * k / E), at most N (an expert sees a token once)."""
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def _swiglu(x, gate, up, down, matmul):
    return matmul(jax.nn.silu(matmul(x, gate)) * matmul(x, up), down)


def dense(x, weights, experts, gate, up, down):
    """All E experts on all N tokens, [N, d] -> [N, d]; returns (out, dropped fraction 0)."""
    num_experts = gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)
                      * weights[..., None], axis=1)                          # [N, E]
    h = jax.nn.silu(jnp.einsum("nd,edh->neh", x, gate)) * jnp.einsum("nd,edh->neh", x, up)
    y = jnp.einsum("neh,ehd->ned", h, down)
    out = jnp.einsum("ned,ne->nd", y.astype(jnp.float32), combine)
    return out.astype(x.dtype), jnp.zeros((), jnp.float32)


def ragged(x, weights, experts, gate, up, down):
    """Sort-based grouped GEMM; dropless. Returns (out [N, d], dropped fraction 0)."""
    n, k = experts.shape
    num_experts = gate.shape[0]
    flat = experts.reshape(-1)                                    # slot s = token * k + j
    order = jnp.argsort(flat, stable=True)                        # slots grouped by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)                          # [N*k, d]

    def matmul(a, w):
        return jax.lax.ragged_dot(a, w.astype(a.dtype), group_sizes)

    ys = _swiglu(xs, gate, up, down, matmul)                      # [N*k, d], expert order
    # Gather back to slot order (inverse permutation): deterministic, unlike a scatter-add.
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y = jnp.take(ys, inverse, axis=0).reshape(n, k, -1).astype(jnp.float32)
    out = jnp.einsum("nkd,nk->nd", y, weights)
    return out.astype(x.dtype), jnp.zeros((), jnp.float32)


def capacity_limited(x, weights, experts, gate, up, down, *, capacity_factor: float,
                     dropless: bool = False, mask=None):
    """Capacity-factor dispatch. Returns (out [N, d], fraction of real token-slots dropped)."""
    n, k = experts.shape
    num_experts, d = gate.shape[0], x.shape[-1]
    cap = n if dropless else capacity(n, num_experts, k, capacity_factor)
    # Slot-major order (all first choices, then all second choices) gives first choices
    # priority for capacity, as in GShard and Switch.
    flat = experts.T.reshape(-1)                                  # [k*N]
    token = jnp.tile(jnp.arange(n, dtype=jnp.int32), k)
    onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)   # [k*N, E]
    real = jnp.ones((k * n,), bool) if mask is None else jnp.tile(mask.astype(bool), k)
    onehot = onehot * real[:, None]        # padding tokens take no capacity (and get zero)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    keep = (position < cap) & real
    slot = jnp.where(keep, flat * cap + position, num_experts * cap)
    # Which token fills each [E, C] slot; empty slots point at an extra zero row.
    filled = jnp.full((num_experts * cap,), n, jnp.int32).at[slot].set(token, mode="drop")
    xe = jnp.take(jnp.concatenate([x, jnp.zeros((1, d), x.dtype)]), filled, axis=0)
    xe = xe.reshape(num_experts, cap, d)

    def matmul(a, w):
        return jnp.einsum("ecd,edh->ech", a, w.astype(a.dtype))

    ye = _swiglu(xe, gate, up, down, matmul).reshape(num_experts * cap, d)
    ys = jnp.take(ye, jnp.minimum(slot, num_experts * cap - 1), axis=0)
    ys = jnp.where(keep[:, None], ys, 0).reshape(k, n, d).astype(jnp.float32)
    out = jnp.einsum("knd,nk->nd", ys, weights)
    dropped = jnp.sum(real & ~keep) / jnp.maximum(jnp.sum(real), 1)
    return out.astype(x.dtype), dropped.astype(jnp.float32)
