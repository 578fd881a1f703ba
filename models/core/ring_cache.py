"""A ring-buffer KV cache for windowed attention, whose memory follows the windows, not the
context length (the decoding cache of MSWA, arXiv 2501.01039).

A query head with window w (kernel convention, models/core/attention.py: w keys including
itself) needs only the w - 1 keys before it. Each kv head therefore keeps a ring of
`need + margin` slots, where `need` is the largest window of the query heads it serves minus
one, and `margin` (gamma_max) keeps enough older entries that speculative decoding can rewind
by up to `margin` tokens. Position p lives in slot p % capacity. kv heads with the same ring
shape share one buffer ("group"), so every array stays regular. A full-attention head (window
None) or a window wider than `max_length` gets a ring of `max_length` slots, which never wraps
while positions stay below `max_length`.

Each slot stores the absolute position it holds. Attention reads slot j of row b only if
0 <= pos[b, j] < lengths[b] and the window admits it, so entries of a rejected draft (past the
row's length) are ignored, never zeroed (a zero key would still add exp(0) to the softmax),
and `rewind` only moves `lengths`.

Rewinding further than the margin would need entries the ring has already overwritten. The
cache tracks per row the smallest length it can still return to (`rewind_floor`); `rewind`
raises a ValueError when its arguments are concrete, and under jit it marks the row invalid
for good (`valid` is False, and MSWA's `extend` returns NaN logits for it) so a misuse can
never pass silently. Staying within the margin is the caller's contract.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models.core.attention import Attention, masked_attention, window_mask

_INVALID = np.iinfo(np.int32).max  # a rewind floor no length can reach: the row is poisoned


def rewound_floor(lengths: jax.Array, current: jax.Array, floor: jax.Array,
                  why: str) -> jax.Array:
    """The rewind floor after rewinding rows from `current` to `lengths` in a cache that keeps
    bounded history. A target below `floor` or above the current length is an error: raised
    here (naming the rows and `why` the history is bounded) when the values are concrete;
    under jit the row's floor is poisoned instead, so its next extend yields NaN logits."""
    if lengths.shape != current.shape:
        raise ValueError(f"rewind lengths have shape {lengths.shape}; expected "
                         f"{current.shape} (one per row)")
    bad = (lengths < floor) | (lengths > current)
    if not any(isinstance(x, jax.core.Tracer) for x in (lengths, current, floor)):
        rows = np.flatnonzero(np.asarray(bad))
        if rows.size:
            valid = [(int(floor[r]), int(current[r])) for r in rows]
            raise ValueError(f"cannot rewind rows {rows.tolist()} to lengths "
                             f"{np.asarray(lengths)[rows].tolist()}: the valid targets are "
                             f"[rewind_floor, length] = {valid}; {why}")
    return jnp.where(bad, _INVALID, floor)


@flax.struct.dataclass
class RingGroup:
    """The ring of some kv heads of one layer that share a capacity and a window need."""
    k: jax.Array    # [B, capacity, n_kv_in_group, head_dim]
    v: jax.Array    # [B, capacity, n_kv_in_group, head_dim]
    pos: jax.Array  # int32 [B, capacity]: absolute position held by each slot, -1 = empty
    kv_heads: tuple[int, ...] = flax.struct.field(pytree_node=False)
    need: int = flax.struct.field(pytree_node=False)  # keys before a query it must keep

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def slack(self) -> int:
        """How far a row can rewind after the ring has wrapped (the margin, or more if the
        ring was capped at max_length)."""
        return self.capacity - self.need

    def write(self, k_new: jax.Array, v_new: jax.Array, positions: jax.Array,
              num_tokens: jax.Array) -> "RingGroup":
        """Stores the last `capacity` of the first num_tokens[b] new entries of each row.

        k_new, v_new [B, S, n, D] at positions [B, S]. Only the newest `capacity` entries can
        survive anyway; skipping the older ones keeps every scatter index distinct, and the
        padding past num_tokens[b] is never stored.
        """
        b, s = positions.shape
        c = self.capacity
        idx = jnp.arange(s, dtype=jnp.int32)[None, :]
        keep = (idx < num_tokens[:, None]) & (idx >= num_tokens[:, None] - c)
        slots = jnp.where(keep, positions % c, c)  # slot c is out of range: the write drops
        rows = jnp.arange(b)[:, None]
        return self.replace(
            k=self.k.at[rows, slots].set(k_new.astype(self.k.dtype), mode="drop"),
            v=self.v.at[rows, slots].set(v_new.astype(self.v.dtype), mode="drop"),
            pos=self.pos.at[rows, slots].set(positions, mode="drop"))


