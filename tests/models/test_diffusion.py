"""The masked diffusion LM (models/diffusion.py): bidirectional and segment-isolated, the block
cache's window forward equals the full forward, the LLaDA loss (masking, 1/p weighting, SFT
prompts never masked) against a reference, the Monte-Carlo likelihood, the trainer hook, and
the synthetic task data it trains on."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import registry
from models.diffusion import DiffusionConfig, DiffusionLM
from tests import tolerances
from train import data as data_lib
from train import synthetic_tasks as st
from train import trainer as trainer_lib

CONFIG = DiffusionConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                         mask_token_id=63)


@pytest.fixture(scope="module")
def model():
    return registry.build("diffusion", CONFIG, seed=0)


# Jitted entry points (eager op-by-op dispatch is what makes tiny-model tests slow).
_logits = nnx.jit(lambda m, t, s: m(t, segment_ids=s).logits)
_forward_with_kv = nnx.jit(lambda m, t, s: m.forward_with_kv(t, segment_ids=s))
_window = nnx.jit(lambda m, *args: m.window_forward(*args))
_mask_batch = nnx.jit(lambda m, b, k: m.mask_batch(b, k))
_loss = nnx.jit(lambda m, b, k: m.training_loss(b, k))
_mc = nnx.jit(lambda m, t, a, k: m.mc_log_likelihood(t, a, k, mc_num=4))


def _tokens(seed, shape=(2, 12)):
    return jax.random.randint(jax.random.key(seed), shape, 0, 62)


def test_attention_is_bidirectional_and_stays_in_its_segment(model):
    tokens = _tokens(0)
    seg = jnp.array([[1] * 6 + [2] * 6, [1] * 12])
    base = _logits(model, tokens, seg)
    changed = _logits(model, tokens.at[:, 9].set(5), seg)
    # Row 1 is one document: a later token changes earlier positions (no causal mask).
    assert float(jnp.max(jnp.abs(changed[1, :9] - base[1, :9]))) > 1e-4
    # Row 0: the change in segment 2 leaves segment 1 exactly as it was.
    np.testing.assert_allclose(changed[0, :6], base[0, :6], atol=tolerances.F32)
    assert float(jnp.max(jnp.abs(changed[0, 6:9] - base[0, 6:9]))) > 1e-4


def test_window_forward_with_a_fresh_cache_equals_the_full_forward(model):
    tokens = _tokens(1, (2, 16))
    valid = jnp.arange(16)[None, :] < jnp.array([[16], [13]])
    full, kv = _forward_with_kv(model, tokens, valid.astype(jnp.int32))
    positions = jnp.array([[4, 5, 6, 7], [9, 10, 11, 12]])
    window_tokens = jnp.take_along_axis(tokens, positions, axis=1)
    logits, new_kv = _window(model, window_tokens, positions, jnp.ones((2, 4), bool), kv,
                             valid)
    ref = jnp.take_along_axis(full, positions[:, :, None], axis=1)
    np.testing.assert_allclose(logits, ref, atol=tolerances.F32, rtol=tolerances.F32)
    np.testing.assert_allclose(new_kv[1][0], kv[1][0], atol=tolerances.F32)


def _sft_batch(batch=64, length=24, prompt=8):
    tokens = np.asarray(_tokens(2, (batch, length)))
    loss_mask = np.zeros((batch, length), np.int32)
    loss_mask[:, prompt:20] = 1          # prompt [0, 8), answer [8, 20), padding after
    seg = (np.arange(length) < 20).astype(np.int32)[None].repeat(batch, 0)
    pos = np.where(seg > 0, np.arange(length), 0).astype(np.int32)
    return {"inputs": tokens, "targets": tokens, "segment_ids": seg, "positions": pos,
            "loss_mask": loss_mask}


def test_masking_never_touches_the_prompt_and_follows_p_mask(model):
    batch = _sft_batch()
    noised, masked, p = _mask_batch(model, batch, jax.random.key(3))
    masked, noised, p = np.asarray(masked), np.asarray(noised), np.asarray(p)
    assert not masked[batch["loss_mask"] == 0].any()        # prompt and padding: never
    np.testing.assert_array_equal(noised == 63, masked)
    np.testing.assert_array_equal(noised[~masked], batch["inputs"][~masked])
    assert np.all((p >= 1e-3) & (p <= 1.0))
    # Per-row masked fraction tracks p = (1 - eps) t + eps: correlation over 64 rows.
    frac = masked[:, 8:20].mean(axis=1)
    assert np.corrcoef(frac, p)[0, 1] > 0.9


def test_training_loss_is_the_weighted_ce_of_masked_tokens(model):
    batch = _sft_batch(batch=4)
    key = jax.random.key(4)
    total, aux, metrics = _loss(model, batch, key)
    noised, masked, p = _mask_batch(model, batch, key)
    # Positions equal the buffer index inside the documents here, so the default ones match.
    logits = np.asarray(_logits(model, noised, batch["segment_ids"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                           ) - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(logp, batch["inputs"][..., None], -1)[..., 0]
    ref = np.sum(np.where(np.asarray(masked), ce / np.asarray(p)[:, None], 0.0))
    np.testing.assert_allclose(float(total), ref, rtol=tolerances.F32)
    assert float(aux) == 0.0 and 0 < float(metrics["masked_fraction"]) <= 1


def test_mc_likelihood_of_a_one_token_answer_is_exact(model):
    tokens = _tokens(5, (2, 10))
    answer = jnp.zeros((2, 10), bool).at[:, 7].set(True)
    est = _mc(model, tokens, answer, jax.random.key(6))
    logits = _logits(model, tokens.at[:, 7].set(63), jnp.ones((2, 10), jnp.int32))[:, 7]
    ref = jax.nn.log_softmax(logits)[jnp.arange(2), tokens[:, 7]]
    np.testing.assert_allclose(est, ref, atol=tolerances.F32, rtol=tolerances.F32)


def test_trainer_uses_the_model_loss(model):
    # The trainer's per-batch loss (train/trainer.py _token_nll) is the model's own objective
    # when it has one, with the rng the train step passes.
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    batch = _sft_batch(batch=4)
    key = jax.random.key(7)
    got = jax.jit(lambda p, b, k: trainer_lib._token_nll(graph, p, rest, b, k)[0])(
        params, batch, key)
    expected, _, _ = _loss(model, batch, key)
    np.testing.assert_allclose(float(got), float(expected), rtol=tolerances.F32)


def test_synthetic_tasks_are_checkable_held_out_and_a_dataset_by_name():
    c = st.SyntheticTaskConfig(min_len=32, max_len=32, gen_length=48)
    train = {tuple(st.make_example(c, "train", 0, i).prompt) for i in range(300)}
    held = st.held_out_examples(30, c)
    assert not train & {tuple(e.prompt) for e in held}
    for e in held:
        text = bytes(e.prompt[1:]).decode()
        s = text.split(":")[1][:-1]
        want = s[::-1] if e.task == "reverse" else "".join(sorted(s))
        assert bytes(e.answer).decode() == want and len(e.answer) == 32
        assert st.is_correct(e, e.answer + [st.EOS] * 16)
        assert not st.is_correct(e, e.answer[:-1] + [st.EOS])
    config = data_lib.DataConfig(dataset="synthetic_tasks", seq_len=128, batch_size=4,
                                 prefetch_batches=0)
    batch = next(iter(data_lib.make_dataset(config)))
    row = st.encode_row(st.make_example(st.SyntheticTaskConfig(), "train", 0, 0), 128, 64)
    np.testing.assert_array_equal(batch["inputs"][0], row["inputs"])
    p = int(np.argmax(batch["loss_mask"][0]))
    assert batch["inputs"][0, p - 1] == ord("=") and batch["loss_mask"][0].sum() == 64
    with pytest.raises(ValueError, match="tasks=.*valid tasks"):
        st.SyntheticTaskConfig(tasks=("multiply",))
    with pytest.raises(ValueError, match="mask_token_id=70"):
        DiffusionConfig(vocab_size=64, mask_token_id=70)
    assert isinstance(registry.build("diffusion", CONFIG), DiffusionLM)


def test_dependent_token_tasks_have_checkable_answers():
    c = st.SyntheticTaskConfig(tasks=("add_lsd", "either"), min_len=32, max_len=32,
                               gen_length=48)
    assert c.max_prompt_length == 1 + len("add:") + 64 + 2
    seen = set()
    for e in st.held_out_examples(40, c):
        seen.add(e.task)
        text = bytes(e.prompt[1:]).decode()
        body = text.split(":")[1][:-1]
        if e.task == "add_lsd":   # least-significant digit first
            a, b = body.split("+")
            assert len(a) == len(b) == 32 and not e.others
            assert int(bytes(e.answer).decode()[::-1]) == int(a[::-1]) + int(b[::-1])
        else:                     # s or s shifted: either one is correct, nothing else
            shifted = "".join(chr(97 + (ord(ch) - 96) % 16) for ch in body)
            answers = {bytes(e.answer).decode(), bytes(e.others[0]).decode()}
            assert answers == {body, shifted}
            assert st.is_correct(e, list(e.others[0]) + [st.EOS])
            mixed = list(body[:16].encode()) + list(shifted[16:].encode())
            assert not st.is_correct(e, mixed)
    assert seen == {"add_lsd", "either"}
