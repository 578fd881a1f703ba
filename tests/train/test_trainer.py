"""The trainer: schedules, learning, gradient accumulation, exact resumption after SIGTERM,
non-finite losses, eval metrics and TensorBoard output.

Every run uses the same tiny model and optimizer config (tests/train/sharding_worker.py), so
the process compiles its train step once; only gradient accumulation adds a second one.
"""
import math
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from tests import tolerances
from tests.train import sharding_worker as helpers
from train import checkpoint, optim, trainer


def _train(workdir, batches=None, eval_iter_fn=None, on_step=None, **overrides):
    return trainer.train("transformer", helpers.model_config(),
                         helpers.train_config(**overrides),
                         batches if batches is not None else helpers.batches(), eval_iter_fn,
                         workdir, on_step=on_step, progress=False)


def _eval_batches():
    return helpers.batches(seed=99)


def _params(workdir, step=None):
    model, _, _ = checkpoint.restore_model(workdir, step)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_schedules_hit_their_key_values():
    cosine = optim.make_schedule(lr=1.0, steps=100, warmup_steps=10, schedule="cosine",
                                 min_lr_ratio=0.1)
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 55: 0.55, 100: 0.1, 150: 0.1}
    for step, lr in expected.items():
        assert float(cosine(step)) == pytest.approx(lr, abs=1e-6), step
    wsd = optim.make_schedule(lr=2.0, steps=100, warmup_steps=10, schedule="wsd",
                              min_lr_ratio=0.0, decay_fraction=0.2)
    assert optim.wsd_decay_start(100, 0.2) == 80
    expected = {0: 0.2, 9: 2.0, 10: 2.0, 50: 2.0, 80: 2.0, 90: 1.0, 95: 0.5, 100: 0.0}
    for step, lr in expected.items():
        assert float(wsd(step)) == pytest.approx(lr, abs=1e-6), step


def test_bad_configs_name_the_bad_value():
    with pytest.raises(ValueError, match=r"unknown schedule 'linear'; valid: \('cosine', 'wsd'\)"):
        trainer.TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="warmup_steps=50 must be in"):
        trainer.TrainConfig(steps=10, warmup_steps=50)
    with pytest.raises(ValueError, match="wsd decay starts at step 50"):
        trainer.TrainConfig(steps=100, warmup_steps=60, schedule="wsd", decay_fraction=0.5)
    with pytest.raises(ValueError, match="grad_accum_steps=0"):
        trainer.TrainConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match=r"batch lacks keys \['loss_mask'\]"):
        batch = next(helpers.batches())
        del batch["loss_mask"]
        trainer._check_batch(batch)


def test_loss_decreases_on_a_repeated_batch(tmp_path):
    summary = _train(tmp_path, batches=helpers.batches(repeat=True), checkpoint_every=0)
    losses = summary["losses"]
    assert len(losses) == 6 and summary["step"] == 6
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(b < a for a, b in zip(losses[2:], losses[3:])), losses


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    grad_norms = {"big": [], "accumulated": []}

    def run(name, **overrides):
        return _train(tmp_path / name, checkpoint_every=1, keep_checkpoints=6,
                      on_step=lambda step, s: grad_norms[name].append(s["grad_norm"]),
                      **overrides)

    # Adam's eps = 1 makes each update about lr * g for these small gradients: linear in the
    # gradient, so the parameters compare the accumulated gradient itself (a wrong 1/k scale
    # shows), while eps = 1e-8 would turn each entry into about lr * sign(g) and blow rounding
    # of near-zero entries up to the update's size.
    big = run("big", eps=1.0)
    accumulated = run("accumulated", grad_accum_steps=2, eps=1.0)
    np.testing.assert_allclose(accumulated["losses"], big["losses"], rtol=tolerances.F32,
                               atol=tolerances.F32)
    np.testing.assert_allclose(grad_norms["accumulated"], grad_norms["big"],
                               rtol=tolerances.F32, atol=tolerances.F32)
    # One optimizer update from the same start. (Later steps are compared through the losses.)
    for got, want in zip(_params(tmp_path / "accumulated", 1), _params(tmp_path / "big", 1)):
        np.testing.assert_allclose(got, want, rtol=tolerances.F32, atol=tolerances.F32)


def test_sigterm_saves_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    def send_sigterm_at_step_2(step, scalars):
        assert math.isfinite(scalars["loss"]) and scalars["lr"] > 0
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    interrupted = _train(tmp_path / "run", on_step=send_sigterm_at_step_2, checkpoint_every=0,
                         eval_iter_fn=_eval_batches)
    assert signal.getsignal(signal.SIGTERM) is handler_before
    assert interrupted["preempted"] and 2 <= interrupted["step"] < 6
    assert interrupted["evals"] == {}   # a preempted run saves and leaves at once
    ckpt = checkpoint.Checkpointer(tmp_path / "run")
    assert ckpt.steps() == [interrupted["step"]]
    ckpt.close()

    resumed = _train(tmp_path / "run", eval_iter_fn=_eval_batches)
    assert resumed["start_step"] == interrupted["step"] and resumed["step"] == 6
    straight = _train(tmp_path / "straight", eval_iter_fn=_eval_batches)
    np.testing.assert_allclose(interrupted["losses"] + resumed["losses"], straight["losses"],
                               rtol=tolerances.F32, atol=tolerances.F32)

    metrics = straight["eval"]
    assert metrics["loss"] == pytest.approx(resumed["eval"]["loss"], rel=tolerances.F32)
    eval_iter = _eval_batches()   # eval_batches=2: the first two batches are scored
    expected_tokens = sum(int(next(eval_iter)["loss_mask"].sum()) for _ in range(2))
    assert metrics["tokens"] == metrics["bytes"] == expected_tokens
    # Default bytes_fn counts scored tokens, so bits/byte is nats/token over ln 2.
    assert metrics["bits_per_byte"] == pytest.approx(metrics["loss"] / math.log(2))
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    events = os.listdir(tmp_path / "straight" / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # Batch 4 (step 5) holds a target id outside the vocabulary: the cross-entropy is NaN.
    with pytest.raises(trainer.NonFiniteLossError,
                       match=r"non-finite training at step 5: loss=nan.*last good checkpoint "
                             r"is step 4"):
        _train(tmp_path, batches=helpers.batches(bad_target_at=4), checkpoint_every=2)
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.steps() == [2, 4]
    ckpt.close()
    assert all(np.all(np.isfinite(p)) for p in _params(tmp_path))
