"""MoE routers: the plain linear router (one matrix per layer, the SMoE baseline) and the
layerwise recurrent router of RMoE (Qiu, Huang et al., ICLR 2025; arXiv 2408.06793).

RMoE's router at MoE layer l, on the normalised MLP input x_l of each token:

    x'_l = x_l W1_l                   per-layer projection d -> p (no bias)
    h_l  = cell(x'_l, h_{l-1})        ONE GRU (or tanh RNN) cell shared by every layer
    logits_l = h_l W2_l               per-layer projection p -> E (no bias)

h runs across layers, per token, never across the sequence, so every token is still
routed in parallel and decoding needs no extra cache. h_0 = 0. The ablations of the paper
are `state_passing`: "full" (gradients flow through h), "detached" (h_{l-1} is a constant to
layer l), "none" (RMoE-NP: every layer starts from h = 0, so only the shared cell remains).

Initialisation: the official HF port creates W1/W2 with torch.empty and never initialises
them (spec pitfall 3); here they are N(0, init_stddev). The cell's weights follow
torch.nn.GRUCell's scale (std 1/sqrt(p)) with zero biases.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from models.core.params import param

ROUTER_TYPES = ("linear", "gru", "rnn")
STATE_PASSING = ("full", "detached", "none")


def check_router(router_type: str, state_passing: str) -> None:
    if router_type not in ROUTER_TYPES:
        raise ValueError(f"unknown router_type {router_type!r}; valid: {ROUTER_TYPES}")
    if state_passing not in STATE_PASSING:
        raise ValueError(f"unknown state_passing {state_passing!r}; valid: {STATE_PASSING}")


class RecurrentCell(nnx.Module):
    """GRU cell (torch.nn.GRUCell's equations) or a tanh RNN cell, input size = hidden = p.

    GRU:  r = sigma(x W_ir + b_ir + h W_hr + b_hr),  z = sigma(x W_iz + b_iz + h W_hz + b_hz)
          n = tanh(x W_in + b_in + r * (h W_hn + b_hn)),  h' = (1 - z) * n + z * h
    RNN:  h' = tanh(x W_in + b_in + h W_hn + b_hn)
    The gates' matrices are stored side by side ([p, 3p] for the GRU).
    """

    def __init__(self, dim: int, kind: str = "gru", *, rngs: nnx.Rngs):
        if kind not in ("gru", "rnn"):
            raise ValueError(f"unknown recurrent cell {kind!r}; valid: ('gru', 'rnn')")
        self.kind, self.dim = kind, dim
        gates = 3 if kind == "gru" else 1
        std = dim ** -0.5
        self.w_i = param(rngs, (dim, gates * dim), ("router", None), stddev=std)
        self.w_h = param(rngs, (dim, gates * dim), ("router", None), stddev=std)
        self.b_i = param(rngs, (gates * dim,), (None,), init="zeros")
        self.b_h = param(rngs, (gates * dim,), (None,), init="zeros")

    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        gi = x @ self.w_i[...] + self.b_i[...]
        gh = h @ self.w_h[...] + self.b_h[...]
        if self.kind == "rnn":
            return jnp.tanh(gi + gh)
        p = self.dim
        r = jax.nn.sigmoid(gi[..., :p] + gh[..., :p])
        z = jax.nn.sigmoid(gi[..., p:2 * p] + gh[..., p:2 * p])
        n = jnp.tanh(gi[..., 2 * p:] + r * gh[..., 2 * p:])
        return (1.0 - z) * n + z * h


class LayerRouter(nnx.Module):
    """One layer's router. linear: logits = x W. gru / rnn: W1, the shared cell, W2."""

    def __init__(self, dim: int, num_experts: int, *, router_type: str = "linear",
                 state_passing: str = "full", router_dim: int = 128,
                 init_stddev: float = 0.02, rngs: nnx.Rngs):
        check_router(router_type, state_passing)
        self.router_type, self.state_passing = router_type, state_passing
        if router_type == "linear":
            self.w = param(rngs, (dim, num_experts), ("embed", None), stddev=init_stddev)
        else:
            self.w_in = param(rngs, (dim, router_dim), ("embed", "router"), stddev=init_stddev)
            self.w_out = param(rngs, (router_dim, num_experts), ("router", None),
                               stddev=init_stddev)

    def __call__(self, x: jax.Array, state: jax.Array | None, cell: RecurrentCell | None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """x [..., d] (f32 routing), state h_{l-1} [..., p] or None at the first layer ->
        (logits [..., E], h_l or None for the linear router)."""
        x = x.astype(jnp.float32)
        if self.router_type == "linear":
            return x @ self.w[...], None
        xp = x @ self.w_in[...]
        if state is None or self.state_passing == "none":
            state = jnp.zeros(xp.shape, jnp.float32)
        elif self.state_passing == "detached":
            state = jax.lax.stop_gradient(state)
        h = cell(xp, state)
        return h @ self.w_out[...], h
