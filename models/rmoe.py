"""RMoE: Layerwise Recurrent Router for Mixture-of-Experts (Qiu, Huang et al., ICLR 2025;
arXiv 2408.06793), and its SMoE baseline, on the Llama-style core of models/transformer.py.

Every block's MLP is a mixture of top-k routed SwiGLU experts (models/core/moe.py). The
router (models/core/router.py) is chosen by config:

  router_type="linear"  SMoE: logits_l = x_l W_l, each layer on its own.
  router_type="gru"     RMoE: x'_l = x_l W1_l, h_l = GRU(x'_l, h_{l-1}) with ONE cell shared
                        by all layers, logits_l = h_l W2_l; h passes layer to layer per token.
  router_type="rnn"     the same with a plain tanh RNN cell (the paper's cell ablation).
  state_passing         "full" (RMoE), "detached" (no gradient through h_{l-1}),
                        "none" (RMoE-NP: h_{l-1} = 0 at every layer).

Routing is per token (no recurrence over the sequence), so decoding keeps the plain KV cache
of the Transformer: `extend` runs the same routers on the new tokens and never drops a token,
which makes it equal `__call__` whenever training-time dispatch drops nothing (always for
the "ragged" and "dense" dispatches). aux_loss = balance_coef * mean_l(Switch loss_l) +
z_loss_coef * mean_l(z_l); metrics hold the per-layer expert load [L, E] and router
entropy [L], the balance and z losses and the dropped-slot fraction.
"""
import dataclasses

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from models.core import moe_dispatch, moe_routing, router as router_lib
from models.core.kv_cache import KVCache
from models.core.moe import MoE
from models.core.protocol import ModelOutput
from models.transformer import Block, Transformer, TransformerConfig


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RMoEConfig(TransformerConfig):
    """TransformerConfig plus the MoE layers and their router.

    expert_mlp_dim: hidden size of each SwiGLU expert (default d_model, as in the CompeteSMoE
      enwik8 models the paper's small runs use). shared_expert_dim: an always-on shared
      expert's hidden size (0: none), mixed 0.5/0.5 with the routed output as in the
      official code. router_dim: the GRU's p (the paper's best is 128).
    dispatch / capacity_factor: see models/core/moe_dispatch.py.
    balance_loss_coef: the Switch loss weight (0.01 in the paper's runs).
    """
    num_experts: int = 16
    top_k: int = 2
    expert_mlp_dim: int | None = None
    shared_expert_dim: int = 0
    router_type: str = "gru"
    state_passing: str = "full"
    router_dim: int = 128
    router_init_stddev: float = 0.02
    dispatch: str = "ragged"
    capacity_factor: float = 1.25
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        moe_routing.check_top_k(self.num_experts, self.top_k)
        router_lib.check_router(self.router_type, self.state_passing)
        moe_dispatch.check_dispatch(self.dispatch)
        for name in ("router_dim", "resolved_expert_mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be positive")

    @property
    def resolved_expert_mlp_dim(self) -> int:
        return self.expert_mlp_dim or self.d_model

    @property
    def recurrent(self) -> bool:
        """Whether router state passes between layers (so a forward must start at layer 0)."""
        return self.router_type != "linear" and self.state_passing != "none"


class MoEBlock(Block):
    """A pre-norm block whose MLP is an MoE layer with its own router (W or W1/W2)."""

    def __init__(self, config: RMoEConfig, *, windows=None, rngs: nnx.Rngs):
        c = config
        moe = MoE(c.d_model, c.resolved_expert_mlp_dim, c.num_experts, c.top_k,
                  dispatch=c.dispatch, capacity_factor=c.capacity_factor,
                  shared_hidden=c.shared_expert_dim,
                  out_stddev=0.02 / (2 * c.n_layers) ** 0.5, dtype=c.compute_dtype, rngs=rngs)
        super().__init__(c, windows=windows, mlp=moe, rngs=rngs)
        self.router = router_lib.LayerRouter(
            c.d_model, c.num_experts, router_type=c.router_type,
            state_passing=c.state_passing, router_dim=c.router_dim,
            init_stddev=c.router_init_stddev, rngs=rngs)

    def moe(self, x, state, cell, *, mask=None, dropless=False):
        """x + MoE(norm(x)); returns (x, router state h_l, MoEStats)."""
        h = self.mlp_norm(x)
        logits, state = self.router(h, state, cell)
        y, stats = self.mlp(h, logits, mask=mask, dropless=dropless)
        return x + y, state, stats

    def __call__(self, x, positions, segment_ids=None, *, state=None, cell=None, mask=None):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        return self.moe(x, state, cell, mask=mask)

    def extend(self, x, kv, lengths, *, state=None, cell=None):
        h, kv = self.attn.extend(self.attn_norm(x), kv, lengths)
        x, state, _ = self.moe(x + h, state, cell, dropless=True)
        return x, kv, state


