"""Top-k token routing for mixture-of-experts layers and the router's losses and statistics.

Routing follows Mixtral (Jiang et al. 2024, arXiv 2401.04088): softmax over all E expert
logits, keep the k largest probabilities, renormalise them to sum to one. The losses are the
Switch Transformer load-balancing loss (Fedus et al. 2021, arXiv 2101.03961) and the ST-MoE
router z-loss (Zoph et al. 2022, arXiv 2202.08906). Every statistic takes an optional token
mask so packed-batch padding neither balances nor is balanced.
"""
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Routing:
    """One layer's routing decision for N tokens."""
    probs: jax.Array     # f32 [N, E]: softmax over all experts
    weights: jax.Array   # f32 [N, k]: renormalised top-k probabilities
    experts: jax.Array   # int32 [N, k]: chosen experts, most probable first
    logits: jax.Array    # f32 [N, E]: the router's raw logits (for the z-loss)


def check_top_k(num_experts: int, top_k: int) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be at least 1")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")


def route(logits: jax.Array, top_k: int) -> Routing:
    """softmax -> top-k -> renormalise, in f32 whatever the compute dtype."""
    check_top_k(logits.shape[-1], top_k)
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(probs=probs, weights=weights, experts=experts.astype(jnp.int32),
                   logits=logits)


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over the leading (token) axis, counting only tokens where mask is true."""
    if mask is None:
        return jnp.mean(values, axis=0)
    m = mask.astype(jnp.float32).reshape((-1,) + (1,) * (values.ndim - 1))
    return jnp.sum(values * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)


def expert_load(routing: Routing, mask: jax.Array | None = None) -> jax.Array:
    """f32 [E]: the fraction of routed token-slots each expert receives (sums to 1)."""
    num_experts = routing.probs.shape[-1]
    counts = jnp.sum(jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32), axis=1)
    return _masked_mean(counts, mask) / routing.experts.shape[-1]


def balance_loss(routing: Routing, mask: jax.Array | None = None) -> jax.Array:
    """Switch-style E * sum_e f_e * P_e: f_e the slot fraction of expert e, P_e its mean router
    probability. 1.0 at perfect balance. Unlike the HF Mixtral code the RMoE port copies
    (spec pitfall 4), f is divided by k, so the loss does not scale with k."""
    num_experts = routing.probs.shape[-1]
    return num_experts * jnp.sum(expert_load(routing, mask) * _masked_mean(routing.probs, mask))


def z_loss(routing: Routing, mask: jax.Array | None = None) -> jax.Array:
    """mean_t logsumexp(logits_t)^2: keeps router logits small (ST-MoE)."""
    return _masked_mean(jax.nn.logsumexp(routing.logits, axis=-1) ** 2, mask)


def entropy(routing: Routing, mask: jax.Array | None = None) -> jax.Array:
    """Mean per-token entropy (nats) of the router's softmax; log E is uniform routing."""
    p = routing.probs
    return _masked_mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1), mask)
