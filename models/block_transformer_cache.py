"""The decoding cache of the Block Transformer (Ho, Bae et al., arXiv 2406.02657).

What the model must remember to continue a sequence of `lengths[b]` tokens:

  block_kv     the block decoder's KV cache: one entry per *completed* block (lengths // L_B),
               an ordinary ragged LayerKV per layer ([B, ceil(max_length / L_B), kv, hd]).
  token_kv     the token decoder's local caches. Block k's local sequence is R prefix vectors
               (from C_{k-1}) then the block's first L_B - 1 tokens, P = R + L_B - 1 positions;
               only the current block's is needed to decode, and it is rebuilt at every block
               boundary. A ring of M such caches ([B, M, P, kv, hd] per layer; block k lives in
               slot k % M) keeps the last M - 1 blocks as well, so that speculative decoding can
               roll back across a block boundary without recomputing anything.
  contexts     the block decoder's outputs C_k of the last M completed blocks ([B, M, D]), to
               rebuild a local sequence from its context when a chunk starts inside a block.
  history      the last M * L_B token ids ([B, M * L_B], position p in slot p % (M * L_B)):
               the tokens of the current, incomplete block, embedded once it completes.

M = ceil(rewind_margin / L_B) + 1 (M = 1 with no margin: exactly the R + L_B - 1 positions of the
paper's token decoder). Like models/core/ring_cache.py, the rings make history bounded, so a
row can rewind only so far: `rewind_floor[b]` is the smallest length it can return to. A rewind
below it raises when its values are concrete; under jit the row is marked invalid (`valid` is
False, and the model's `extend` returns NaN logits for it), so a broken contract never passes
silently. Rewinding never zeroes anything: entries past a row's length are masked by position
and overwritten later.
"""
import flax.struct
import jax
import jax.numpy as jnp

from models.core.kv_cache import LayerKV
from models.core.ring_cache import rewound_floor


@flax.struct.dataclass
class BlockCache:
    block_kv: tuple[LayerKV, ...]  # per block-decoder layer, [B, n_blocks, kv, hd]
    token_kv: tuple[LayerKV, ...]  # per token-decoder layer, [B, M, P, kv, hd]
    contexts: jax.Array            # [B, M, D]: C_k in slot k % M
    history: jax.Array             # int32 [B, M * L_B]: token at position p in slot p % size
    lengths: jax.Array             # int32 [B]: tokens held per row
    rewind_floor: jax.Array        # int32 [B]: smallest length each row can rewind to
    block_length: int = flax.struct.field(pytree_node=False)

    @property
    def slots(self) -> int:
        """M, the number of blocks whose local state the rings keep."""
        return self.contexts.shape[1]

    @property
    def valid(self) -> jax.Array:
        """bool [B]: False for a row rewound past what the rings still hold."""
        return self.lengths >= self.rewind_floor

    def rewind(self, lengths: jax.Array) -> "BlockCache":
        """Forget tokens at and past lengths[b]; only `lengths` moves. A target below
        `rewind_floor` or above the current length is an error (see the module docstring)."""
        lengths = jnp.asarray(lengths, jnp.int32)
        floor = rewound_floor(lengths, self.lengths, self.rewind_floor,
                              f"the Block Transformer keeps the local state of only "
                              f"{self.slots} blocks (raise rewind_margin to go further)")
        return self.replace(lengths=lengths, rewind_floor=floor)

    def advance(self, num_tokens: jax.Array) -> "BlockCache":
        """Counts num_tokens[b] new tokens per row (after the rings were written). Writing the
        local state of block lengths // L_B overwrote block (lengths // L_B) - M, so a row can
        go back no further than the start of block (lengths // L_B) - M + 1."""
        lengths = self.lengths + num_tokens
        lb = self.block_length
        floor = jnp.maximum(self.rewind_floor, (lengths // lb - self.slots + 1) * lb)
        return self.replace(lengths=lengths, rewind_floor=floor)


def init(batch_size: int, max_length: int, *, block_length: int, slots: int, local_length: int,
         block_kv: tuple[int, int, int], token_kv: tuple[int, int, int], context_dim: int,
         dtype) -> BlockCache:
    """An empty cache. block_kv / token_kv: (layers, kv heads, head dim) of each decoder."""
    n_blocks = -(-max_length // block_length)
    layers, heads, dim = block_kv
    blocks = tuple(LayerKV.zeros(batch_size, n_blocks, heads, dim, dtype)
                   for _ in range(layers))
    layers, heads, dim = token_kv
    shape = (batch_size, slots, local_length, heads, dim)
    local = tuple(LayerKV(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
                  for _ in range(layers))
    zeros = jnp.zeros((batch_size,), jnp.int32)
    return BlockCache(block_kv=blocks, token_kv=local,
                      contexts=jnp.zeros((batch_size, slots, context_dim), dtype),
                      history=jnp.zeros((batch_size, slots * block_length), jnp.int32),
                      lengths=zeros, rewind_floor=zeros, block_length=block_length)


def scatter_rows(ring: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """ring [B, C, ...] with values [B, S, ...] written at slots [B, S]; a slot >= C drops
    the write (callers pass C for entries that must not be stored)."""
    rows = jnp.arange(ring.shape[0])[:, None]
    return ring.at[rows, slots].set(values.astype(ring.dtype), mode="drop")


def gather_slot(ring: jax.Array, slot: jax.Array) -> jax.Array:
    """ring [B, C, ...] at one slot per row (slot int32 [B]) -> [B, ...]."""
    index = slot.reshape((-1,) + (1,) * (ring.ndim - 1))
    return jnp.take_along_axis(ring, index, axis=1)[:, 0]


def write_history(cache: BlockCache, tokens: jax.Array, n: jax.Array) -> jax.Array:
    """The token history with the first n[b] of tokens [B, S] stored at each row's length
    (only the newest `size` of them, so no two writes share a slot)."""
    size = cache.history.shape[1]
    idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    keep = (idx < n[:, None]) & (idx >= n[:, None] - size)
    slots = jnp.where(keep, (cache.lengths[:, None] + idx) % size, size)
    return scatter_rows(cache.history, slots, tokens)