def _summarise(stats, config: RMoEConfig) -> tuple[jax.Array, dict]:
    """aux_loss and metrics from the per-layer MoEStats."""
    stack = jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
    balance, z = jnp.mean(stack.balance_loss), jnp.mean(stack.z_loss)
    aux = config.balance_loss_coef * balance + config.z_loss_coef * z
    metrics = {"balance_loss": balance, "router_z_loss": z, "expert_load": stack.load,
               "router_entropy": stack.entropy, "dropped_fraction": jnp.mean(stack.dropped)}
    return aux, metrics


class RMoE(Transformer):
    """MoE Transformer with a linear (SMoE) or layerwise recurrent (RMoE) router."""

    def __init__(self, config: RMoEConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, RMoEConfig):
            raise ValueError(f"RMoE needs an RMoEConfig, got {type(config).__name__}")
        super().__init__(config, rngs=rngs)
        self.cell = (router_lib.RecurrentCell(config.router_dim, config.router_type, rngs=rngs)
                     if config.router_type != "linear" else None)

    def make_block(self, layer: int, windows, rngs: nnx.Rngs) -> MoEBlock:
        del layer
        return MoEBlock(self.config, windows=windows, rngs=rngs)

    # -- training --------------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> ModelOutput:
        x, stats = self._forward(self.embed(tokens), 0, self.config.n_layers,
                                 segment_ids=segment_ids, positions=positions)
        aux, metrics = _summarise(stats, self.config)
        return ModelOutput(logits=self.logits(x), aux_loss=aux, metrics=metrics)

    def hidden_from(self, x: jax.Array, start: int, stop: int, *,
                    segment_ids: jax.Array | None = None,
                    positions: jax.Array | None = None) -> jax.Array:
        return self._forward(x, start, stop, segment_ids=segment_ids, positions=positions)[0]

    def _check_start(self, name: str, start: int) -> None:
        if start and self.config.recurrent:
            raise ValueError(f"{name}={start}: the recurrent router's state comes from the "
                             "layers before it, so RMoE with state passing runs from layer 0; "
                             "use router_type='linear' or state_passing='none' to start later")

    def _forward(self, x, start, stop, *, segment_ids, positions):
        self._check_layer("start", start, low=0)
        self._check_layer("stop", stop, low=start)
        self._check_start("start", start)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        mask = None if segment_ids is None else segment_ids > 0   # packing pads with id 0
        state, stats = None, []
        for block in self.blocks[start:stop]:
            x, state, s = block(x, positions, segment_ids, state=state, cell=self.cell,
                                mask=mask)
            stats.append(s)
        return x, stats

    # -- decoding --------------------------------------------------------------------------
    # extend / extend_trunk come from Transformer and run through this hook.
    def extend_from(self, hidden, cache, *, start_layer: int, num_tokens=None):
        self._check_start("start_layer", start_layer)
        return super().extend_from(hidden, cache, start_layer=start_layer,
                                   num_tokens=num_tokens)

    def _extend_blocks(self, x, cache: KVCache, start: int, stop: int, num_tokens):
        layers, state = list(cache.layers), None
        for i in range(start, stop):
            x, layers[i], state = self.blocks[i].extend(x, layers[i], cache.lengths,
                                                        state=state, cell=self.cell)
        added = x.shape[1] if num_tokens is None else jnp.asarray(num_tokens, jnp.int32)
        return x, KVCache(layers=tuple(layers), lengths=cache.lengths + added)

    # -- bookkeeping -----------------------------------------------------------------------
    def num_active_params(self, *, non_embedding: bool = False) -> int:
        """Parameters a token uses: the routed experts count k / E of theirs."""
        c = self.config
        per_expert = 3 * c.d_model * c.resolved_expert_mlp_dim
        inactive = c.n_layers * (c.num_experts - c.top_k) * per_expert
        return self.num_params(non_embedding=non_embedding) - inactive
