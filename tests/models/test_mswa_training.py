"""MSWA trained through the Pallas window-attention kernel (interpret mode on CPU) follows the
same model trained through masked dense attention, step for step."""
import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from models import registry
from models.mswa import MSWA, MSWAConfig
from tests import tolerances

CONFIG = MSWAConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    base_window=3, head_multipliers=(1.0, 2.0), layer_multipliers=(1.0, 2.0))
STEPS = 3


def _losses(impl: str, tokens: jax.Array) -> list[float]:
    model = registry.construct(MSWA, dataclasses.replace(CONFIG, attention_impl=impl), seed=0)
    graph, params = nnx.split(model)
    # Plain SGD: Adam's per-entry normalisation would blow f32 rounding up into the tolerance.
    tx = optax.sgd(0.5)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = nnx.merge(graph, p)(tokens[:, :-1]).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for _ in range(STEPS):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("impl", ["pallas", "xla_blocked"])
def test_training_follows_xla_dense(impl):
    tokens = jax.random.randint(jax.random.key(3), (2, 33), 0, CONFIG.vocab_size)
    reference = _losses("xla_dense", tokens)
    actual = _losses(impl, tokens)
    assert reference[-1] < reference[0]  # the steps really train
    np.testing.assert_allclose(actual, reference, rtol=tolerances.F32, atol=tolerances.F32)
