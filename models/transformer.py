"""A Llama-style decoder-only Transformer: the baseline, the draft model, and the skeleton the
other families build on (Touvron et al. 2023, arXiv 2302.13971).

Pre-norm residual blocks of RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU, a final
RMSNorm and an (optionally tied) output head. Implements the whole model protocol of DESIGN.md:
`__call__` for training, `init_cache` / `extend` / `rewind` for decoding with ragged rows.
`extend(..., exit_layer=l)` runs only the first l blocks and reads logits through the final
norm and head, which is what self-speculative (early-exit) drafting needs; `extend_trunk` and
`extend_from` split one extend at a layer, so verification can resume from the exit's hidden
states (Kangaroo, arXiv 2404.18911).
"""
import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from models.core import double_sparse
from models.core.attention import Attention, check_impl
from models.core.embedding import Embedding
from models.core.kv_cache import KVCache, LayerKV
from models.core.mlp import SwiGLU
from models.core.norms import RMSNorm
from models.core.params import param
from models.core.protocol import ModelOutput

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 260          # the byte tokenizer: 256 bytes + BOS, EOS, PAD, MASK
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None    # default d_model // n_heads
    mlp_dim: int | None = None     # default: Llama's 8/3 * d_model rounded up to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    window: int | None = None      # causal window in keys (incl. self); None = full attention
    attention_impl: str = "xla_dense"
    dtype: str = "float32"         # compute dtype; parameters always stay f32
    # Decode attention (models/core/double_sparse.py, arXiv 2408.07092): "dense" or
    # "double_sparse" (label channels r, default head_dim // 16; fraction of the context each
    # query attends; dense up to ds_min_context keys; label bits 16 (cache dtype), 8 or 4;
    # the first ds_dense_layers layers decode densely, as DoubleSparse's evaluation does).
    decode_attention: str = "dense"
    ds_label_channels: int | None = None
    ds_token_sparsity: float = 0.0625
    ds_min_context: int = 256
    ds_label_bits: int = 16
    ds_dense_layers: int = 2
    ds_selection: str = "kv_group"  # top-k per KV-head group (max over it) or "query_head"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {tuple(DTYPES)}")
        check_impl(self.attention_impl)
        double_sparse.settings_from_config(self)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                             "set head_dim explicitly")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_mlp_dim(self) -> int:
        return self.mlp_dim or 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


class Block(nnx.Module):
    """One pre-norm decoder block."""

    def __init__(self, config: TransformerConfig, *, windows=None, mlp: nnx.Module | None = None,
                 rngs: nnx.Rngs):
        """mlp: the feed-forward sublayer (default a SwiGLU of config.resolved_mlp_dim); a
        family with another MLP (an MoE layer, models/rmoe.py) passes its own."""
        c = config
        # GPT-2's trick: shrink the residual-branch outputs with depth so the residual stream's
        # variance stays near constant at init.
        out_stddev = 0.02 / math.sqrt(2 * c.n_layers)
        self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
        self.attn = Attention(
            c.d_model, c.n_heads, c.n_kv_heads, c.resolved_head_dim,
            windows=windows if windows is not None else (c.window,) * c.n_heads,
            rope_theta=c.rope_theta, impl=c.attention_impl, out_stddev=out_stddev,
            dtype=c.compute_dtype, double_sparse=double_sparse.settings_from_config(c),
            rngs=rngs)
        self.mlp_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
        self.mlp = mlp if mlp is not None else SwiGLU(
            c.d_model, c.resolved_mlp_dim, out_stddev=out_stddev, dtype=c.compute_dtype,
            rngs=rngs)

    def __call__(self, x, positions, segment_ids=None):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        return x + self.mlp(self.mlp_norm(x))

    def extend(self, x, kv: LayerKV, lengths):
        h, kv = self.attn.extend(self.attn_norm(x), kv, lengths)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), kv


