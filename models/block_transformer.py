"""Block Transformer: global-to-local language modelling (Ho, Bae et al., NeurIPS 2024;
arXiv 2406.02657; official code itsnamgyu/block-transformer).

The sequence is cut into blocks of L_B tokens (`block_length`).
  - Embedder ("lookup + concat"): a [V, D / L_B] table; block i's embedding is the
    concatenation of its L_B token embeddings, e_i in R^D (no other position information).
  - Block decoder: a causal decoder over the block embeddings; its final-norm outputs
    C_i [B, N, D] are the context of block i + 1. It runs once per block, so its KV cache
    grows by one entry per L_B tokens.
  - Token decoder ("prefix" strategy): for block k, a linear expansion (the official Conv1d
    with kernel 1) maps C_{k-1} to R = `expansion_ratio` prefix vectors of width d, followed by
    the embeddings of the block's first L_B - 1 tokens: a local sequence of R + L_B - 1
    positions with causal attention inside it only. The outputs at positions R-1 .. R+L_B-2
    predict the block's L_B tokens. Its token embedding and its (untied) output head are its
    own: three vocabulary tables in all.
Both decoders are this codebase's Llama-style blocks (RMSNorm, GQA attention with RoPE, SwiGLU;
models/transformer.py) rather than the official GPT-NeoX, so a vanilla Transformer of equal
non-embedding parameters is the same kind of layer.

Where the protocol's logits sit. `logits[:, t]` predicts token t + 1 as for every model: token
t + 1 is token j = (t+1) % L_B of block k = (t+1) // L_B, predicted from C_{k-1} and the block's
tokens before it. Block 0 has no context and is never predicted (as in the official code):
logits at positions 0 .. L_B - 2 are zeros (a uniform distribution), and the first block of
every packed document (segment) is likewise unpredicted in training. To have every real token
predicted, start a sequence with a whole first block: L_B - 1 pad ids and then BOS (what
train/block_packing.py does by default), or any L_B tokens of prompt. Decoding therefore needs
a prompt of at least L_B tokens (`min_prompt_length`; decoding.generate refuses shorter
prompts), and `__call__` needs a sequence length that is a multiple of L_B.

Decoding (`init_cache` / `extend` / `rewind`, models/block_transformer_cache.py) presents the
plain protocol, with ragged rows that cross block boundaries at different steps. A one-token
step where no row completes a block runs only the token decoder, one query over at most
R + L_B - 1 cached positions; a step where some row completes its block (once every L_B steps
when rows are aligned), and every multi-token chunk, takes the general path: embed and run
the chunk's blocks through the block decoder, then rebuild the local sequences they touch.
`rewind_margin` (gamma_max) sets how many earlier blocks' local state the rings keep, so
speculative samplers can roll back across a block boundary with this model as target or draft.
"""
import dataclasses

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from models import block_transformer_cache as bcache
from models.block_transformer_cache import BlockCache
from models.core.attention import check_impl
from models.core.embedding import Embedding
from models.core.kv_cache import LayerKV
from models.core.norms import RMSNorm
from models.core.params import param
from models.core.protocol import ModelOutput
from models.transformer import DTYPES, Block, TransformerConfig


