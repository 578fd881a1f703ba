"""The decoding cache of Mixture-of-Recursions (arXiv 2507.10524), used by models/mor.py.

  ends        the unique first and last layers' plain KV caches (middle-* sharing), indexed
              by position like the Transformer's.
  depth_kv    [N_r][K] per-recursion caches of the unrolled shared layers.
                recursion-wise caching: recursion r's caches hold only the tokens that reached
                  recursion r, appended in order: row b's slot i holds the token at position
                  depth_pos[r][b, i]; depth_count[r][b] slots are valid. Rows therefore hold
                  different numbers of entries at different depths, and attention masks by
                  (slot < count) & (key position <= query position).
                recursive KV sharing: only recursion 1's caches exist (every token computes
                  recursion 1's K/V); deeper recursions' queries read them. Indexed by
                  position, like `ends`.
  lengths     tokens held per row.
  routed      int32 [N_r]: tokens that went through each recursion (the decode-time depth
              histogram), and overflow int32 [N_r]: tokens a full decode capacity forced to
              exit before that recursion (models/mor.py, depth-wise batching).

Rewind never zeroes anything (a zero key still takes softmax mass). For a positional cache it
only moves `lengths`. Positions are increasing along the slots of a row, so rewinding a
per-depth cache to length n is a recount: the slots holding positions < n stay valid, and
the others are overwritten by the next tokens that reach that depth. History is never
dropped, so rewinding is unbounded (no rewind_margin).
"""
import flax.struct
import jax
import jax.numpy as jnp

from models.core.kv_cache import LayerKV


@flax.struct.dataclass
class MoRCache:
    ends: tuple[LayerKV, ...]                  # () or (first, last)
    depth_kv: tuple[tuple[LayerKV, ...], ...]  # [N_r or 1][K]
    depth_pos: tuple[jax.Array, ...]           # [N_r] int32 [B, max_length] (recursion-wise)
    depth_count: tuple[jax.Array, ...]         # [N_r] int32 [B] (recursion-wise)
    lengths: jax.Array                         # int32 [B]
    routed: jax.Array                          # int32 [N_r]
    overflow: jax.Array                        # int32 [N_r]

    @property
    def max_length(self) -> int:
        return self.depth_kv[0][0].max_length

    @property
    def shared_kv(self) -> bool:
        return not self.depth_pos

    def rewind(self, lengths: jax.Array) -> "MoRCache":
        """Forget tokens at and past lengths[b] (see the module docstring)."""
        lengths = jnp.asarray(lengths, jnp.int32)
        slots = jnp.arange(self.max_length, dtype=jnp.int32)[None, :]
        counts = tuple(
            jnp.sum((slots < count[:, None]) & (pos < lengths[:, None]), axis=1,
                    dtype=jnp.int32)
            for pos, count in zip(self.depth_pos, self.depth_count))
        return self.replace(lengths=lengths, depth_count=counts)

    def kv_entries(self) -> jax.Array:
        """int32 [B]: K/V entries (per layer slot) each row holds, summed over every layer,
        for comparing cache memory with a vanilla model's n_layers * lengths."""
        ends = len(self.ends) * self.lengths
        k = len(self.depth_kv[0])
        if self.shared_kv:
            return ends + k * self.lengths
        return ends + k * sum(self.depth_count)


def init(batch_size: int, max_length: int, *, num_recursions: int, layers_per_recursion: int,
         ends: int, shared_kv: bool, kv_heads: int, head_dim: int, dtype) -> MoRCache:
    """An empty cache (see MoRCache for the layout)."""
    def kv():
        return LayerKV.zeros(batch_size, max_length, kv_heads, head_dim, dtype)

    depths = 1 if shared_kv else num_recursions
    zeros = jnp.zeros((batch_size,), jnp.int32)
    return MoRCache(
        ends=tuple(kv() for _ in range(ends)),
        depth_kv=tuple(tuple(kv() for _ in range(layers_per_recursion))
                       for _ in range(depths)),
        depth_pos=() if shared_kv else tuple(
            jnp.zeros((batch_size, max_length), jnp.int32) for _ in range(depths)),
        depth_count=() if shared_kv else tuple(zeros for _ in range(depths)),
        lengths=zeros,
        routed=jnp.zeros((num_recursions,), jnp.int32),
        overflow=jnp.zeros((num_recursions,), jnp.int32))


def append_slots(count: jax.Array, active: jax.Array, max_length: int) -> tuple[jax.Array,
                                                                                jax.Array]:
    """Slots [B, S] where the active tokens (bool [B, S]) of a chunk append to a per-depth
    cache holding count[b] entries, max_length (a dropped write) for inactive ones; and the
    new counts [B]."""
    order = jnp.cumsum(active.astype(jnp.int32), axis=1) - 1
    slots = jnp.where(active, count[:, None] + order, max_length)
    return slots, count + jnp.sum(active, axis=1, dtype=jnp.int32)
