"""Mixture-of-Recursions (Bae, Kim, Bayat et al.; arXiv 2507.10524; official training code
raymin0223/mixture_of_recursions) and the plain Recursive Transformer, on the Llama-style
blocks of models/transformer.py.

A stack of K shared blocks is applied N_r times (the sharing schemes of models/mor_config.py;
Middle-Cycle by default: unique first and last layers). Routers (models/mor_routing.py)
decide per token how many recursions it takes:

  router="expert"  expert-choice. Recursion r updates the tokens it selects,
                   H <- H + g * Block(H) (Block includes its residual, as the official code;
                   g = alpha * sigmoid(s)); the others pass unchanged. In training ("topk")
                   recursion r keeps the top k_r of the tokens recursion r-1 kept, and the
                   shared blocks run on those k_r tokens only, gathered with their original
                   positions and a causal mask among them: compute follows the capacities.
                   routing="threshold" is the causal inference rule (continue iff
                   sigmoid(s_r) >= 0.5, hierarchically), computed over all tokens with masks.
                   Capacity warmup (capacity_warmup_steps) decays the capacities from 1 by a
                   cosine over the first training forwards, counted in a TrainingState; the
                   warm forward gathers at the static size of the whole sequence and masks
                   the tokens past the current capacity (a lax.cond picks it, so the step
                   after warmup runs at the target capacities' size).
  router="token"   token-choice: depth i from one router on H^1; h runs recursions 1..i
                   unweighted and the output is H^1 + g_i * h (computed with masks).
                   Balancing by a loss or loss-free (a TrainingState bias the training
                   forward moves; models/mor_routing.py).
  router="none"    the Recursive Transformer: every token takes every recursion.

KV strategies: "recursion" (recursion-wise caching: recursion r attends only among the tokens
that reached it, and caches only theirs) and "share" (recursive KV sharing: every token runs
recursion 1, whose K/V every deeper recursion's queries read). Both hold in training and in
decoding, so `extend` equals `__call__` run in the same causal routing mode.

Decoding (`init_cache` / `extend` / `rewind`; models/mor_cache.py) routes causally and keeps
per-depth caches whose lengths differ per row, keys carrying their original positions.
Depth-wise batching: in a one-token step, recursion r gathers the rows whose token is still
active into a static capacity ceil(decode_capacity[r] * B) (jnp.nonzero with a fixed size),
runs the shared blocks on those rows only, and scatters back; the matmuls shrink with the
capacity. Overflow policy: active rows beyond the capacity (the highest row indices) exit
early at that recursion, exactly as if their router had said stop, and are counted in
`cache.overflow`. This is the paper's continuous depth-wise batching reduced to one step of a
fixed batch; a serving queue would refill the exited rows' slots with waiting requests.
Multi-token chunks (prefill, speculative verification) run all rows with per-token masks.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from models import mor_cache, mor_decode
from models.core.attention import masked_attention
from models.core.embedding import Embedding
from models.core.norms import RMSNorm
from models.core.params import TrainingState, param
from models.core.protocol import ModelOutput
from models.mor_config import MoRConfig
from models.mor_routing import (ExpertRouters, TokenRouter, bce_with_logits, selection_targets,
                                token_choice_losses, top_k_in_order)
from models.mor_decode import apply_block
from models.transformer import Block, Transformer


def _take(a, idx):
    """a [B, T, ...] at per-row indices idx [B, C] -> [B, C, ...]."""
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


class MoR(nnx.Module):
    """Mixture-of-Recursions / Recursive Transformer implementing the swiftlm protocol."""

    def __init__(self, config: MoRConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MoRConfig):
            raise ValueError(f"MoR needs a MoRConfig, got {type(config).__name__}")
        if config.window is not None or config.decode_attention != "dense":
            raise ValueError(f"MoR uses full dense attention; got window={config.window}, "
                             f"decode_attention={config.decode_attention!r}")
        c = self.config = config
        self.vocab_size = c.vocab_size
        # Training mode: the forward updates its TrainingState (model.eval() turns it off).
        self.deterministic = False
        if c.capacity_warmup_steps:
            self.forwards = TrainingState(jnp.zeros((), jnp.int32))
        self.embed = Embedding(c.vocab_size, c.d_model, dtype=c.compute_dtype, rngs=rngs)
        n_unique = 1 + max(max(group) for group in c.schedule)
        # Weights are tied by reference: recursion r's layer j is self.shared[schedule[r][j]].
        self.shared = nnx.List([Block(c, rngs=rngs) for _ in range(n_unique)])
        if c.has_ends:
            self.first, self.last = Block(c, rngs=rngs), Block(c, rngs=rngs)
        if c.router == "expert":
            self.router = ExpertRouters(c.d_model, c.num_recursions,
                                        stddev=c.router_init_stddev, temp=c.router_temp,
                                        rngs=rngs)
        elif c.router == "token":
            self.router = TokenRouter(c.d_model, c.num_recursions,
                                      stddev=c.router_init_stddev,
                                      loss_free=c.balancing == "loss_free", rngs=rngs)
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, rngs=rngs)
        if not c.tie_embeddings:
            self.lm_head = param(rngs, (c.d_model, c.vocab_size), ("embed", "vocab"))

    # The output head and parameter count are the Transformer's.
    logits = Transformer.logits
    project_to_vocab = Transformer.project_to_vocab
    num_params = Transformer.num_params

    # -- training --------------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, routing: str | None = None
                 ) -> ModelOutput:
        """routing: "topk" or "threshold" for expert-choice (default config.routing)."""
        c = self.config
        routing = c.routing if routing is None else routing
        if routing not in ("topk", "threshold"):
            raise ValueError(f"unknown routing {routing!r}; valid: ('topk', 'threshold')")
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        weights = (seg > 0).astype(jnp.float32)     # packing pads with segment id 0
        x = self.embed(tokens)
        if c.has_ends:
            x = self.first(x, positions, segment_ids)
        if c.router == "expert" and routing == "topk" and c.capacity_warmup_steps:
            x, aux, metrics = self._expert_topk_warm(x, positions, seg, weights)
        elif c.router == "expert" and routing == "topk":
            x, aux, metrics = self._expert_topk(x, positions, seg, weights)
        else:
            x, aux, metrics = self._masked(x, positions, seg, weights)
        if c.has_ends:
            x = self.last(x, positions, segment_ids)
        return ModelOutput(logits=self.logits(x), aux_loss=aux, metrics=metrics)

    def _layers(self, r, x, positions, order, seg, valid, store):
        """Recursion r's K blocks on gathered tokens x [B, C, d] (original positions, causal
        order `order`, segments, valid [B, C]). Recursion-wise caching (store None): attention
        among the valid gathered tokens; returns the K/V each layer computed. KV sharing:
        store holds recursion 1's (k, v, order, seg) per layer, which the queries read."""
        computed = []
        for j, u in enumerate(self.config.schedule[r]):
            if store is None:
                mask = ((order[:, :, None] >= order[:, None, :])
                        & (seg[:, :, None] == seg[:, None, :]) & valid[:, None, :])[:, None]

                def attend(q, k, v, mask=mask):
                    computed.append((k, v, order, seg))
                    return masked_attention(q, k, v, mask)
            else:
                k0, v0, order0, seg0 = store[j]
                mask = ((order[:, :, None] >= order0[:, None, :])
                        & (seg[:, :, None] == seg0[:, None, :]))[:, None]

                def attend(q, k, v, k0=k0, v0=v0, mask=mask):
                    return masked_attention(q, k0, v0, mask)
            x = apply_block(self.shared[u], x, positions, attend)
        return x, computed

    def _expert_topk(self, x, positions, seg, weights, capacities=None):
        """Expert-choice training: hierarchical top-k, blocks on the gathered tokens only.

        capacities: traced [N_r] during capacity warmup. Every recursion then gathers all T
        tokens (a static size) and only the floor(capacities[r] T) highest-scoring of those
        the previous recursion kept are valid: the others are computed but neither update
        the stream, nor are attended to, nor count as selected."""
        c = self.config
        b, t, _ = x.shape
        rows = jnp.arange(b)[:, None]
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # previous selection
        kept = jnp.ones((b, t), bool)                                     # ... its valid part
        order = idx
        share = c.kv_strategy == "share"
        depth = jnp.zeros((b, t), jnp.int32)
        bce, z, acc, store = [], [], [], None
        for r, cap in enumerate(c.resolved_capacities):
            s = self.router(r, _take(x, idx))                  # scores of the kept tokens
            probs = c.resolved_alpha * jax.nn.sigmoid(s)
            if capacities is None:
                local, gate, valid = top_k_in_order(probs, max(1, int(cap * t)))
            else:
                k_now = jnp.maximum(1, jnp.floor(capacities[r] * t + 1e-6)).astype(jnp.int32)
                local, gate, valid = top_k_in_order(jnp.where(kept, probs, -1.0),
                                                    idx.shape[1], k_now)
            w = _take(weights, idx) * kept
            target = selection_targets(idx.shape[1], local, valid)
            bce.append(bce_with_logits(s, target, w))
            z.append(jnp.sum(s * s * w) / jnp.maximum(jnp.sum(w), 1.0))
            acc.append(jnp.sum(((s >= 0) == (target > 0)) * w) / jnp.maximum(jnp.sum(w), 1.0))
            if r == 0:
                dead = jnp.sum((s < 0) * w) / jnp.maximum(jnp.sum(w), 1.0)
            sel = _take(idx, local)
            if share and r == 0:
                # Every token computes recursion 1 (its K/V is what the deeper ones read).
                y, store = self._layers(r, x, positions, order, seg,
                                        jnp.ones((b, t), bool), None)
                y = _take(y, sel)
            else:
                y, _ = self._layers(r, _take(x, sel), _take(positions, sel), sel,
                                    _take(seg, sel), valid, store)
            gate = jnp.where(valid, gate, 0.0)
            x = x.at[rows, sel].add(gate[..., None].astype(x.dtype) * y)
            depth = depth.at[rows, sel].add(valid.astype(jnp.int32))
            idx, kept = sel, valid
        metrics = {"router_bce": jnp.stack(bce), "router_z_loss": jnp.stack(z),
                   "router_accuracy": jnp.stack(acc), "dead_token_ratio": dead,
                   "depth_histogram": self._histogram(depth, weights)}
        aux = c.bce_coef * sum(bce) + c.z_loss_coef * sum(z)
        return x, aux, metrics

    def warmup_capacities(self, forwards: jax.Array) -> jax.Array:
        """Capacities [N_r] after `forwards` training forwards: cosine from 1 to the targets
        over capacity_warmup_steps, then the targets."""
        c = self.config
        target = jnp.asarray(c.resolved_capacities, jnp.float32)
        done = jnp.minimum(forwards / c.capacity_warmup_steps, 1.0)
        return target + (1.0 - target) * 0.5 * (1.0 + jnp.cos(jnp.pi * done))

    def _expert_topk_warm(self, x, positions, seg, weights):
        """_expert_topk under capacity warmup; advances the forward count in training mode."""
        forwards = self.forwards[...]
        capacities = self.warmup_capacities(forwards)
        x, aux, metrics = jax.lax.cond(
            forwards < self.config.capacity_warmup_steps,
            lambda: self._expert_topk(x, positions, seg, weights, capacities),
            lambda: self._expert_topk(x, positions, seg, weights))
        if not self.deterministic:
            self.forwards[...] = forwards + 1
        return x, aux, {**metrics, "capacity": capacities}

    def _masked(self, x, positions, seg, weights):
        """Causal routing (expert threshold, token-choice, none) over all tokens with masks."""
        c = self.config
        b, t, _ = x.shape
        order = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        every = jnp.ones((b, t), bool)
        share = c.kv_strategy == "share"
        metrics, aux = {}, jnp.zeros((), jnp.float32)
        if c.router == "token":
            logits, choice, gate = self.router(x, c.resolved_alpha)
            balance, z = token_choice_losses(logits, choice, weights)
            if c.balancing == "loss":
                aux = c.balance_coef * balance + c.z_loss_coef * z
            else:
                aux = c.z_loss_coef * z
                metrics["router_bias"] = self.router.bias[...]
                if not self.deterministic:
                    self.router.update_bias(choice, weights, c.bias_update_rate)
            metrics.update(balance_loss=balance, router_z_loss=z)
        h, active, depth, store = x, every, jnp.zeros((b, t), jnp.int32), None
        for r in range(c.num_recursions):
            if c.router == "expert":
                s = self.router(r, x)
                active = active & (s >= 0)      # sigmoid(s) >= 0.5, after recursion r-1's
                gate = c.resolved_alpha * jax.nn.sigmoid(s)
                if r == 0:
                    metrics["dead_token_ratio"] = jnp.sum((s < 0) * weights) / jnp.maximum(
                        jnp.sum(weights), 1.0)
            elif c.router == "token":
                active = choice >= r + 1
            y, computed = self._layers(r, h, positions, order, seg,
                                       every if share and r == 0 else active, store)
            if share and r == 0:
                store = computed
            if c.router == "expert":
                h = x = jnp.where(active[..., None], x + gate[..., None].astype(x.dtype) * y, x)
            else:
                h = jnp.where(active[..., None], y, h)
            depth = depth + active
        if c.router == "token":
            x = x + gate[..., None].astype(x.dtype) * h
        elif c.router == "none":
            x = h
        metrics["depth_histogram"] = self._histogram(depth, weights)
        return x, aux, metrics

    def _histogram(self, depth, weights):
        """Fraction of (real) tokens that took 0..N_r recursions."""
        onehot = jax.nn.one_hot(depth, self.config.num_recursions + 1)
        return jnp.sum(onehot * weights[..., None], axis=(0, 1)) / jnp.maximum(
            jnp.sum(weights), 1.0)

    # -- decoding --------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int) -> mor_cache.MoRCache:
        c = self.config
        return mor_cache.init(
            batch_size, max_length, num_recursions=c.num_recursions,
            layers_per_recursion=c.layers_per_recursion, ends=2 if c.has_ends else 0,
            shared_kv=c.kv_strategy == "share", kv_heads=c.n_kv_heads,
            head_dim=c.resolved_head_dim, dtype=c.compute_dtype)

    def rewind(self, cache: mor_cache.MoRCache, lengths: jax.Array) -> mor_cache.MoRCache:
        return cache.rewind(lengths)

    def extend(self, tokens: jax.Array, cache: mor_cache.MoRCache, *,
               num_tokens: jax.Array | None = None):
        """Appends tokens [B, S] at each row's length with causal routing; logits [B, S, V]."""
        return mor_decode.extend(self, tokens, cache, num_tokens)
