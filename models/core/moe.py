"""A mixture-of-experts feed-forward layer: top-k routed SwiGLU experts plus an optional shared
expert, usable by any model family (Shazeer et al. 2017, arXiv 1701.06538; Mixtral routing,
arXiv 2401.04088; Switch balance loss, arXiv 2101.03961; ST-MoE z-loss, arXiv 2202.08906).

The layer takes the router's logits as an argument rather than owning a router, so that a
family can compute them however it likes (a linear map per layer, or RMoE's layerwise GRU,
arXiv 2408.06793). Routing and its losses live in moe_routing.py, the dispatch
implementations in moe_dispatch.py; expert weights carry the `expert` logical axis, which
train/sharding.py maps onto a mesh axis (expert parallelism).
"""
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from models.core import moe_dispatch, moe_routing
from models.core.mlp import SwiGLU
from models.core.params import param


@flax.struct.dataclass
class MoEStats:
    """One layer's router statistics (scalars unless noted)."""
    balance_loss: jax.Array   # Switch loss, 1.0 at perfect balance
    z_loss: jax.Array
    load: jax.Array           # [E] fraction of token-slots per expert
    entropy: jax.Array        # mean router entropy in nats (log E = uniform)
    dropped: jax.Array        # fraction of token-slots dropped by the capacity dispatch


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts, out = moe_weight * routed + shared_weight * shared(x).

    dispatch: one of moe_dispatch.DISPATCHES. shared_hidden: hidden size of an always-on
    shared SwiGLU expert (0: none); moe_weight / shared_weight are the official RMoE code's
    mixing weights and only apply when the shared expert exists.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, *,
                 dispatch: str = "ragged", capacity_factor: float = 1.25,
                 shared_hidden: int = 0, moe_weight: float = 0.5, shared_weight: float = 0.5,
                 out_stddev: float = 0.02, dtype=jnp.float32, rngs: nnx.Rngs):
        moe_routing.check_top_k(num_experts, top_k)
        self.dispatch = moe_dispatch.check_dispatch(dispatch)
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be positive")
        if shared_hidden < 0:
            raise ValueError(f"shared_hidden={shared_hidden} must be >= 0 (0: no shared expert)")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor
        self.dtype = dtype
        self.gate = param(rngs, (num_experts, dim, hidden), ("expert", "embed", "mlp"))
        self.up = param(rngs, (num_experts, dim, hidden), ("expert", "embed", "mlp"))
        self.down = param(rngs, (num_experts, hidden, dim), ("expert", "mlp", "embed"),
                          stddev=out_stddev)
        self.shared = (SwiGLU(dim, shared_hidden, out_stddev=out_stddev, dtype=dtype, rngs=rngs)
                       if shared_hidden else None)
        self.moe_weight, self.shared_weight = moe_weight, shared_weight

    def __call__(self, x: jax.Array, logits: jax.Array, *, mask: jax.Array | None = None,
                 dispatch: str | None = None, dropless: bool = False
                 ) -> tuple[jax.Array, MoEStats]:
        """x [..., d] and router logits [..., E] -> (out [..., d], stats).

        mask [...]: real tokens (packed-batch padding is excluded from the statistics and,
        in the capacity dispatch, from capacity). dispatch overrides the layer's own (tests
        compare against "dense"). dropless: never drop (decoding; C = N for "capacity").
        """
        lead, d = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, d).astype(self.dtype)
        mf = None if mask is None else mask.reshape(-1)
        routing = moe_routing.route(logits.reshape(-1, logits.shape[-1]), self.top_k)
        weights = [w[...].astype(self.dtype) for w in (self.gate, self.up, self.down)]
        how = moe_dispatch.check_dispatch(dispatch or self.dispatch)
        if how == "capacity":
            out, dropped = moe_dispatch.capacity_limited(
                xf, routing.weights, routing.experts, *weights,
                capacity_factor=self.capacity_factor, dropless=dropless, mask=mf)
        else:
            fn = moe_dispatch.ragged if how == "ragged" else moe_dispatch.dense
            out, dropped = fn(xf, routing.weights, routing.experts, *weights)
        if self.shared is not None:
            out = self.moe_weight * out + self.shared_weight * self.shared(xf)
        stats = MoEStats(balance_loss=moe_routing.balance_loss(routing, mf),
                         z_loss=moe_routing.z_loss(routing, mf),
                         load=moe_routing.expert_load(routing, mf),
                         entropy=moe_routing.entropy(routing, mf), dropped=dropped)
        return out.reshape(*lead, d).astype(x.dtype), stats