# TransformerConfig is gin-configurable: every field the decoders' configs do not set here
# would otherwise pick up a gin binding meant for a vanilla model (a window, a head_dim).
_UNBOUND = {"head_dim": None, "tie_embeddings": False, "window": None}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BlockTransformerConfig:
    """block_length: L_B tokens per block. expansion_ratio: R prefix vectors per block.
    block_*: the block decoder (width D; the embedder's table is D / L_B wide).
    token_*: the token decoder (width d). kv_heads / mlp_dim None: as many kv heads as heads,
    Llama's 8/3 * width rounded up to 64. rewind_margin: tokens speculative decoding may roll
    back (gamma_max); the cache keeps ceil(margin / L_B) earlier blocks' local state."""
    vocab_size: int = 260
    block_length: int = 4
    expansion_ratio: int = 2
    block_d_model: int = 128
    block_layers: int = 2
    block_heads: int = 4
    block_kv_heads: int | None = None
    block_mlp_dim: int | None = None
    token_d_model: int = 128
    token_layers: int = 2
    token_heads: int = 4
    token_kv_heads: int | None = None
    token_mlp_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attention_impl: str = "xla_dense"   # the block decoder's training attention
    dtype: str = "float32"
    rewind_margin: int = 8

    def __post_init__(self):
        if self.block_length < 1:
            raise ValueError(f"block_length={self.block_length} must be at least 1 (L_B tokens "
                             "per block; the paper uses 4)")
        if self.expansion_ratio < 1:
            raise ValueError(f"expansion_ratio={self.expansion_ratio} must be at least 1 (R "
                             "prefix vectors per block; the paper uses 2)")
        if self.block_d_model % self.block_length:
            raise ValueError(f"block_d_model={self.block_d_model} must be a multiple of "
                             f"block_length={self.block_length} (the lookup embedder "
                             "concatenates L_B embeddings of width D / L_B)")
        if self.rewind_margin < 0:
            raise ValueError(f"rewind_margin={self.rewind_margin} must be at least 0")
        check_impl(self.attention_impl)
        # Validates widths, heads and dtype with TransformerConfig's own errors.
        for name in ("block", "token"):
            try:
                getattr(self, f"{name}_decoder_config")()
            except ValueError as e:
                raise ValueError(f"{name} decoder: {str(e).splitlines()[0]}") from None

    def block_decoder_config(self) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=self.vocab_size, d_model=self.block_d_model, n_layers=self.block_layers,
            n_heads=self.block_heads, n_kv_heads=self.block_kv_heads or self.block_heads,
            mlp_dim=self.block_mlp_dim, rope_theta=self.rope_theta, norm_eps=self.norm_eps,
            attention_impl=self.attention_impl, dtype=self.dtype, **_UNBOUND)

    def token_decoder_config(self) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=self.vocab_size, d_model=self.token_d_model, n_layers=self.token_layers,
            n_heads=self.token_heads, n_kv_heads=self.token_kv_heads or self.token_heads,
            mlp_dim=self.token_mlp_dim, rope_theta=self.rope_theta, norm_eps=self.norm_eps,
            attention_impl="xla_dense", dtype=self.dtype, **_UNBOUND)

    @property
    def local_length(self) -> int:
        """R + L_B - 1, the token decoder's sequence per block."""
        return self.expansion_ratio + self.block_length - 1

    @property
    def rewind_slots(self) -> int:
        """M: blocks whose local decoding state the cache keeps (see the cache module)."""
        return -(-self.rewind_margin // self.block_length) + 1

    @property
    def min_prompt_length(self) -> int:
        """A prompt must hold a whole first block before anything can be predicted."""
        return self.block_length

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


class BlockTransformer(nnx.Module):
    """Block decoder + prefix token decoder, implementing the swiftlm model protocol."""

    def __init__(self, config: BlockTransformerConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, BlockTransformerConfig):
            raise ValueError(f"BlockTransformer needs a BlockTransformerConfig, got "
                             f"{type(config).__name__}")
        self.config = c = config
        self.vocab_size = c.vocab_size
        bc, tc = c.block_decoder_config(), c.token_decoder_config()
        dt = c.compute_dtype
        self.block_embed = Embedding(c.vocab_size, c.block_d_model // c.block_length, dtype=dt,
                                     rngs=rngs)
        self.block_decoder = nnx.List([Block(bc, rngs=rngs) for _ in range(bc.n_layers)])
        self.block_norm = RMSNorm(bc.d_model, eps=c.norm_eps, rngs=rngs)
        self.expand = param(rngs, (bc.d_model, c.expansion_ratio, tc.d_model),
                            ("embed", None, None))
        self.expand_bias = param(rngs, (c.expansion_ratio, tc.d_model), (None, None),
                                 init="zeros")
        self.token_embed = Embedding(c.vocab_size, tc.d_model, dtype=dt, rngs=rngs)
        self.token_decoder = nnx.List([Block(tc, rngs=rngs) for _ in range(tc.n_layers)])
        self.token_norm = RMSNorm(tc.d_model, eps=c.norm_eps, rngs=rngs)
        self.lm_head = param(rngs, (tc.d_model, c.vocab_size), ("embed", "vocab"))

    # -- shared pieces ---------------------------------------------------------------------
    def _embed_blocks(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, N * L_B] -> block embeddings [B, N, D] (lookup, then concatenate)."""
        b, t = tokens.shape
        return self.block_embed(tokens).reshape(b, t // self.config.block_length,
                                                self.config.block_d_model)

    def _local(self, contexts: jax.Array, tokens: jax.Array
               ) -> tuple[jax.Array, tuple[LayerKV, ...]]:
        """The token decoder on G local sequences per row: contexts [B, G, D] (C_{k-1}) and
        tokens [B, G, L_B - 1] (block k's first tokens). Returns the normed outputs at local
        positions R-1 .. R+L_B-2, [B, G, L_B, d], and each layer's local K/V [B, G, P, kv, hd].
        Run as an extend over an empty cache, so the K/V come out with the outputs."""
        c = self.config
        b, g = contexts.shape[:2]
        dt = c.compute_dtype
        prefix = jnp.einsum("bgD,Drd->bgrd", contexts.astype(dt), self.expand[...].astype(dt))
        prefix = prefix + self.expand_bias[...].astype(dt)
        x = jnp.concatenate([prefix, self.token_embed(tokens)], axis=2)
        x = x.reshape(b * g, c.local_length, c.token_d_model)
        tc = c.token_decoder_config()
        start = jnp.zeros((b * g,), jnp.int32)
        kvs = []
        for block in self.token_decoder:
            kv = LayerKV.zeros(b * g, c.local_length, tc.n_kv_heads, tc.resolved_head_dim, dt)
            x, kv = block.extend(x, kv, start)
            kvs.append(LayerKV(k=kv.k.reshape((b, g) + kv.k.shape[1:]),
                               v=kv.v.reshape((b, g) + kv.v.shape[1:])))
        out = self.token_norm(x[:, c.expansion_ratio - 1:])
        return out.reshape(b, g, c.block_length, c.token_d_model), tuple(kvs)

    def _head(self, x: jax.Array) -> jax.Array:
        dt = self.config.compute_dtype
        return (x.astype(dt) @ self.lm_head[...].astype(dt)).astype(jnp.float32)

    # -- training --------------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> ModelOutput:
        """Logits [B, T, V] for tokens [B, T], T a multiple of L_B. With packed documents,
        segment_ids must be constant inside each block (train/block_packing.py guarantees
        it); the block decoder attends within a segment only and positions (per document)
        give the block positions."""
        c = self.config
        lb = c.block_length
        b, t = tokens.shape
        if t % lb:
            raise ValueError(f"sequence length {t} is not a multiple of block_length={lb}; "
                             "pad it to a block boundary (train/block_packing.py does)")
        n = t // lb
        block_pos = (jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
                     if positions is None else positions[:, ::lb] // lb)
        block_seg = None if segment_ids is None else segment_ids[:, ::lb]
        x = self._embed_blocks(tokens)
        for block in self.block_decoder:
            x = block(x, block_pos, block_seg)
        # Local block k (0..N) is predicted from C_{k-1}; block 0 gets a zero context and is
        # masked below, block N only yields the prediction at position T - 1.
        contexts = jnp.concatenate([jnp.zeros_like(x[:, :1]), self.block_norm(x)], axis=1)
        local = jnp.concatenate([tokens.reshape(b, n, lb)[:, :, :lb - 1],
                                 jnp.zeros((b, 1, lb - 1), tokens.dtype)], axis=1)
        h, _ = self._local(contexts, local)
        logits = self._head(h.reshape(b, (n + 1) * lb, -1)[:, 1:t + 1])
        first = jnp.zeros((b, n), bool).at[:, 0].set(True)
        if block_seg is not None:
            first = first.at[:, 1:].set(block_seg[:, 1:] != block_seg[:, :-1])
        idx = jnp.arange(t)
        unpredicted = (idx % lb < lb - 1)[None, :] & first[:, idx // lb]
        logits = jnp.where(unpredicted[..., None], 0.0, logits)
        return ModelOutput(logits=logits, aux_loss=jnp.zeros((), jnp.float32), metrics={})

    # -- decoding --------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int) -> BlockCache:
        c = self.config
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size={batch_size} and max_length={max_length} must both "
                             "be at least 1")
        bc, tc = c.block_decoder_config(), c.token_decoder_config()
        return bcache.init(
            batch_size, max_length, block_length=c.block_length, slots=c.rewind_slots,
            local_length=c.local_length,
            block_kv=(bc.n_layers, bc.n_kv_heads, bc.resolved_head_dim),
            token_kv=(tc.n_layers, tc.n_kv_heads, tc.resolved_head_dim),
            context_dim=c.block_d_model, dtype=c.compute_dtype)

    def extend(self, tokens: jax.Array, cache: BlockCache, *,
               num_tokens: jax.Array | None = None) -> tuple[jax.Array, BlockCache]:
        """Appends tokens [B, S] at each row's own length; returns logits [B, S, V].
        num_tokens int32[B]: how many of the S tokens of each row are real (default all);
        the rest are neither stored nor counted."""
        b, s = tokens.shape
        n = (jnp.full((b,), s, jnp.int32) if num_tokens is None
             else jnp.asarray(num_tokens, jnp.int32))
        tokens = tokens.astype(jnp.int32)
        if s == 1:
            # Skip the block decoder unless some row completes its block with this token.
            completes = ((cache.lengths + 1) % self.config.block_length == 0) & (n > 0)
            logits, new_cache = jax.lax.cond(jnp.any(completes), self._extend_chunk,
                                             self._extend_in_block, tokens, cache, n)
        else:
            logits, new_cache = self._extend_chunk(tokens, cache, n)
        return jnp.where(cache.valid[:, None, None], logits, jnp.nan), new_cache

    def _extend_chunk(self, tokens, cache: BlockCache, n):
        """The general extend: any S, any row offsets, block boundaries anywhere."""
        c = self.config
        lb, m = c.block_length, cache.slots
        b, s = tokens.shape
        lengths = cache.lengths
        first_block = lengths // lb
        offset = lengths - first_block * lb
        n_win = -(-(lb - 1 + s) // lb)   # blocks from the current one through the chunk
        i = jnp.arange(n_win * lb, dtype=jnp.int32)[None, :]
        off = offset[:, None]
        # The window: the current block's earlier tokens (from history), then the chunk.
        hist = jnp.take_along_axis(cache.history, (first_block[:, None] * lb + i)
                                   % cache.history.shape[1], axis=1)
        new = jnp.take_along_axis(tokens, jnp.clip(i - off, 0, s - 1), axis=1)
        window = jnp.where(i < off, hist, jnp.where(i < off + s, new, 0))

        # Block decoder over the window's blocks; only those completed count as written.
        x = self._embed_blocks(window)
        block_kv = list(cache.block_kv)
        for j, block in enumerate(self.block_decoder):
            x, block_kv[j] = block.extend(x, block_kv[j], first_block)
        ctx = self.block_norm(x)  # [B, n_win, D]

        # Local sequences of blocks first_block .. first_block + n_win.
        prev = bcache.gather_slot(cache.contexts, (first_block - 1) % m)[:, None]
        prev = jnp.where((first_block > 0)[:, None, None], prev, 0)
        contexts = jnp.concatenate([prev.astype(ctx.dtype), ctx], axis=1)
        local = jnp.concatenate([window.reshape(b, n_win, lb)[:, :, :lb - 1],
                                 jnp.zeros((b, 1, lb - 1), jnp.int32)], axis=1)
        h, local_kv = self._local(contexts, local)
        u = off + 1 + jnp.arange(s, dtype=jnp.int32)[None, :]
        h = jnp.take_along_axis(h.reshape(b, (n_win + 1) * lb, -1), u[:, :, None], axis=1)
        logits = self._mask_block_zero(self._head(h), lengths)

        # Rings: keep only the newest M blocks (distinct slots, so no scatter collides).
        done = ((lengths + n) // lb)[:, None]
        k_win = first_block[:, None] + jnp.arange(n_win, dtype=jnp.int32)[None, :]
        slots = jnp.where((k_win < done) & (k_win >= done - m), k_win % m, m)
        contexts_ring = bcache.scatter_rows(cache.contexts, slots, ctx)
        k_loc = first_block[:, None] + jnp.arange(n_win + 1, dtype=jnp.int32)[None, :]
        slots = jnp.where((k_loc <= done) & (k_loc > done - m), k_loc % m, m)
        token_kv = tuple(LayerKV(k=bcache.scatter_rows(old.k, slots, kv.k),
                                 v=bcache.scatter_rows(old.v, slots, kv.v))
                         for old, kv in zip(cache.token_kv, local_kv))
        new_cache = cache.replace(block_kv=tuple(block_kv), token_kv=token_kv,
                                  contexts=contexts_ring,
                                  history=bcache.write_history(cache, tokens, n))
        return logits, new_cache.advance(n)

    def _extend_in_block(self, tokens, cache: BlockCache, n):
        """One token per row that does not complete its block: the token decoder alone, one
        query at local position R + (length % L_B) over the current block's local cache."""
        c = self.config
        lb = c.block_length
        block = cache.lengths // lb
        slot = block % cache.slots
        local_pos = c.expansion_ratio + cache.lengths - block * lb
        x = self.token_embed(tokens)
        token_kv = []
        for layer, ring in zip(self.token_decoder, cache.token_kv):
            kv = LayerKV(k=bcache.gather_slot(ring.k, slot), v=bcache.gather_slot(ring.v, slot))
            x, kv = layer.extend(x, kv, local_pos)
            token_kv.append(LayerKV(k=bcache.scatter_rows(ring.k, slot[:, None], kv.k[:, None]),
                                    v=bcache.scatter_rows(ring.v, slot[:, None], kv.v[:, None])))
        logits = self._mask_block_zero(self._head(self.token_norm(x)), cache.lengths)
        new_cache = cache.replace(token_kv=tuple(token_kv),
                                  history=bcache.write_history(cache, tokens, n))
        return logits, new_cache.advance(n)

    def _mask_block_zero(self, logits: jax.Array, lengths: jax.Array) -> jax.Array:
        """Zero logits where they would predict a token of block 0 (no context exists)."""
        t = lengths[:, None] + jnp.arange(logits.shape[1], dtype=jnp.int32)[None, :]
        return jnp.where((t < self.config.block_length - 1)[..., None], 0.0, logits)

    def rewind(self, cache: BlockCache, lengths: jax.Array) -> BlockCache:
        return cache.rewind(lengths)

    # -- bookkeeping -----------------------------------------------------------------------
    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count; non_embedding leaves out the three vocabulary tables (block
        embedder, token embedding, output head), as the paper counts."""
        total = sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
        if non_embedding:
            total -= sum(v.get_value().size for v in (self.block_embed.table,
                                                       self.token_embed.table, self.lm_head))
        return total
