"""The mixture-of-experts core (models/core/moe*.py): every dispatch against the dense
all-experts reference (outputs and gradients), capacity dropping against a host reference of
which slots fit, the router losses and statistics on hand-built cases, and bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.core import moe_dispatch, moe_routing
from models.core.moe import MoE
from models.core.router import LayerRouter, RecurrentCell
from tests import tolerances

N, D, H, E, K = 48, 16, 24, 8, 2


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                               atol=tolerances.F32, rtol=tolerances.F32)


@pytest.fixture(scope="module")
def inputs():
    # Host-side random draws: eager jax ops would each compile.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    logits = 2.0 * rng.normal(size=(N, E)).astype(np.float32)
    gate = (rng.normal(size=(E, D, H)) * D ** -0.5).astype(np.float32)
    up = (rng.normal(size=(E, D, H)) * D ** -0.5).astype(np.float32)
    down = (rng.normal(size=(E, H, D)) * H ** -0.5).astype(np.float32)
    routing = jax.jit(moe_routing.route, static_argnums=1)(logits, K)
    return x, routing, (gate, up, down)


def _run(name, **kwargs):
    fn = {"dense": moe_dispatch.dense, "ragged": moe_dispatch.ragged,
          "capacity": lambda *a: moe_dispatch.capacity_limited(*a, **kwargs)}[name]
    return jax.jit(lambda x, w, e, g, u, d: fn(x, w, e, g, u, d))


def _kept_slots(experts: np.ndarray, cap: int) -> np.ndarray:
    """Host reference of capacity dropping: slots in (choice, token) order, first come first
    served per expert. bool [N, K]."""
    kept, used = np.zeros(experts.shape, bool), np.zeros(E, int)
    for j in range(experts.shape[1]):
        for t in range(experts.shape[0]):
            e = experts[t, j]
            if used[e] < cap:
                kept[t, j], used[e] = True, used[e] + 1
    return kept


def test_routing_is_softmax_top_k_renormalised(inputs):
    _, routing, _ = inputs
    probs = np.asarray(jax.nn.softmax(routing.logits, axis=-1))
    top = np.argsort(-probs, axis=-1)[:, :K]
    np.testing.assert_array_equal(np.asarray(routing.experts), top)
    chosen = np.take_along_axis(probs, top, axis=-1)
    _close(routing.weights, chosen / chosen.sum(-1, keepdims=True))


@jax.jit
def _dropless_and_dense(x, weights, experts, gate, up, down):
    """Every dropless dispatch's output and gradients (one compilation)."""
    def run(fn):
        def loss(x, w, g, u, d):
            out, dropped = fn(x, w, experts, g, u, d)
            return jnp.sum(jnp.sin(out)), (out, dropped)
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
            x, weights, gate, up, down)
        return out, grads

    # Capacity with a factor of E/k gives every expert room for all N tokens.
    capacity = lambda *a: moe_dispatch.capacity_limited(*a, capacity_factor=E / K)
    return {name: run(fn) for name, fn in (("dense", moe_dispatch.dense),
                                           ("ragged", moe_dispatch.ragged),
                                           ("capacity", capacity))}


def test_dropless_dispatches_match_dense_reference_outputs_and_gradients(inputs):
    x, routing, weights = inputs
    results = _dropless_and_dense(x, routing.weights, routing.experts, *weights)
    (reference, _), ref_grads = results["dense"]
    for name in ("ragged", "capacity"):
        (out, dropped), grads = results[name]
        _close(out, reference)
        assert float(dropped) == 0.0
        for a, b in zip(grads, ref_grads):
            _close(a, b)


def test_capacity_drops_exactly_the_overflowing_slots(inputs):
    x, routing, (gate, up, down) = inputs
    cf = 0.5
    cap = moe_dispatch.capacity(N, E, K, cf)
    assert cap == math.ceil(cf * N * K / E)
    out, dropped = _run("capacity", capacity_factor=cf)(
        x, routing.weights, routing.experts, gate, up, down)
    kept = _kept_slots(np.asarray(routing.experts), cap)
    assert 0 < float(dropped) == pytest.approx(1 - kept.mean())
    # Dropped slots contribute zero: the dense reference with their weights zeroed.
    reference, _ = _run("dense")(x, routing.weights * kept, routing.experts, gate, up, down)
    _close(out, reference)
    # Masked (padding) tokens take no capacity and output zero.
    mask = jnp.arange(N) % 3 != 0
    out, _ = jax.jit(lambda *a: moe_dispatch.capacity_limited(
        *a, capacity_factor=cf, mask=mask))(x, routing.weights, routing.experts, gate, up, down)
    real = np.asarray(mask)
    kept = np.zeros((N, K), bool)
    kept[real] = _kept_slots(np.asarray(routing.experts)[real], cap)
    reference, _ = _run("dense")(x, routing.weights * kept, routing.experts, gate, up, down)
    _close(out, reference)


@jax.jit
def _statistics(routing, mask):
    return {"balance": moe_routing.balance_loss(routing), "load": moe_routing.expert_load(routing),
            "entropy": moe_routing.entropy(routing), "z": moe_routing.z_loss(routing),
            "masked_load": moe_routing.expert_load(routing, mask)}


