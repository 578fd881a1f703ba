"""Distilling Kangaroo's early-exit adapter (arXiv 2404.18911): training moves the draft
towards the frozen target, never the target, and a saved adapter reloads exactly and only
for its own target."""
import dataclasses
import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from models import registry
from models.transformer import Transformer, TransformerConfig
from train import adapter_distill

CONFIG = TransformerConfig(vocab_size=32, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2)


def _batch(seed: int = 0, rows: int = 4, length: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, length), np.float32)
    mask[-1, 10:] = 0  # some padding, which the loss must ignore
    return {"inputs": rng.integers(0, CONFIG.vocab_size, (rows, length)).astype(np.int32),
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)),
            "loss_mask": mask}


@pytest.fixture(scope="module")
def target() -> Transformer:
    # A sharper head gives the target confident distributions worth distilling.
    model = registry.construct(Transformer, CONFIG, seed=0)
    model.lm_head[...] = model.lm_head[...] * 20.0
    return model


def test_training_moves_the_draft_towards_the_target_only(target):
    config = adapter_distill.AdapterTrainConfig(exit_layer=1, steps=40, lr=1e-2,
                                                warmup_steps=5)
    batches = [_batch(0)]
    before = adapter_distill.evaluate(
        adapter_distill.EarlyExitAdapter.from_target(target, 1), target, batches)
    target_params = jax.tree.map(np.array, nnx.state(target, nnx.Param))
    logs = []
    adapter = adapter_distill.train_adapter(target, itertools.cycle(batches), config,
                                            log=logs.append, log_every=20)
    after = adapter_distill.evaluate(adapter, target, batches)
    assert after["kl"] < 0.25 * before["kl"]
    assert after["loss"] < before["loss"] and after["prob_acc"] > before["prob_acc"]
    assert [entry["step"] for entry in logs] == [20, 40]
    jax.tree.map(np.testing.assert_array_equal, target_params,
                 jax.tree.map(np.array, nnx.state(target, nnx.Param)))


def test_save_and_load_round_trip_and_refuse_another_target(target, tmp_path):
    adapter = adapter_distill.train_adapter(
        target, itertools.cycle([_batch(1)]),
        adapter_distill.AdapterTrainConfig(exit_layer=2, steps=2))
    adapter_distill.save_adapter(adapter, tmp_path / "adapter")
    loaded = adapter_distill.load_adapter(tmp_path / "adapter", target)
    assert loaded.exit_layer == 2
    jax.tree.map(np.testing.assert_array_equal, nnx.state(adapter, nnx.Param),
                 nnx.state(loaded, nnx.Param))
    other = registry.construct(Transformer, dataclasses.replace(CONFIG, n_layers=4), seed=0)
    with pytest.raises(ValueError, match=r"trained for another target: config fields "
                                         r"\['n_layers'\] differ"):
        adapter_distill.load_adapter(tmp_path / "adapter", other)
    with pytest.raises(ValueError, match="no adapter in"):
        adapter_distill.load_adapter(tmp_path / "missing", target)


def test_a_finite_iterator_that_runs_out_is_an_error(target):
    with pytest.raises(ValueError, match="ran out after 1 of steps=3"):
        adapter_distill.train_adapter(target, [_batch(0)],
                                      adapter_distill.AdapterTrainConfig(exit_layer=1, steps=3))