class Transformer(nnx.Module):
    """Decoder-only LM implementing the swiftlm model protocol."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs, block_windows=None):
        """block_windows: optional per-layer tuple of per-head windows (used by MSWA-style
        subclasses); by default every layer uses config.window on every head."""
        self.config = config
        c = config
        self.vocab_size = c.vocab_size
        self.embed = Embedding(c.vocab_size, c.d_model, dtype=c.compute_dtype, rngs=rngs)
        self.blocks = nnx.List([
            self.make_block(i, None if block_windows is None else block_windows[i], rngs)
            for i in range(c.n_layers)])
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
        if not c.tie_embeddings:
            self.lm_head = param(rngs, (c.d_model, c.vocab_size), ("embed", "vocab"))

    def make_block(self, layer: int, windows, rngs: nnx.Rngs) -> nnx.Module:
        """Block `layer` (a hook: families with other blocks, e.g. MoE ones, override it)."""
        del layer
        return Block(self.config, windows=windows, rngs=rngs)

    # -- training --------------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> ModelOutput:
        x = self.hidden_at(tokens, self.config.n_layers, segment_ids=segment_ids,
                           positions=positions)
        logits = self.logits(x)
        return ModelOutput(logits=logits, aux_loss=jnp.zeros((), jnp.float32), metrics={})

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and output head; logits are returned in f32 for a stable softmax."""
        return self.project_to_vocab(self.final_norm(x))

    def project_to_vocab(self, x: jax.Array) -> jax.Array:
        """The output head alone, on already-normalised states (an early-exit adapter brings
        its own final norm and shares this head)."""
        if self.config.tie_embeddings:
            out = self.embed.attend(x)
        else:
            out = x.astype(self.config.compute_dtype) @ self.lm_head[...].astype(
                self.config.compute_dtype)
        return out.astype(jnp.float32)

    def hidden_at(self, tokens: jax.Array, layer: int, *, segment_ids: jax.Array | None = None,
                  positions: jax.Array | None = None) -> jax.Array:
        """The residual stream [B, T, d] after the first `layer` blocks (training-time view of
        an early exit; what an early-exit adapter is trained on)."""
        return self.hidden_from(self.embed(tokens), 0, layer, segment_ids=segment_ids,
                                positions=positions)

    def hidden_from(self, x: jax.Array, start: int, stop: int, *,
                    segment_ids: jax.Array | None = None,
                    positions: jax.Array | None = None) -> jax.Array:
        """Blocks [start, stop) on residual states x [B, T, d] (full-sequence, no cache), so a
        caller holding an early exit's states can finish the forward without redoing it."""
        self._check_layer("start", start, low=0)
        self._check_layer("stop", stop, low=start)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        for block in self.blocks[start:stop]:
            x = block(x, positions, segment_ids)
        return x

    # -- decoding --------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        c = self.config
        layers = tuple(
            LayerKV.zeros(batch_size, max_length, c.n_kv_heads, c.resolved_head_dim,
                          c.compute_dtype) for _ in range(c.n_layers))
        layers = double_sparse.with_label_caches(layers, double_sparse.settings_from_config(c))
        return KVCache(layers=layers, lengths=jnp.zeros((batch_size,), jnp.int32))

    def extend(self, tokens: jax.Array, cache: KVCache, *, exit_layer: int | None = None,
               num_tokens: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Appends tokens [B, S] at each row's own length; returns logits [B, S, V].

        num_tokens: int32[B], how many of the S tokens are real per row (a ragged, right-padded
        prefill); each row's length grows by its own count. Default: all S.

        exit_layer: run only the first `exit_layer` blocks (early-exit drafting). Only those
        layers' caches are written; the deeper layers' entries are filled when the full model
        later verifies the same positions.
        """
        n = self.config.n_layers if exit_layer is None else exit_layer
        self._check_layer("exit_layer", n)
        x, new_cache = self._extend_blocks(self.embed(tokens), cache, 0, n, num_tokens)
        return self._read_logits(x, cache), new_cache

    def extend_trunk(self, tokens: jax.Array, cache, *, exit_layer: int,
                     num_tokens: jax.Array | None = None) -> tuple[jax.Array, object]:
        """Like extend(..., exit_layer=l) but returns the residual stream [B, S, d] after block
        l instead of logits: what early-exit drafting keeps so verification can resume from it
        (`extend_from`) instead of recomputing the first l blocks."""
        self._check_layer("exit_layer", exit_layer)
        return self._extend_blocks(self.embed(tokens), cache, 0, exit_layer, num_tokens)

    def extend_from(self, hidden: jax.Array, cache, *, start_layer: int,
                    num_tokens: jax.Array | None = None) -> tuple[jax.Array, object]:
        """Runs blocks start_layer.. on residual states hidden [B, S, d] that an earlier
        `extend_trunk(..., exit_layer=start_layer)` produced for the same positions, and returns
        logits [B, S, V]. The positions start at each row's cache length, so rewind the cache
        to where those tokens began first; the shallow layers must already hold them (their
        entries are read, not rewritten)."""
        self._check_layer("start_layer", start_layer, low=0)
        x, new_cache = self._extend_blocks(hidden, cache, start_layer, self.config.n_layers,
                                           num_tokens)
        return self._read_logits(x, cache), new_cache

    def _check_layer(self, name: str, value: int, low: int = 1) -> None:
        if not low <= value <= self.config.n_layers:
            raise ValueError(f"{name}={value} must be in [{low}, {self.config.n_layers}]")

    def _extend_blocks(self, x, cache: KVCache, start: int, stop: int, num_tokens):
        """Blocks [start, stop) on x at each row's cache length; the cache advances by
        num_tokens (default all S)."""
        layers = list(cache.layers)
        for i in range(start, stop):
            x, layers[i] = self.blocks[i].extend(x, layers[i], cache.lengths)
        # Padding written past a row's new length is masked by position and overwritten later.
        added = x.shape[1] if num_tokens is None else jnp.asarray(num_tokens, jnp.int32)
        return x, KVCache(layers=tuple(layers), lengths=cache.lengths + added)

    def _read_logits(self, x: jax.Array, cache) -> jax.Array:
        """Logits of the final states; `cache` is the cache the call started from."""
        del cache  # a plain KV cache has no invalid rows
        return self.logits(x)

    def rewind(self, cache: KVCache, lengths: jax.Array) -> KVCache:
        return cache.rewind(lengths)

    # -- bookkeeping -----------------------------------------------------------------------
    def num_params(self, *, non_embedding: bool = False) -> int:
        total = sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
        if non_embedding:
            total -= self.embed.table[...].size
            if not self.config.tie_embeddings:
                total -= self.lm_head[...].size
        return total
