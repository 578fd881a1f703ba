"""RMoE (arXiv 2408.06793) and its SMoE baseline: decoding (extend token by token, in chunks,
ragged rows; greedy speculative decoding) equals the full forward pass, the MoE dispatches
agree through the whole model, gradients flow through the router state passed between layers
(and not when it is detached or not passed), the losses and metrics, and bad configs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decoding.generate import generate
from models import registry
from models.rmoe import RMoE, RMoEConfig
from tests import tolerances
from tests.decoding import helpers

CONFIG = RMoEConfig(vocab_size=helpers.VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    num_experts=4, top_k=2, expert_mlp_dim=16, router_dim=16)
T, MAX_LENGTH = 20, 32

_forward = nnx.jit(lambda m, tokens: m(tokens))
_extend = nnx.jit(lambda m, tokens, cache: m.extend(tokens, cache))
_extend_ragged = nnx.jit(lambda m, tokens, cache, n: m.extend(tokens, cache, num_tokens=n))


@pytest.fixture(scope="module")
def model() -> RMoE:
    return registry.construct(RMoE, CONFIG, seed=0)


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, T), dtype=np.int32)


@pytest.fixture(scope="module")
def full(model, tokens):
    return _forward(model, tokens)


def _same_weights(model, **overrides):
    """A model with `model`'s parameters and a config differing in `overrides` (routers of
    the same type have the same parameter tree)."""
    config = dataclasses.replace(CONFIG, **overrides)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: RMoE(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                               atol=tolerances.F32, rtol=tolerances.F32)


def test_extend_token_by_token_in_chunks_and_ragged_equals_forward(model, tokens, full):
    cache = model.init_cache(2, MAX_LENGTH)
    steps = []
    for t in range(T):
        logits, cache = _extend(model, tokens[:, t:t + 1], cache)
        steps.append(logits)
    _close(jnp.concatenate(steps, axis=1), full.logits)

    cache, chunks = model.init_cache(2, MAX_LENGTH), []
    for lo in range(0, T, 5):
        logits, cache = _extend(model, tokens[:, lo:lo + 5], cache)
        chunks.append(logits)
    _close(jnp.concatenate(chunks, axis=1), full.logits)

    # Row 0 holds 10 tokens, row 1 only 5 (right-padded); then both extend at their offsets.
    prefix = np.concatenate([tokens[:1, :10], np.pad(tokens[1:, :5], ((0, 0), (0, 5)))])
    _, cache = _extend_ragged(model, prefix, model.init_cache(2, MAX_LENGTH),
                              jnp.array([10, 5], jnp.int32))
    step = np.stack([tokens[0, 10:15], tokens[1, 5:10]])
    logits, cache = _extend(model, step, cache)
    _close(logits[0], full.logits[0, 10:15])
    _close(logits[1], full.logits[1, 5:10])
    np.testing.assert_array_equal(cache.lengths, [15, 10])


def test_capacity_dispatch_agrees_through_the_model_and_metrics_are_sane(model, tokens, full):
    # capacity_factor 2 = E / k: room for every token, so nothing drops.
    out = _forward(_same_weights(model, dispatch="capacity", capacity_factor=2.0), tokens)
    _close(out.logits, full.logits)
    assert float(out.metrics["dropped_fraction"]) == 0.0
    m = full.metrics
    assert m["expert_load"].shape == (2, 4) and m["router_entropy"].shape == (2,)
    _close(jnp.sum(m["expert_load"], axis=-1), np.ones(2))
    assert np.all(np.asarray(m["router_entropy"]) <= np.log(4) + 1e-6)
    assert float(m["balance_loss"]) >= 1.0 - 1e-6
    _close(full.aux_loss, CONFIG.balance_loss_coef * m["balance_loss"]
           + CONFIG.z_loss_coef * m["router_z_loss"])


def _router_gradient(model):
    """d(sum of the last layer's router logits^2) / d(first layer's W1)."""
    graphdef, params = nnx.split(model)
    x = jax.random.normal(jax.random.key(2), (5, CONFIG.d_model))

    def last_logits(params):
        m = nnx.merge(graphdef, params)
        state = None
        for block in m.blocks:
            logits, state = block.router(x, state, m.cell)
        return jnp.sum(logits ** 2)

    grads = jax.jit(jax.grad(last_logits))(params)
    return np.asarray(nnx.merge(graphdef, grads).blocks[0].router.w_in[...])


def test_gradients_flow_through_the_passed_state_only_when_attached(model):
    assert np.abs(_router_gradient(model)).max() > 1e-6
    for passing in ("detached", "none"):
        assert np.abs(_router_gradient(_same_weights(model, state_passing=passing))).max() == 0
    # The ablations route differently from RMoE with the same weights.
    no_passing = _same_weights(model, state_passing="none")
    assert no_passing.config.recurrent is False and model.config.recurrent is True


def test_linear_router_smoe_decodes_like_its_forward(tokens):
    config = dataclasses.replace(CONFIG, router_type="linear", n_layers=1)
    m = registry.build("rmoe", config, seed=3)
    assert m.cell is None and not config.recurrent
    full, (logits, _) = nnx.jit(lambda m, t: (m(t), m.extend(t, m.init_cache(2, MAX_LENGTH))))(
        m, tokens[:, :8])
    _close(logits, full.logits)


def test_speculative_greedy_with_rmoe_target_equals_plain_greedy(model):
    draft = helpers.model(seed=1)
    plain = generate(model, helpers.PROMPTS, sampler="greedy", max_new_tokens=helpers.MAX_NEW)
    spec = generate(model, helpers.PROMPTS, sampler="speculative_greedy", draft_model=draft,
                    max_new_tokens=helpers.MAX_NEW)
    for a, b in zip(plain.tokens, spec.tokens):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_configs_and_layer_starts_are_refused(model):
    with pytest.raises(ValueError, match=r"top_k=5 must be in \[1, num_experts=4\]"):
        RMoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="num_experts=0 must be at least 1"):
        RMoEConfig(num_experts=0, top_k=1)
    with pytest.raises(ValueError, match=r"unknown router_type 'lstm'; valid: \('linear'"):
        RMoEConfig(router_type="lstm")
    with pytest.raises(ValueError, match=r"unknown MoE dispatch 'megablocks'; valid"):
        RMoEConfig(dispatch="megablocks")
    with pytest.raises(ValueError, match="unknown state_passing 'partial'"):
        RMoEConfig(state_passing="partial")
    with pytest.raises(ValueError, match="RMoE needs an RMoEConfig"):
        RMoE(helpers.config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="start_layer=1: the recurrent router's state"):
        model.extend_from(jnp.zeros((1, 1, CONFIG.d_model)), model.init_cache(1, 8),
                          start_layer=1)
