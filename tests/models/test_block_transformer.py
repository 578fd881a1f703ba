"""Block Transformer (arXiv 2406.02657): the decoding protocol against the full forward pass
(token by token, in chunks, ragged, after a rewind across a block boundary), speculative
decoding through the shared loop, equal-parameter configs, and bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decoding.generate import generate
from experiments import gin_config, pipeline
from models import registry
from models.block_transformer import BlockTransformer, BlockTransformerConfig
from tests import tolerances
from tests.decoding import helpers

# rewind_margin 6 with L_B = 4: the rings keep M = 3 blocks, so a row can roll back to the
# start of the block before the previous one. Every extend below has S in {1, 4, 5} and goes
# through one jitted function, so the file compiles few programs.
CONFIG = BlockTransformerConfig(
    vocab_size=helpers.VOCAB, block_length=4, expansion_ratio=2, block_d_model=32,
    block_layers=1, block_heads=4, block_kv_heads=2, token_d_model=32, token_layers=2,
    token_heads=4, token_kv_heads=2, rewind_margin=6)
B, T, MAX_LENGTH = 3, 24, 40

_forward = nnx.jit(lambda m, tokens, seg: m(tokens, segment_ids=seg).logits)
_extend_n = nnx.jit(lambda m, tokens, cache, n: m.extend(tokens, cache, num_tokens=n))
_rewind = nnx.jit(lambda m, cache, lengths: m.rewind(cache, lengths))


def _extend(model, tokens, cache, n=None):
    n = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32) if n is None else n
    return _extend_n(model, tokens, cache, jnp.asarray(n, jnp.int32))


@pytest.fixture(scope="module")
def model() -> BlockTransformer:
    return registry.construct(BlockTransformer, CONFIG, seed=0)


@pytest.fixture(scope="module")
def tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (B, T), 0, CONFIG.vocab_size)


@pytest.fixture(scope="module")
def full_logits(model, tokens) -> jax.Array:
    return _forward(model, tokens, jnp.ones((B, T), jnp.int32))


def _assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                               atol=tolerances.F32, rtol=tolerances.F32)


def _extend_chunks(model, tokens, cache, bounds):
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        logits, cache = _extend(model, tokens[:, lo:hi], cache)
        outs.append(logits)
    return jnp.concatenate(outs, axis=1), cache


def _feed_rows(model, tokens, cache, starts, steps):
    """`steps` one-token extends, row b fed tokens[b, starts[b] + i] (rows at different
    offsets inside their blocks). Returns {row: [(position, logits)]} and the cache."""
    out = {r: [] for r in range(tokens.shape[0])}
    pos = np.asarray(starts).copy()
    for _ in range(steps):
        step_tokens = jnp.asarray(np.asarray(tokens)[np.arange(len(pos)), pos][:, None])
        logits, cache = _extend(model, step_tokens, cache)
        for r in out:
            out[r].append((int(pos[r]), logits[r, 0]))
        pos += 1
    return out, cache


def _check_rows(out, full_logits):
    for r, items in out.items():
        for p, logits in items:
            _assert_close(logits, full_logits[r, p])


def test_forward_masks_block_zero_and_first_blocks_of_segments(model, tokens, full_logits):
    assert full_logits.shape == (B, T, CONFIG.vocab_size)
    assert np.all(np.asarray(full_logits[:, :3]) == 0)      # block 0 is never predicted
    assert np.all(np.abs(np.asarray(full_logits[:, 3:])).max(-1) > 0)
    seg = jnp.asarray([[1] * 8 + [2] * 12 + [0] * 4] * B)
    packed = _forward(model, tokens, seg)
    # The first block of segment 2 (positions 8..11) has no context: 8, 9, 10 are unpredicted;
    # 11 (last of that block) predicts block 3's first token from C_2, which exists.
    assert np.all(np.asarray(packed[:, 8:11]) == 0) and np.all(np.asarray(packed[:, 11]) != 0)
    _assert_close(packed[:, :8], full_logits[:, :8])   # segment 1 does not see segment 2


@pytest.mark.parametrize("bounds", [tuple(range(T + 1)), (0, 4, 9, 14, 19, 24)],
                         ids=["token_by_token", "chunks_across_blocks"])
def test_extend_equals_forward(model, tokens, full_logits, bounds):
    logits, cache = _extend_chunks(model, tokens, model.init_cache(B, MAX_LENGTH), bounds)
    _assert_close(logits, full_logits)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [T] * B)


def test_ragged_prefill_then_rows_crossing_blocks_at_different_steps(model, tokens, full_logits):
    n = np.array([5, 3, 2])
    logits, cache = _extend(model, tokens[:, :5], model.init_cache(B, MAX_LENGTH), n)
    for r in range(B):
        _assert_close(logits[r, :n[r]], full_logits[r, :n[r]])
    np.testing.assert_array_equal(np.asarray(cache.lengths), n)
    out, cache = _feed_rows(model, tokens, cache, n, steps=9)
    _check_rows(out, full_logits)


def test_rewind_across_a_block_boundary_equals_never_having_written(model, tokens,
                                                                    full_logits):
    _, cache = _extend_chunks(model, tokens, model.init_cache(B, MAX_LENGTH), (0, 5, 10))
    junk = (tokens[:, 10:15] + 7) % CONFIG.vocab_size
    _, cache = _extend(model, junk, cache)               # 15 tokens: blocks 0..2 complete
    targets = np.array([9, 10, 8])                       # back into block 2 / to its start
    assert np.all(targets >= np.asarray(cache.rewind_floor))
    cache = _rewind(model, cache, jnp.asarray(targets))
    out, _ = _feed_rows(model, tokens, cache, targets, steps=10)
    _check_rows(out, full_logits)


def test_rewind_past_the_margin_is_refused_and_poisons_under_jit(model, tokens):
    _, cache = _extend_chunks(model, tokens, model.init_cache(B, MAX_LENGTH), (0, 5, 10, 15, 20))
    # 20 tokens: block 5's local state overwrote block 2's, so rows go back to 12 at most.
    with pytest.raises(ValueError, match=r"rewind_floor, length\] = \[\(12, 20\)\]"):
        model.rewind(cache, jnp.asarray([12, 11, 20]))
    poisoned = _rewind(model, cache, jnp.asarray([12, 11, 20]))
    logits = np.asarray(_extend(model, tokens[:, :1], poisoned)[0])
    assert np.all(np.isnan(logits[1])) and np.all(np.isfinite(logits[[0, 2]]))


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 7, 8, 9, 7, 8, 9, 7], [3, 4, 5, 6], list(range(40, 53))]


def test_speculative_greedy_with_block_target_equals_plain_greedy(model):
    plain = generate(model, PROMPTS, sampler="greedy", max_new_tokens=helpers.MAX_NEW)
    spec = generate(model, PROMPTS, sampler="speculative_greedy",
                    draft_model=helpers.model(seed=1), max_new_tokens=helpers.MAX_NEW)
    assert [len(t) for t in plain.tokens] == [helpers.MAX_NEW] * len(PROMPTS)
    assert spec.tokens == plain.tokens
    assert spec.stats["target_calls"] > 0


# -- configs -----------------------------------------------------------------------------------
def _non_embedding(gin_file: str) -> int:
    gin_config.parse([gin_file])
    name = pipeline.experiment()
    config_cls, ctor = registry.lookup(name)
    model = nnx.eval_shape(lambda: ctor(config_cls(), rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    vocab_tables = ("embed", "block_embed", "token_embed", "lm_head")
    return sum(leaf.size for path, leaf in leaves
               if str(getattr(path[0], "key", path[0])) not in vocab_tables)


def test_tiny_block_and_vanilla_configs_have_equal_non_embedding_params():
    block, vanilla = _non_embedding("block_tiny.gin"), _non_embedding("block_vanilla_tiny.gin")
    assert abs(block / vanilla - 1) < 0.02, (block, vanilla)


def test_b4_5_config_has_the_papers_shape():
    gin_config.parse(["block_b4_5.gin"])
    c = registry.lookup(pipeline.experiment())[0]()
    assert (c.block_length, c.expansion_ratio, c.block_layers, c.block_d_model,
            c.token_layers, c.token_d_model) == (4, 2, 3, 256, 3, 256)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    ({"block_length": 0}, "block_length=0"),
    ({"expansion_ratio": 0}, "expansion_ratio=0"),
    ({"block_length": 3}, "block_d_model=32 must be a multiple of block_length=3"),
    ({"block_heads": 3, "block_kv_heads": 3},
     "block decoder: d_model=32 is not divisible by n_heads=3"),
])
def test_bad_config_is_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CONFIG, **overrides)


def test_sequence_not_a_multiple_of_the_block_and_short_prompt_are_named(model):
    with pytest.raises(ValueError, match="sequence length 10 is not a multiple of "
                                         "block_length=4"):
        model(jnp.zeros((1, 10), jnp.int32))
    with pytest.raises(ValueError, match=r"prompt 1 has 3 tokens.*min_prompt_length=4"):
        generate(model, [[1, 2, 3, 4], [1, 2, 3]], max_new_tokens=2)
