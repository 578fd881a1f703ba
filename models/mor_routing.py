"""The routers of Mixture-of-Recursions (arXiv 2507.10524, Eq. 1 and 2; official code
`model/mor_model/{expert,token}_choice_router.py`), used by models/mor.py.

Expert-choice: one linear router d -> 1 per recursion (std 0.02, no bias) on the hidden state
entering that recursion: s = theta_r . H^r / temp, gate g = alpha * sigmoid(s). In training each
recursion keeps the top k_r = max(1, floor(c_r T)) of the tokens the previous recursion kept
(hierarchical filtering, k_r relative to the full T), re-sorted to causal order. An auxiliary
BCE between s and "was selected" (normalised by the number of scored tokens, coefficient
0.001) teaches the router the causal rule used at inference: continue iff sigmoid(s) >= 0.5.

Token-choice: one router d -> N_r on H^1 (the state entering recursion 1); softmax * alpha,
top-1 picks the depth i, the token runs recursions 1..i. Balancing loss sum_i f_i P_i (f_i =
N_r x fraction of tokens sent to depth i, P_i = mean probability of i) and z-loss
mean(logsumexp(logits)^2), or loss-free balancing (Wang et al., arXiv 2408.15664; the official
code's `token_balancing="loss_free"`): a bias b_i added to the probabilities for the choice
only (the gate keeps the unbiased probability), moved after every training forward by
u * sign(mean_i e_i - e_i) where e_i counts the tokens sent to depth i. Per-token routing is
causal as it stands.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from models.core.params import TrainingState, param


class ExpertRouters(nnx.Module):
    """One d -> 1 router per recursion."""

    def __init__(self, d_model: int, num_recursions: int, *, stddev: float, temp: float,
                 rngs: nnx.Rngs):
        self.temp = temp
        self.w = param(rngs, (num_recursions, d_model), (None, "embed"), stddev=stddev)

    def __call__(self, r: int, x: jax.Array) -> jax.Array:
        """Router logits s (f32, x's leading shape) of recursion r (0-based) for x [..., d]."""
        return jnp.einsum("...d,d->...", x.astype(jnp.float32), self.w[r]) / self.temp


class TokenRouter(nnx.Module):
    """One d -> N_r router choosing each token's depth."""

    def __init__(self, d_model: int, num_recursions: int, *, stddev: float, loss_free: bool,
                 rngs: nnx.Rngs):
        self.w = param(rngs, (d_model, num_recursions), ("embed", None), stddev=stddev)
        self.bias = (TrainingState(jnp.zeros((num_recursions,), jnp.float32)) if loss_free
                     else None)

    def __call__(self, x: jax.Array, alpha: float):
        """(logits [..., N_r], depth int32 [...] in 1..N_r, gate [...] = alpha * p_depth)."""
        logits = jnp.einsum("...d,dn->...n", x.astype(jnp.float32), self.w[...])
        probs = jax.nn.softmax(logits, axis=-1)
        scores = probs if self.bias is None else probs + self.bias[...]
        choice = jnp.argmax(scores, axis=-1)
        gate = alpha * jnp.take_along_axis(probs, choice[..., None], axis=-1)[..., 0]
        return logits, choice.astype(jnp.int32) + 1, gate

    def update_bias(self, depth: jax.Array, weights: jax.Array, rate: float) -> None:
        """Loss-free balancing: b_i += rate * sign(mean e - e_i) for the depths [B, T] (1-based)
        the tokens with weight 1 were sent to."""
        load = jnp.sum(jax.nn.one_hot(depth - 1, self.w.shape[1]) * weights[..., None],
                       axis=(0, 1))
        self.bias[...] = self.bias[...] + rate * jax.lax.stop_gradient(
            jnp.sign(jnp.mean(load) - load))


def top_k_in_order(probs: jax.Array, k: int, k_now: jax.Array | None = None):
    """The k largest of probs [B, C] per row, as (indices [B, k] in increasing (causal) order,
    their values, valid [B, k]). k is static; k_now (traced, <= k; capacity warmup) marks only
    the k_now highest-scoring of them valid."""
    _, by_score = jax.lax.top_k(probs, k)
    ranked = jnp.broadcast_to(jnp.arange(k) < (k if k_now is None else k_now), by_score.shape)
    order = jnp.argsort(by_score, axis=1)
    idx = jnp.take_along_axis(by_score, order, axis=1)
    return idx, jnp.take_along_axis(probs, idx, axis=1), jnp.take_along_axis(ranked, order, 1)


def selection_targets(num: int, idx: jax.Array, valid: jax.Array) -> jax.Array:
    """1.0 at the valid selected indices idx [B, k] of rows of `num` tokens, else 0.0."""
    rows = jnp.arange(idx.shape[0])[:, None]
    return jnp.zeros((idx.shape[0], num), jnp.float32).at[rows, idx].set(
        valid.astype(jnp.float32))


def bce_with_logits(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean (over weighted entries) binary cross-entropy of logits against 0/1 targets."""
    per = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def token_choice_losses(logits: jax.Array, depth: jax.Array, weights: jax.Array):
    """(balancing loss, z-loss) of token-choice logits [B, T, N_r], depths [B, T] in 1..N_r,
    over the tokens with weight 1."""
    n = logits.shape[-1]
    total = jnp.maximum(jnp.sum(weights), 1.0)
    onehot = jax.nn.one_hot(depth - 1, n) * weights[..., None]
    f = n * jnp.sum(onehot, axis=(0, 1)) / total
    p = jnp.sum(jax.nn.softmax(logits, axis=-1) * weights[..., None], axis=(0, 1)) / total
    z = jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2 * weights) / total
    return jnp.sum(f * p), z