@flax.struct.dataclass
class RingCache:
    layers: tuple[tuple[RingGroup, ...], ...]  # per layer, its groups
    lengths: jax.Array        # int32 [B]: tokens seen per row
    rewind_floor: jax.Array   # int32 [B]: smallest length each row can still rewind to

    @property
    def valid(self) -> jax.Array:
        """bool [B]: False for a row that was rewound past what its rings still hold."""
        return self.lengths >= self.rewind_floor

    def rewind(self, lengths: jax.Array) -> "RingCache":
        """Forget entries at and past lengths[b] (only `lengths` moves; stale slots are
        masked by their stored position). A target below `rewind_floor` or above the current
        length is an error: raised here when the values are concrete, else the row is marked
        invalid (see the module docstring)."""
        lengths = jnp.asarray(lengths, jnp.int32)
        floor = rewound_floor(lengths, self.lengths, self.rewind_floor,
                              "a ring buffer keeps only rewind_margin tokens of history "
                              "beyond the windows")
        return self.replace(lengths=lengths, rewind_floor=floor)

    def advance(self, num_tokens: jax.Array) -> "RingCache":
        """Counts num_tokens[b] new tokens per row (after every group was written) and raises
        each row's rewind floor past the entries the writes overwrote."""
        new_lengths = self.lengths + num_tokens
        floor = self.rewind_floor
        # Writing up to position P overwrote positions < P + 1 - capacity; a row at length L'
        # needs positions >= L' - need, so L' >= (P + 1) - slack. Nothing was overwritten
        # while P + 1 <= capacity.
        shapes = {(g.capacity, g.slack) for layer in self.layers for g in layer}
        for capacity, slack in sorted(shapes):
            floor = jnp.maximum(floor, jnp.where(new_lengths > capacity,
                                                 new_lengths - slack, 0))
        return self.replace(lengths=new_lengths, rewind_floor=floor)


def ring_layout(windows: tuple[int | None, ...], n_kv_heads: int, margin: int,
                max_length: int) -> tuple[tuple[tuple[int, ...], int, int], ...]:
    """Groups the kv heads of one layer by ring shape: ((kv_heads, need, capacity), ...).

    windows: per query head, kernel convention (None = full causal attention).
    """
    per_kv = len(windows) // n_kv_heads
    groups: dict[tuple[int, int], list[int]] = {}
    for kv in range(n_kv_heads):
        served = windows[kv * per_kv:(kv + 1) * per_kv]
        if any(w is None for w in served):
            need, capacity = max_length, max_length
        else:
            capacity = min(max(served) - 1 + margin, max_length)
            need = min(max(served) - 1, capacity)
        # A ring needs at least one slot even for window 1 and margin 0 (nothing is read).
        groups.setdefault((need, max(capacity, 1)), []).append(kv)
    return tuple((tuple(kv), need, capacity) for (need, capacity), kv in groups.items())


def init_layer(windows: tuple[int | None, ...], n_kv_heads: int, head_dim: int, *,
               batch_size: int, max_length: int, margin: int, dtype) -> tuple[RingGroup, ...]:
    """Empty rings for one layer whose query heads have `windows`."""
    out = []
    for kv_heads, need, capacity in ring_layout(windows, n_kv_heads, margin, max_length):
        shape = (batch_size, capacity, len(kv_heads), head_dim)
        out.append(RingGroup(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                             pos=jnp.full((batch_size, capacity), -1, jnp.int32),
                             kv_heads=kv_heads, need=need))
    return tuple(out)


def ring_extend(attn: Attention, x: jax.Array, groups: tuple[RingGroup, ...],
                lengths: jax.Array, num_tokens: jax.Array
                ) -> tuple[jax.Array, tuple[RingGroup, ...]]:
    """Attention of S new tokens x [B, S, d] over each row's rings plus the chunk itself.

    Queries sit at positions lengths[b] + s. Each group's context is its ring (entries before
    the row's length) followed by the chunk's own keys, so a chunk longer than the window (a
    prefill) is handled exactly; the rings are written only after they were read.
    """
    b, s = x.shape[:2]
    positions = lengths[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    q, k, v = attn.project(x, positions)
    per_kv = attn.n_heads // attn.n_kv_heads
    outs, head_order, new_groups = [], [], []
    for group in groups:
        kv_heads = list(group.kv_heads)
        # The query heads of each kv head, kv head by kv head: the layout masked_attention
        # expects for grouped-query attention.
        q_heads = [kv * per_kv + j for kv in kv_heads for j in range(per_kv)]
        k_g = jnp.take(k, np.asarray(kv_heads), axis=2)
        v_g = jnp.take(v, np.asarray(kv_heads), axis=2)
        ctx_k = jnp.concatenate([group.k.astype(k.dtype), k_g], axis=1)
        ctx_v = jnp.concatenate([group.v.astype(v.dtype), v_g], axis=1)
        ctx_pos = jnp.concatenate([group.pos, positions], axis=1)
        in_ring = (group.pos >= 0) & (group.pos < lengths[:, None])
        ctx_ok = jnp.concatenate([in_ring, jnp.ones((b, s), bool)], axis=1)
        mask = window_mask(positions, ctx_pos, [attn.windows[h] for h in q_heads])
        mask &= ctx_ok[:, None, None, :]
        outs.append(masked_attention(jnp.take(q, np.asarray(q_heads), axis=2),
                                     ctx_k, ctx_v, mask))
        head_order += q_heads
        new_groups.append(group.write(k_g, v_g, positions, num_tokens))
    out = jnp.concatenate(outs, axis=2)
    out = jnp.take(out, np.argsort(np.asarray(head_order)), axis=2)  # back to head order
    return attn.output(out), tuple(new_groups)
