"""The baseline Transformer honours the model protocol: every way of feeding tokens through the
KV cache gives the logits of one full forward pass, per row, in f32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import registry
from models.core.attention import attention_prefixes, masked_attention, single_query_attention
from models.transformer import Transformer, TransformerConfig
from tests import tolerances

CONFIG = TransformerConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


# Jitted entry points: op-by-op eager execution compiles every primitive separately, which is
# several times slower on CPU than compiling each whole call once.
_forward = nnx.jit(lambda m, tokens, **kw: m(tokens, **kw).logits)
_extend = nnx.jit(lambda m, tokens, cache: m.extend(tokens, cache))


def _model(config=CONFIG, seed=0):
    return registry.construct(Transformer, config, seed=seed)


def _tokens(batch, length, seed=1, vocab=CONFIG.vocab_size):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


def _assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                               atol=tolerances.F32, rtol=tolerances.F32)


@pytest.mark.parametrize("window", [None, 3])
def test_extend_chunked_and_token_by_token_match_full_forward(window):
    model = _model(TransformerConfig(**{**CONFIG.__dict__, "window": window}))
    tokens = _tokens(2, 9)
    full = _forward(model, tokens)

    one_call, _ = _extend(model, tokens, model.init_cache(2, 16))
    _assert_close(one_call, full)

    cache = model.init_cache(2, 16)
    steps = []
    for t in range(tokens.shape[1]):
        logits, cache = _extend(model, tokens[:, t:t + 1], cache)
        steps.append(logits)
    _assert_close(jnp.concatenate(steps, axis=1), full)
    np.testing.assert_array_equal(cache.lengths, [9, 9])

    cache = model.init_cache(2, 16)
    chunks = []
    for lo, hi in [(0, 4), (4, 5), (5, 9)]:
        logits, cache = _extend(model, tokens[:, lo:hi], cache)
        chunks.append(logits)
    _assert_close(jnp.concatenate(chunks, axis=1), full)


def test_ragged_rows_each_match_their_own_forward():
    """Row 0 holds 6 tokens, row 1 only 3; then both extend by 3 at their own offsets."""
    model = _model()
    seq0, seq1 = _tokens(1, 9, seed=2), _tokens(1, 6, seed=3)
    cache = model.init_cache(2, 16)
    prefix = jnp.concatenate([seq0[:, :6], jnp.pad(seq1[:, :3], ((0, 0), (0, 3)))], axis=0)
    _, cache = _extend(model, prefix, cache)
    cache = model.rewind(cache, jnp.array([6, 3]))
    step = jnp.concatenate([seq0[:, 6:9], seq1[:, 3:6]], axis=0)
    logits, cache = _extend(model, step, cache)
    _assert_close(logits[0], _forward(model, seq0)[0, 6:9])
    _assert_close(logits[1], _forward(model, seq1)[0, 3:6])
    np.testing.assert_array_equal(cache.lengths, [9, 6])


def test_rewind_then_extend_equals_never_writing_the_rewound_tokens():
    model = _model()
    tokens = _tokens(2, 8, seed=4)
    rejected = _tokens(2, 3, seed=5)
    clean = model.init_cache(2, 16)
    _, clean = _extend(model, tokens[:, :5], clean)
    expected, _ = _extend(model, tokens[:, 5:], clean)

    dirty = model.init_cache(2, 16)
    _, dirty = _extend(model, tokens[:, :5], dirty)
    _, dirty = _extend(model, rejected, dirty)          # a draft that gets rejected
    dirty = model.rewind(dirty, jnp.array([5, 5]))
    actual, _ = _extend(model, tokens[:, 5:], dirty)
    _assert_close(actual, expected)


def test_segment_ids_stop_attention_across_documents():
    model = _model()
    a, b = _tokens(1, 5, seed=6), _tokens(1, 4, seed=7)
    packed = jnp.concatenate([a, b], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 4])
    positions = jnp.array([list(range(5)) + list(range(4))])
    out = _forward(model, packed, segment_ids=segment_ids, positions=positions)
    _assert_close(out[:, :5], _forward(model, a))
    _assert_close(out[:, 5:], _forward(model, b))


def test_tied_embeddings_and_bf16_compute_run():
    config = TransformerConfig(**{**CONFIG.__dict__, "tie_embeddings": True, "dtype": "bfloat16"})
    model = _model(config)
    assert not hasattr(model, "lm_head")
    out = _forward(model, _tokens(1, 4))
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    assert model.embed.table[...].dtype == jnp.float32  # master weights stay f32


def test_exit_layer_runs_a_prefix_of_the_blocks():
    model = _model()
    tokens = _tokens(1, 4)
    shallow, cache = model.extend(tokens, model.init_cache(1, 8), exit_layer=1)
    x = model.embed(tokens)
    x = model.blocks[0](x, jnp.arange(4)[None])
    _assert_close(shallow, model.logits(x))
    with pytest.raises(ValueError, match="exit_layer=3"):
        model.extend(tokens, cache, exit_layer=3)


def test_parameters_carry_logical_axis_names():
    model = _model()
    specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    names = {axis for spec in specs for axis in spec}
    assert {"embed", "vocab", "heads", "kv_heads", "mlp"} <= names
    assert all(len(spec) > 0 for spec in specs)  # every parameter is annotated


def test_registry_errors_name_the_bad_value():
    assert "transformer" in registry.model_names()
    with pytest.raises(ValueError, match=r"unknown model 'gpt9'.*transformer"):
        registry.build("gpt9")
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        TransformerConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="'flash9'"):
        TransformerConfig(attention_impl="flash9")


def test_num_tokens_prefills_a_ragged_batch_in_one_call():
    model = _model()
    seq0, seq1 = _tokens(1, 7, seed=8), _tokens(1, 5, seed=9)
    padded = jnp.concatenate([seq0[:, :5], jnp.pad(seq1[:, :3], ((0, 0), (0, 2)))], axis=0)
    ext = nnx.jit(lambda m, t, c, n: m.extend(t, c, num_tokens=n))
    _, cache = ext(model, padded, model.init_cache(2, 16), jnp.array([5, 3]))
    np.testing.assert_array_equal(cache.lengths, [5, 3])
    logits, _ = _extend(model, jnp.concatenate([seq0[:, 5:7], seq1[:, 3:5]], axis=0), cache)
    _assert_close(logits[0], _forward(model, seq0)[0, 5:7])
    _assert_close(logits[1], _forward(model, seq1)[0, 3:5])


@pytest.mark.parametrize("exit_layer", [0, 1, 2])
def test_extend_trunk_then_extend_from_equals_one_extend(exit_layer):
    """Splitting a ragged extend at a layer (the resumed verification of self-speculation)
    gives the same logits and the same cache as one call."""
    model = _model()
    tokens, prefix = _tokens(2, 6), _tokens(2, 5, seed=2)
    num = jnp.array([5, 3], jnp.int32)
    _, cache = nnx.jit(lambda m, t, c, n: m.extend(t, c, num_tokens=n))(
        model, prefix, model.init_cache(2, 16), num)

    @nnx.jit
    def split(m, t, c):
        if exit_layer == 0:
            hidden, shallow = m.embed(t), c.replace(lengths=c.lengths + t.shape[1])
        else:
            hidden, shallow = m.extend_trunk(t, c, exit_layer=exit_layer)
        return m.extend_from(hidden, m.rewind(shallow, c.lengths), start_layer=exit_layer)

    logits, resumed = split(model, tokens, cache)
    expected, whole = _extend(model, tokens, cache)
    _assert_close(logits, expected)
    np.testing.assert_array_equal(resumed.lengths, whole.lengths)
    for a, b in zip(resumed.layers, whole.layers):
        _assert_close(a.k, b.k)
        _assert_close(a.v, b.v)


def test_hidden_at_and_project_to_vocab_compose_to_the_forward():
    model = _model()
    tokens = _tokens(2, 7)
    hidden = nnx.jit(lambda m, t: m.hidden_at(t, CONFIG.n_layers))(model, tokens)
    _assert_close(model.project_to_vocab(model.final_norm(hidden)), _forward(model, tokens))
    resumed = model.hidden_from(model.hidden_at(tokens, 1), 1, CONFIG.n_layers)
    _assert_close(resumed, hidden)
    with pytest.raises(ValueError, match="start_layer=3"):
        model.extend_from(hidden, model.init_cache(2, 8), start_layer=3)


def test_decode_attention_over_cache_prefixes_matches_the_full_forward():
    """Decoding attends over the smallest power-of-two cache prefix holding the longest row;
    crossing 64 and 128 on the way (ragged rows, single-query and chunked steps) must change
    nothing."""
    assert attention_prefixes(256) == (64, 128, 256)
    assert attention_prefixes(200) == (64, 128, 200) and attention_prefixes(40) == (40,)
    model = _model()
    tokens = _tokens(2, 140)
    expected = _forward(model, tokens)
    cache = model.init_cache(2, 256)
    got = []
    for lo, hi in [(0, 60), (60, 61), (61, 66), (66, 67), (67, 129), (129, 130), (130, 140)]:
        logits, cache = _extend(model, tokens[:, lo:hi], cache)
        got.append(logits)
    _assert_close(jnp.concatenate(got, axis=1), expected)


def test_single_query_attention_equals_masked_attention():
    key = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(key[0], (3, 1, 6, 16))
    k = jax.random.normal(key[1], (3, 40, 2, 16))
    v = jax.random.normal(key[2], (3, 40, 2, 16))
    mask = jax.random.bernoulli(key[3], 0.7, (3, 6, 1, 40)).at[..., 0].set(True)
    _assert_close(single_query_attention(q, k, v, mask), masked_attention(q, k, v, mask))
    with pytest.raises(ValueError, match="S=2"):
        single_query_attention(jnp.zeros((3, 2, 6, 16)), k, v, mask)