def test_losses_and_statistics_on_hand_built_routings():
    # Perfect balance: token t goes to experts (t, t+1) mod E with uniform probabilities.
    t = np.arange(E)
    mask = t < 4
    experts = np.stack([t, (t + 1) % E], axis=1).astype(np.int32)
    uniform = moe_routing.Routing(probs=np.full((E, E), 1 / E, np.float32),
                                  weights=np.full((E, K), .5, np.float32), experts=experts,
                                  logits=np.zeros((E, E), np.float32))
    stats = _statistics(uniform, mask)
    assert float(stats["balance"]) == pytest.approx(1.0)
    _close(stats["load"], np.full(E, 1 / E))
    assert float(stats["entropy"]) == pytest.approx(math.log(E))
    assert float(stats["z"]) == pytest.approx(math.log(E) ** 2)
    # A mask keeps only the masked-in tokens: tokens 0..3 only use experts 0..4.
    _close(stats["masked_load"], np.array([1, 2, 2, 2, 1, 0, 0, 0]) / 8)
    # Collapse: every token on experts 0 and 1 with all probability there -> loss E/2.
    probs = np.zeros((E, E), np.float32)
    probs[:, :2] = 0.5
    collapsed = moe_routing.Routing(probs=probs, weights=np.full((E, K), .5, np.float32),
                                    experts=np.tile(np.array([[0, 1]], np.int32), (E, 1)),
                                    logits=np.log(np.maximum(probs, 1e-9)))
    stats = _statistics(collapsed, mask)
    assert float(stats["balance"]) == pytest.approx(E / 2)
    assert float(stats["entropy"]) == pytest.approx(math.log(2))


def test_moe_layer_shared_expert_and_dispatch_override(inputs):
    x, _, _ = inputs
    x = x[:10].reshape(2, 5, D)
    logits = np.random.default_rng(1).normal(size=(2, 5, E)).astype(np.float32)

    @nnx.jit
    def run(x, logits):
        layer = MoE(D, H, E, K, shared_hidden=8, rngs=nnx.Rngs(0))
        out, stats = layer(x, logits)
        ref, _ = layer(x, logits, dispatch="dense")
        r = moe_routing.route(logits.reshape(-1, E), K)
        routed, _ = moe_dispatch.dense(x.reshape(-1, D), r.weights, r.experts,
                                       layer.gate[...], layer.up[...], layer.down[...])
        return out, stats, ref, 0.5 * routed + 0.5 * layer.shared(x.reshape(-1, D))

    out, stats, ref, mixed = run(x, logits)
    _close(out, ref)
    assert out.shape == x.shape and stats.load.shape == (E,)
    _close(out.reshape(-1, D), mixed)


def test_bad_input_names_value_and_choices():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"top_k=5 must be in \[1, num_experts=4\]"):
        MoE(8, 8, 4, 5, rngs=rngs)
    with pytest.raises(ValueError, match="num_experts=0 must be at least 1"):
        MoE(8, 8, 0, 1, rngs=rngs)
    with pytest.raises(ValueError, match=r"unknown MoE dispatch 'sorted'.*'ragged'"):
        MoE(8, 8, 4, 2, dispatch="sorted", rngs=rngs)
    with pytest.raises(ValueError, match=r"unknown router_type 'lstm'.*'gru'"):
        LayerRouter(8, 4, router_type="lstm", rngs=rngs)
    with pytest.raises(ValueError, match=r"unknown state_passing 'some'.*'detached'"):
        LayerRouter(8, 4, router_type="gru", state_passing="some", rngs=rngs)
    with pytest.raises(ValueError, match=r"unknown recurrent cell 'lstm'"):
        RecurrentCell(8, "lstm", rngs=rngs)


def test_recurrent_cells_follow_the_gru_and_rnn_equations():
    p = 6
    rng = np.random.default_rng(2)
    x, h = rng.normal(size=(4, p)).astype(np.float32), rng.normal(size=(4, p)).astype(np.float32)

    @nnx.jit
    def cells(x, h):
        gru, rnn = RecurrentCell(p, "gru", rngs=nnx.Rngs(0)), RecurrentCell(p, "rnn", rngs=nnx.Rngs(1))
        params = [[w[...] for w in (c.w_i, c.w_h, c.b_i, c.b_h)] for c in (gru, rnn)]
        return gru(x, h), rnn(x, h), params

    gru_out, rnn_out, ((wi, wh, bi, bh), (vi, vh, ci, ch)) = cells(x, h)
    wi, wh, bi, bh, vi, vh, ci, ch = map(np.asarray, (wi, wh, bi, bh, vi, vh, ci, ch))
    sig = lambda v: 1 / (1 + np.exp(-v))
    gi, gh = x @ wi + bi, h @ wh + bh
    r, z = sig(gi[:, :p] + gh[:, :p]), sig(gi[:, p:2 * p] + gh[:, p:2 * p])
    n = np.tanh(gi[:, 2 * p:] + r * gh[:, 2 * p:])
    _close(gru_out, (1 - z) * n + z * h)
    _close(rnn_out, np.tanh(x @ vi + ci + h @ vh + ch))
