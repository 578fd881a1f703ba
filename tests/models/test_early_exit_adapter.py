"""Kangaroo's early-exit adapter (arXiv 2404.18911): it starts as the plain early exit, its
cached decoding path matches its full-sequence path, and it refuses a target it was not built
for."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import registry
from models.early_exit_adapter import AdapterConfig, EarlyExitAdapter
from models.transformer import Transformer, TransformerConfig
from tests import tolerances
from tests.decoding import helpers

CONFIG = TransformerConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2)


def _assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                               atol=tolerances.F32, rtol=tolerances.F32)


@pytest.fixture(scope="module")
def target() -> Transformer:
    return registry.construct(Transformer, CONFIG, seed=0)


@pytest.fixture(scope="module")
def tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (2, 9), 0, CONFIG.vocab_size)


def test_a_fresh_adapter_drafts_exactly_like_the_plain_early_exit(target, tokens):
    adapter = EarlyExitAdapter.from_target(target, exit_layer=1)
    hidden = target.hidden_at(tokens, 1)
    _assert_close(adapter.logits(hidden, target), target.logits(hidden))


def test_cached_extend_matches_the_full_sequence_path(target, tokens):
    # Random weights everywhere: a zero output projection would hide any error in the
    # attention path.
    adapter = helpers.adapter(target, exit_layer=2)
    hidden = target.hidden_at(tokens, 2)
    full = adapter.logits(hidden, target)

    @nnx.jit
    def in_steps(adapter, target, hidden):
        cache = adapter.init_cache(2, 16)
        first, cache = adapter.extend(hidden[:, :4], cache, target)
        outs = [first]
        for i in range(4, hidden.shape[1]):
            logits, cache = adapter.extend(hidden[:, i:i + 1], cache, target)
            outs.append(logits)
        return jnp.concatenate(outs, axis=1), cache

    stepped, cache = in_steps(adapter, target, hidden)
    _assert_close(stepped, full)
    np.testing.assert_array_equal(cache.lengths, [9, 9])
    assert not np.allclose(np.asarray(full), np.asarray(target.logits(hidden)), atol=1e-3)


def test_bad_exit_layers_and_foreign_targets_are_refused(target):
    with pytest.raises(ValueError, match=r"exit_layer=3 must be in \[1, 2\]"):
        AdapterConfig(CONFIG, exit_layer=3)
    adapter = EarlyExitAdapter.from_target(target, exit_layer=1)
    with pytest.raises(ValueError, match="exit_layer=1, but the sampler exits at exit_layer=2"):
        adapter.check_target(target, exit_layer=2)
    wider = registry.construct(Transformer, dataclasses.replace(CONFIG, d_model=64), seed=0)
    with pytest.raises(ValueError, match="do not match the target"):
        adapter.check_target(wider, exit_layer=1)
