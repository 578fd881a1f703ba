"""A KV cache with one length per row (ragged batches), as DESIGN.md specifies.

Each layer keeps keys and values for `max_length` positions; row b holds `lengths[b]` valid
entries. Attention masks every key at or past a query's own position, so entries beyond a row's
length (left over from a rejected speculative draft, say) are never read and are simply
overwritten later. That is also why `rewind` only moves `lengths`: zeroing a stale key would
not remove it, since a zero key still adds exp(0) to the softmax.
"""
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LayerKV:
    k: jax.Array  # [B, max_length, kv_heads, head_dim]
    v: jax.Array  # [B, max_length, kv_heads, head_dim]

    @classmethod
    def zeros(cls, batch_size: int, max_length: int, kv_heads: int, head_dim: int, dtype):
        shape = (batch_size, max_length, kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_length(self) -> int:
        return self.k.shape[1]

    def write(self, k_new: jax.Array, v_new: jax.Array, positions: jax.Array) -> "LayerKV":
        """Writes S new entries per row at positions [B, S] (each row at its own offset).

        Positions past max_length are dropped rather than clamped, so they cannot overwrite
        valid history; callers check capacity on the host before decoding.
        """
        rows = jnp.arange(k_new.shape[0])[:, None]
        k = self.k.at[rows, positions].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[rows, positions].set(v_new.astype(self.v.dtype), mode="drop")
        return self.replace(k=k, v=v)  # keeps a subclass's extra fields (a label cache)


@flax.struct.dataclass
class KVCache:
    layers: tuple[LayerKV, ...]
    lengths: jax.Array  # int32[B]

    @property
    def max_length(self) -> int:
        return self.layers[0].max_length

    def rewind(self, lengths: jax.Array) -> "KVCache":
        """Forget entries at and past lengths[b]; they stay in memory but are masked."""
        return self.replace(lengths=jnp.asarray(lengths, jnp.int32))
