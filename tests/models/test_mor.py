"""Mixture-of-Recursions (arXiv 2507.10524): causal decoding against the full forward pass in
the same (threshold) routing mode for both routers, both KV strategies and the Recursive
baseline; rewind; depth-wise batching and its overflow; the gathered top-k training forward
against a masked reference; capacity warmup against the gathered forward; loss-free balancing
through the trainer and a checkpoint; greedy speculative decoding with an MoR target; bad
input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decoding.generate import generate
from models import registry
from models.mor import MoR, MoRConfig
from models.mor_routing import top_k_in_order
from tests import tolerances
from tests.decoding import helpers

# Middle-Cycle, 5 effective layers = first + 1 shared block x 3 recursions + last. Router
# weights of std 1 give scores of order 1 (a trained router's separation), so each recursion
# keeps about half the tokens and no threshold decision sits within rounding of 0.
CONFIG = MoRConfig(vocab_size=helpers.VOCAB, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2,
                   num_recursions=3, router_init_stddev=1.0, decode_capacity=(1.0, 1.0, 1.0))
VARIANTS = {"expert_recursion": {}, "expert_share": {"kv_strategy": "share"},
            "token_choice": {"router": "token"}, "recursive": {"router": "none"}}
# Every extend below has S in {1, 4} and batch 3, so each model compiles two extends.
B, T, S, MAX_LENGTH = 3, 12, 4, 32

_forward = nnx.jit(lambda m, t: m(t, routing="threshold").logits)
_topk_forward = nnx.jit(lambda m, t: m(t))      # the training forward
_extend_n = nnx.jit(lambda m, t, cache, n: m.extend(t, cache, num_tokens=n))
_rewind = nnx.jit(lambda m, cache, lengths: m.rewind(cache, lengths))


def _extend(model, tokens, cache, n=None):
    n = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32) if n is None else n
    return _extend_n(model, tokens, cache, jnp.asarray(n, jnp.int32))


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                               atol=tolerances.F32, rtol=tolerances.F32)


def _build(**overrides):
    # The same seed and parameter shapes give the same weights whatever the routing options.
    return registry.construct(MoR, dataclasses.replace(CONFIG, **overrides), seed=0)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (B, T), 0, CONFIG.vocab_size)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tokens):
    model = _build(**VARIANTS[request.param])
    return request.param, model, _forward(model, tokens)


@pytest.fixture(scope="module")
def expert(tokens):
    model = _build()
    return model, _forward(model, tokens)


def _chunks(model, tokens, cache):
    outs = []
    for lo in range(0, tokens.shape[1], S):
        logits, cache = _extend(model, tokens[:, lo:lo + S], cache)
        outs.append(logits)
    return jnp.concatenate(outs, axis=1), cache


def test_extend_in_chunks_and_token_by_token_equals_threshold_forward(variant, tokens):
    name, model, full = variant
    # A ragged prefill (rows hold 4, 1, 3 tokens), then chunks that start at different rows'
    # offsets: padding past num_tokens must enter no per-depth cache.
    n = np.array([4, 1, 3])
    logits, cache = _extend(model, tokens[:, :S], model.init_cache(B, MAX_LENGTH), n)
    for r in range(B):
        _close(logits[r, :n[r]], full[r, :n[r]])
    idx = n[:, None] + np.arange(2 * S)[None, :]
    logits, cache = _chunks(model, tokens[np.arange(B)[:, None], idx], cache)
    _close(logits, full[np.arange(B)[:, None], idx])
    lengths = n + 2 * S
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    routed, entries = np.asarray(cache.routed), np.asarray(cache.kv_entries())
    if name == "recursive":
        np.testing.assert_array_equal(routed, [np.sum(lengths)] * 3)
        np.testing.assert_array_equal(entries, CONFIG.n_layers * lengths)
    else:   # the routers really skip tokens, and deeper recursions never take more
        assert routed[0] >= routed[1] >= routed[2] > 0 and routed[2] < np.sum(lengths)
        if name == "expert_share":      # the ends + recursion 1's shared K/V
            np.testing.assert_array_equal(entries, 3 * lengths)
        else:                           # recursion-wise caching keeps only routed tokens
            assert np.all(entries < CONFIG.n_layers * lengths)
    if name not in ("expert_recursion", "expert_share"):
        return   # one-token steps run the same code for every router (saves compilations)
    cache = model.init_cache(B, MAX_LENGTH)
    steps = []
    for i in range(T):
        logits, cache = _extend(model, tokens[:, i:i + 1], cache)
        steps.append(logits)
    _close(jnp.concatenate(steps, axis=1), full)


def test_rewind_inside_a_speculative_margin_equals_never_having_written(expert, tokens):
    model, full = expert
    _, cache = _chunks(model, tokens[:, :2 * S], model.init_cache(B, MAX_LENGTH))
    _, cache = _extend(model, (tokens[:, 2 * S:3 * S] + 7) % CONFIG.vocab_size, cache)  # junk
    targets = np.array([8, 5, 7])
    cache = _rewind(model, cache, jnp.asarray(targets))
    np.testing.assert_array_equal(np.asarray(cache.lengths), targets)
    pos = targets.copy()
    for _ in range(T - 8):
        step = jnp.asarray(np.asarray(tokens)[np.arange(B), pos][:, None])
        logits, cache = _extend(model, step, cache)
        for r in range(B):
            _close(logits[r, 0], full[r, pos[r]])
        pos += 1
    # A per-depth cache keeps, per row, only entries below the row's length.
    for p, count in zip(cache.depth_pos, cache.depth_count):
        for r in range(B):
            assert np.all(np.asarray(p[r, :int(count[r])]) < pos[r])


def test_depth_wise_batching_gathers_active_rows_and_overflow_exits_early(expert, tokens):
    # Room for 1 of the 3 rows at every recursion in a one-token step.
    wide = expert[0]
    narrow = _build(decode_capacity=(0.3, 0.3, 0.3))
    assert narrow.config.decode_rows(B) == (1, 1, 1)
    # One-token steps from the wide model's caches until some step overflows.
    _, before = _extend(wide, tokens[:, :S], wide.init_cache(B, MAX_LENGTH))  # no gathering
    for i in range(S, T):
        ln, c_narrow = _extend(narrow, tokens[:, i:i + 1], before)
        lw, c_wide = _extend(wide, tokens[:, i:i + 1], before)
        if int(c_narrow.overflow.sum()):
            break
        before = c_wide
    wanted = np.asarray(c_wide.routed - before.routed)
    took = np.asarray(c_narrow.routed - before.routed)
    overflow = np.asarray(c_narrow.overflow)
    assert np.all(took <= 1) and overflow.sum() > 0
    assert took[0] == min(wanted[0], 1) and overflow[0] == wanted[0] - took[0]
    # A row the capacity did not cut decodes exactly as with room for every row; a row cut
    # at recursion r took fewer recursions.
    same = np.ones(B, bool)
    for a, b in zip(c_narrow.depth_count, c_wide.depth_count):
        same &= np.asarray(a) == np.asarray(b)
    assert same.any() and not same.all()
    _close(ln[same], lw[same])
    depth = lambda c: sum(np.asarray(x) for x in c.depth_count)
    assert np.all(depth(c_narrow)[~same] < depth(c_wide)[~same])


def test_topk_training_forward_equals_a_masked_reference(expert, tokens):
    model = expert[0]
    out = _topk_forward(model, tokens)
    c = model.config

    def reference(m, t):
        # The same selection, but every recursion computed over all tokens with masks.
        x = m.first(m.embed(t), jnp.broadcast_to(jnp.arange(T), (B, T)))
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        kept = jnp.ones((B, T), bool)
        for r, cap in enumerate(c.resolved_capacities):
            s = m.router(r, x)
            probs = jnp.where(kept, c.resolved_alpha * jax.nn.sigmoid(s), -1.0)
            idx, _, _ = top_k_in_order(probs, max(1, int(cap * T)))
            kept = jnp.zeros((B, T), bool).at[jnp.arange(B)[:, None], idx].set(True)
            y, _ = m._layers(r, x, pos, pos, jnp.ones((B, T), jnp.int32), kept, None)
            gate = c.resolved_alpha * jax.nn.sigmoid(s)
            x = jnp.where(kept[..., None], x + gate[..., None] * y, x)
        return m.logits(m.last(x, pos))

    _close(out.logits, nnx.jit(reference)(model, tokens))
    hist = np.asarray(out.metrics["depth_histogram"])
    np.testing.assert_allclose(hist, [0, 1 - 8 / 12, 8 / 12 - 4 / 12, 4 / 12], atol=1e-6)
    assert float(out.aux_loss) > 0 and out.metrics["router_accuracy"].shape == (3,)


def test_speculative_greedy_with_an_mor_target_equals_its_greedy(expert):
    model = expert[0]
    plain = generate(model, helpers.PROMPTS, sampler="greedy", max_new_tokens=helpers.MAX_NEW)
    spec = generate(model, helpers.PROMPTS, sampler="speculative_greedy",
                    draft_model=helpers.model(seed=1), max_new_tokens=helpers.MAX_NEW)
    assert [len(t) for t in plain.tokens] == [helpers.MAX_NEW] * len(helpers.PROMPTS)
    assert spec.tokens == plain.tokens
    assert spec.stats["target_calls"] > 0     # rejected drafts are rewound every round


def test_capacity_warmup_decays_to_the_gathered_forward(expert, tokens):
    model = expert[0]
    warm = _build(capacity_warmup_steps=100)     # the same weights as `expert`
    np.testing.assert_allclose(warm.warmup_capacities(jnp.asarray(0)), [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(warm.warmup_capacities(jnp.asarray(50)), [1, 5 / 6, 2 / 3],
                               atol=1e-6)      # halfway down the cosine
    target = model.config.resolved_capacities
    np.testing.assert_allclose(warm.warmup_capacities(jnp.asarray(100)), target, atol=1e-6)
    # Capacity 1 at the first training forward: every token takes every recursion.
    first = _topk_forward(warm, tokens)
    np.testing.assert_allclose(first.metrics["depth_histogram"], [0, 0, 0, 1])
    assert int(warm.forwards[...]) == 1
    # The last warm forward (99 of 100) keeps floor(c_r T) = 12, 8, 4 tokens like the target
    # capacities, so its masked path (all T gathered, the surplus masked) must equal the
    # gathered forward; the next forward takes the gathered branch itself.
    gathered = _topk_forward(model, tokens)
    for count in (99, 100):
        warm.forwards[...] = jnp.asarray(count, jnp.int32)
        out = _topk_forward(warm, tokens)
        _close(out.logits, gathered.logits)
        _close(out.aux_loss, gathered.aux_loss)
        assert int(warm.forwards[...]) == count + 1


def test_loss_free_bias_moves_in_training_and_is_checkpointed(tmp_path):
    from tests.train import sharding_worker as train_helpers
    from train import checkpoint, trainer

    # One shared block applied 3 times (cycle): the cheapest MoR to compile a train step for.
    config = dataclasses.replace(CONFIG, vocab_size=61, sharing="cycle", n_layers=3,
                                 router="token", balancing="loss_free", bias_update_rate=0.01)
    summary = trainer.train("mor", config, train_helpers.train_config(steps=3),
                            train_helpers.batches(), None, tmp_path, progress=False)
    assert summary["step"] == 3
    model, _, _ = checkpoint.restore_model(tmp_path)
    bias = np.asarray(model.router.bias[...])
    # Three sign steps of +-0.01 per depth from 0, carried from step to step: odd multiples of
    # 0.01 (no batch here splits its tokens exactly evenly over the 3 depths).
    np.testing.assert_allclose(np.abs(bias) / 0.01 % 2, 1.0, atol=1e-4)
    assert np.abs(bias).max() <= 0.03 + 1e-6
    assert model.deterministic      # restored for inference: the forward leaves it alone


@pytest.mark.parametrize("overrides,match", [
    ({"sharing": "zigzag"}, r"unknown sharing 'zigzag'; valid: \('middle_cycle'"),
    ({"router": "random"}, r"unknown router 'random'; valid: \('expert', 'token', 'none'\)"),
    ({"kv_strategy": "all"}, r"unknown kv_strategy 'all'"),
    ({"num_recursions": 0}, "num_recursions=0 must be at least 1"),
    ({"n_layers": 6}, r"n_layers=6 does not fit sharing='middle_cycle' with num_recursions=3.*"
                      r"valid n_layers: 5, 8, 11"),
    ({"sharing": "cycle"}, r"n_layers=5 does not fit sharing='cycle'.*valid n_layers: 3, 6"),
    ({"capacities": (1.0, 0.0, 0.0)}, r"capacities=.*must be in \(0, 1\], got 0.0"),
    ({"capacities": (1.0, 1.5, 0.5)}, r"must be in \(0, 1\], got 1.5"),
    ({"capacities": (0.5, 1.0, 0.5)}, "must be non-increasing"),
    ({"capacities": (1.0, 0.5)}, "one value per recursion"),
    ({"decode_capacity": (1.0, 1.0, 0.0)}, r"decode_capacity=.*got 0.0"),
    ({"balancing": "aux"}, r"unknown balancing 'aux'; valid: \('loss', 'loss_free'\)"),
    ({"balancing": "loss_free"}, "balancing='loss_free' needs router='token'"),
    ({"capacity_warmup_steps": -1}, "capacity_warmup_steps=-1 must be >= 0"),
    ({"router": "token", "capacity_warmup_steps": 5}, "needs router='expert'"),
])
def test_bad_config_is_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CONFIG, **overrides)


def test_sharing_schedules_tie_the_right_layers():
    c = dataclasses.replace(CONFIG, n_layers=8, num_recursions=3, decode_capacity=None)
    assert c.schedule == ((0, 1), (0, 1), (0, 1))
    assert dataclasses.replace(c, sharing="middle_sequence").schedule == ((0, 0), (0, 1), (1, 1))
    assert dataclasses.replace(c, sharing="cycle", n_layers=6).schedule == ((0, 1),) * 3
    assert dataclasses.replace(c, num_recursions=2, n_layers=6).ideal_compute_fraction() == (
        2 + 2 * 1.5) / (2 + 2 * 2)
