"""MSWA (arXiv 2501.01039): window assignment, the ring-buffer decoding cache against the full
forward pass (past the point where every ring wraps), and the special cases SWA and full
attention against the baseline Transformer with the same weights."""
import dataclasses
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import registry
from models.mswa import MSWA, MSWAConfig
from models.transformer import Transformer, TransformerConfig
from tests import tolerances

# Windows (paper convention) of layer 0: (1, 1, 2, 4), layer 1: (1, 2, 4, 8); kv head 0 serves
# query heads 0-1, kv head 1 heads 2-3, so the rings hold 1+2, 4+2, 2+2 and 8+2 slots.
CONFIG = MSWAConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    base_window=4, layer_multipliers=(0.5, 1.0), rewind_margin=2)
T = 30  # several times the largest window (8) and ring (10): every ring wraps
MAX_LENGTH = 64

_forward = nnx.jit(lambda m, tokens: m(tokens))
_extend = nnx.jit(lambda m, tokens, cache: m.extend(tokens, cache))
_extend_ragged = nnx.jit(lambda m, tokens, cache, n: m.extend(tokens, cache, num_tokens=n))


def _config(**overrides) -> MSWAConfig:
    return dataclasses.replace(CONFIG, **overrides)


@pytest.fixture(scope="module")
def model() -> MSWA:
    # Building runs one (slow) jit-compiled initialisation; every other model in this file
    # reuses these weights, since windows and implementations do not change the parameters.
    return registry.construct(MSWA, CONFIG, seed=0)


@pytest.fixture(scope="module")
def tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (2, T), 0, CONFIG.vocab_size)


@pytest.fixture(scope="module")
def full_logits(model, tokens) -> jax.Array:
    return _forward(model, tokens).logits


def _same_weights(model, ctor, config):
    """ctor(config) carrying `model`'s parameters (the parameter trees are identical)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ctor(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def _assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                               atol=tolerances.F32, rtol=tolerances.F32)


def _extend_in_chunks(model, tokens, cache, bounds):
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        logits, cache = _extend(model, tokens[:, lo:hi], cache)
        outs.append(logits)
    return jnp.concatenate(outs, axis=1), cache


# -- windows ----------------------------------------------------------------------------------
def test_windows_from_multipliers_for_both_presets():
    paper = MSWAConfig(n_layers=4, n_heads=4, n_kv_heads=2, base_window=16)
    assert paper.layer_windows() == ((1, 2, 4, 8), (2, 4, 8, 16), (4, 8, 16, 32),
                                     (8, 16, 32, 64))
    official = MSWAConfig(n_layers=4, n_heads=8, n_kv_heads=2, base_window=8,
                          multiplier_preset="official_finetune")
    heads = (16, 16, 8, 8, 4, 4, 4, 4)  # head multipliers (2, 1, 1/2, 1/2), 2 heads per group
    assert official.layer_windows() == (tuple(w // 2 for w in heads),) * 2 + (heads,) + (
        tuple(2 * w for w in heads),)
    # round half up, at least 1; kernel windows count the query itself
    small = MSWAConfig(n_layers=4, n_heads=4, n_kv_heads=2, base_window=2)
    assert small.layer_windows()[0] == (1, 1, 1, 1) and small.layer_windows()[1] == (1, 1, 1, 2)
    assert small.kernel_windows()[1] == (2, 2, 2, 3)
    swa = _config(multiplier_preset="swa", layer_multipliers=None)  # explicit vectors win
    assert swa.layer_windows() == ((4,) * 4,) * 2
    assert _config(base_window=None).kernel_windows() == ((None,) * 4,) * 2
    explicit = MSWAConfig(n_layers=2, n_heads=4, n_kv_heads=2, base_window=10,
                          head_multipliers=[1, 3], layer_multipliers=[0.5])
    assert explicit.layer_windows() == ((5, 5, 15, 15),) * 2
    assert explicit.head_multipliers == (1.0, 3.0)  # gin lists become (hashable) tuples


def test_window_budget_ratio(model, tokens):
    assert MSWAConfig(base_window=64).window_budget_ratio() == pytest.approx(225 / 256)
    assert MSWAConfig(base_window=64, multiplier_preset="official_finetune"
                      ).window_budget_ratio() == pytest.approx(1.0)
    assert _config(multiplier_preset="swa", layer_multipliers=None
                   ).window_budget_ratio() == 1.0
    assert _config(base_window=None).window_budget_ratio() == float("inf")
    # CONFIG: (1+1+2+4 + 1+2+4+8) / (2 * 4 * 4)
    assert model.window_budget_ratio() == pytest.approx(23 / 32)
    out = _forward(model, tokens)
    assert float(out.metrics["window_budget_ratio"]) == pytest.approx(23 / 32)


# -- decoding with ring buffers ---------------------------------------------------------------
def test_extend_token_by_token_and_in_chunks_matches_forward_past_wrap(model, tokens,
                                                                       full_logits):
    cache = model.init_cache(2, MAX_LENGTH)
    steps = []
    for t in range(T):
        logits, cache = _extend(model, tokens[:, t:t + 1], cache)
        steps.append(logits)
    _assert_close(jnp.concatenate(steps, axis=1), full_logits)
    np.testing.assert_array_equal(cache.lengths, [T, T])
    assert bool(cache.valid.all())

    # A 12-token prefill is longer than every ring (at most 10 slots), then 9-token chunks.
    chunked, cache = _extend_in_chunks(model, tokens, model.init_cache(2, MAX_LENGTH),
                                       [0, 12, 21, 30])
    _assert_close(chunked, full_logits)
    np.testing.assert_array_equal(cache.lengths, [T, T])


def test_ragged_rows(model, tokens, full_logits):
    """Row 0 holds 20 tokens and row 1 only 7 (more apart than the rewind margin, so they enter
    through num_tokens); then both extend by 9 at their own offsets."""
    prefix = jnp.concatenate([tokens[:1, :20], jnp.pad(tokens[1:, :7], ((0, 0), (0, 13)))])
    _, cache = _extend_ragged(model, prefix, model.init_cache(2, MAX_LENGTH),
                              jnp.array([20, 7], jnp.int32))
    np.testing.assert_array_equal(cache.lengths, [20, 7])
    step = jnp.stack([tokens[0, 20:29], tokens[1, 7:16]])
    logits, cache = _extend(model, step, cache)
    _assert_close(logits[0], full_logits[0, 20:29])
    _assert_close(logits[1], full_logits[1, 7:16])
    np.testing.assert_array_equal(cache.lengths, [29, 16])

    # Padding a row and rewinding it works too while the padding fits in the margin.
    _, cache = _extend(model, tokens[:, :12], model.init_cache(2, MAX_LENGTH))
    cache = model.rewind(cache, jnp.array([12, 10]))
    step = jnp.stack([tokens[0, 12:21], tokens[1, 10:19]])
    logits, _ = _extend(model, step, cache)
    _assert_close(logits[0], full_logits[0, 12:21])
    _assert_close(logits[1], full_logits[1, 10:19])


def test_rewind_within_margin_equals_never_writing_the_rewound_tokens(model, tokens,
                                                                      full_logits):
    _, cache = _extend(model, tokens[:, :12], model.init_cache(2, MAX_LENGTH))
    # A 2-token draft (the whole margin), written one token at a time after every ring has
    # wrapped. Row 0 rejects both tokens; row 1 accepts its first, which is the true token.
    draft = jax.random.randint(jax.random.key(9), (2, 2), 0, CONFIG.vocab_size)
    draft = draft.at[1, 0].set(tokens[1, 12])
    for t in range(2):
        _, cache = _extend(model, draft[:, t:t + 1], cache)
    cache = model.rewind(cache, jnp.array([12, 13]))
    np.testing.assert_array_equal(cache.rewind_floor, [12, 12])
    assert bool(cache.valid.all())
    logits, _ = _extend(model, jnp.stack([tokens[0, 12:21], tokens[1, 13:22]]), cache)
    _assert_close(logits[0], full_logits[0, 12:21])
    _assert_close(logits[1], full_logits[1, 13:22])


def test_rewind_past_the_margin_is_an_error(model, tokens):
    _, cache = _extend(model, tokens[:, :12], model.init_cache(2, MAX_LENGTH))
    with pytest.raises(ValueError, match=r"rows \[1\] to lengths \[9\].*\(10, 12\)"):
        model.rewind(cache, jnp.array([12, 9]))
    with pytest.raises(ValueError, match=r"rows \[0\] to lengths \[13\]"):
        model.rewind(cache, jnp.array([13, 12]))  # past what was written
    # Under jit nothing can raise: the row is marked invalid for good and its logits are NaN.
    cache = jax.jit(lambda c, n: c.rewind(n))(cache, jnp.array([12, 9]))
    np.testing.assert_array_equal(cache.valid, [True, False])
    logits, cache = _extend(model, tokens[:, 12:21], cache)
    assert bool(jnp.isfinite(logits[0]).all()) and bool(jnp.isnan(logits[1]).all())
    np.testing.assert_array_equal(cache.valid, [True, False])


def test_cache_bytes_follow_the_windows_not_max_length(model):
    def nbytes(cache):
        return sum(x.nbytes for x in jax.tree.leaves(cache))

    small, large = model.init_cache(2, 32), model.init_cache(2, 4096)
    assert nbytes(small) == nbytes(large)
    # kv slots per row: sum over layers and kv heads of (largest served window + margin)
    slots = (1 + 2) + (4 + 2) + (2 + 2) + (8 + 2)
    head_dim, dtype_bytes, batch = 8, 4, 2
    kv_bytes = sum(g.k.nbytes + g.v.nbytes for layer in large.layers for g in layer)
    assert kv_bytes == batch * slots * 2 * head_dim * dtype_bytes


def test_exit_layer_runs_a_prefix_of_the_blocks(model, tokens):
    @nnx.jit
    def shallow(m, tok, cache):
        logits, cache = m.extend(tok, cache, exit_layer=1)
        x = m.blocks[0](m.embed(tok), jnp.broadcast_to(jnp.arange(tok.shape[1]), tok.shape))
        return logits, m.logits(x), cache

    logits, expected, cache = shallow(model, tokens[:, :12], model.init_cache(2, MAX_LENGTH))
    _assert_close(logits, expected)
    assert all(bool((g.pos == -1).all()) for g in cache.layers[1])  # deeper rings untouched
    with pytest.raises(ValueError, match="exit_layer=3"):
        model.extend(tokens[:, :1], cache, exit_layer=3)


# -- special cases and implementations --------------------------------------------------------
def test_swa_and_full_attention_equal_the_baseline_transformer(model, tokens):
    base = TransformerConfig(**{f.name: getattr(CONFIG, f.name)
                                for f in dataclasses.fields(TransformerConfig)})
    swa_config = _config(multiplier_preset="swa", layer_multipliers=None, base_window=3)
    swa = _same_weights(model, MSWA, swa_config)
    baseline = _same_weights(model, Transformer, dataclasses.replace(base, window=4))
    _assert_close(_forward(swa, tokens).logits, _forward(baseline, tokens).logits)

    full = _same_weights(model, MSWA, _config(base_window=None))
    full_logits = _forward(full, tokens).logits
    _assert_close(full_logits, _forward(_same_weights(model, Transformer, base), tokens).logits)
    # Full-attention rings span max_length and never wrap below it.
    chunked, _ = _extend_in_chunks(full, tokens, full.init_cache(2, T), [0, 15, 30])
    _assert_close(chunked, full_logits)


@pytest.mark.parametrize("impl", ["xla_blocked", "pallas"])
def test_attention_implementations_agree(model, tokens, full_logits, impl):
    other = _same_weights(model, MSWA, _config(attention_impl=impl))
    _assert_close(_forward(other, tokens).logits, full_logits)


# -- configuration ----------------------------------------------------------------------------
def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"head_multipliers=\(1.0, 2.0, 3.0\).*n_heads=4"):
        _config(head_multipliers=(1, 2, 3))
    with pytest.raises(ValueError, match=r"layer_multipliers=\(1.0, 2.0, 3.0\).*n_layers=2"):
        _config(layer_multipliers=(1, 2, 3))
    with pytest.raises(ValueError, match="base_window=0"):
        _config(base_window=0)
    with pytest.raises(ValueError, match=r"head_multipliers=\(1, -1\)"):
        _config(head_multipliers=(1, -1))
    with pytest.raises(ValueError, match="'flash9'"):
        _config(attention_impl="flash9")
    with pytest.raises(ValueError, match="'nope'.*official_finetune"):
        _config(multiplier_preset="nope")
    with pytest.raises(ValueError, match="rewind_margin=-1"):
        _config(rewind_margin=-1)
    with pytest.raises(ValueError, match="window=5"):
        _config(window=5)


CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs"


def test_shipped_gin_configs_differ_only_in_the_windows():
    configs = {}
    for name in ("mswa_tiny", "swa_tiny", "full_tiny"):
        try:
            # The files' experiment, data and train bindings belong to modules this test does
            # not load (tests/experiments/test_configs.py parses the files whole).
            gin.parse_config_file(str(CONFIG_DIR / f"{name}.gin"), skip_unknown=True)
            configs[name] = MSWAConfig()
        finally:
            gin.clear_config()
    assert configs["mswa_tiny"].window_budget_ratio() == pytest.approx(225 / 256)
    assert configs["swa_tiny"].window_budget_ratio() == 1.0
    assert configs["full_tiny"].window_budget_ratio() == float("inf")
    windowless = {dataclasses.replace(c, base_window=None, multiplier_preset="paper")
                  for c in configs.values()}
    assert len(windowless) == 1
    assert registry.lookup("mswa") == (MSWAConfig, MSWA)


def test_extend_trunk_then_extend_from_past_wrap_equals_one_extend(model, tokens):
    """Self-speculation's resumed verification on ring buffers: shallow steps one token at a
    time, a rewind within the margin, then the deep blocks on their exit states."""
    @nnx.jit
    def resumed(m, toks, cache):
        start = cache.lengths
        hiddens = []
        for i in range(toks.shape[1]):
            h, cache = m.extend_trunk(toks[:, i:i + 1], cache, exit_layer=1)
            hiddens.append(h)
        return m.extend_from(jnp.concatenate(hiddens, axis=1), m.rewind(cache, start),
                             start_layer=1)

    _, cache = _extend(model, tokens[:, :20], model.init_cache(2, MAX_LENGTH))
    logits, after = resumed(model, tokens[:, 20:22], cache)
    expected, whole = _extend(model, tokens[:, 20:22], cache)
    _assert_close(logits, expected)
    np.testing.assert_array_equal(after.lengths, whole.lengths)
    # The next tokens see the same history either way.
    _assert_close(_extend(model, tokens[:, 22:25], after)[0],
                  _extend(model, tokens[:, 22:25], whole)[0])
