"""Checkpoints: round trips (async saves, keep-N, iterator state as JSON or bytes), refusal of
another architecture's workdir, and falling back past a corrupt latest step without losing it.

Most tests save small stand-in pytrees, so nothing but orbax and a checksum is compiled.
"""
import dataclasses
import gc
import glob
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train import sharding_worker as helpers
from train import checkpoint, trainer

# Orbax also reports the failed reads of a corrupt file as unraisable coroutine exceptions,
# which surface whenever they are garbage-collected: collect them inside these tests.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_abandoned_reads():
    yield
    gc.collect()

# Large enough (16 KiB) that orbax writes the array to its own data file instead of inlining
# it in the index, so the corruption tests below hit array bytes.
PARAMS = {"w": jnp.arange(4096.0, dtype=jnp.float32).reshape(64, 64),
          "b": jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32)}
OPT_STATE = {"mu": jnp.full((64, 64), 0.5, jnp.float32), "count": jnp.asarray(7, jnp.int32)}


def _abstract(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _save(ckpt, step, data_state=None, model_config=None):
    params = jax.tree.map(lambda x: x * step, PARAMS)
    ckpt.save(step, params, OPT_STATE, data_state if data_state is not None else {"index": step},
              model_name="transformer", model_config=model_config or helpers.model_config())


def _restore(ckpt, **kwargs):
    return ckpt.restore(_abstract(PARAMS), _abstract(OPT_STATE), with_data=True, **kwargs)


def test_round_trip_with_async_saves_keeps_the_newest_n(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2, async_save=True)
    for step in range(1, 5):
        _save(ckpt, step)
    _save(ckpt, 5, data_state=b"\x00grain\xffstate")
    ckpt.wait()
    assert ckpt.steps() == [4, 5]
    restored = _restore(ckpt)
    assert restored.step == 5 and restored.data_state == b"\x00grain\xffstate"
    np.testing.assert_array_equal(restored.params["w"], PARAMS["w"] * 5)
    np.testing.assert_array_equal(restored.opt_state["mu"], OPT_STATE["mu"])
    assert restored.opt_state["count"] == 7
    assert _restore(ckpt, step=4).data_state == {"index": 4}
    meta = restored.metadata
    config = helpers.model_config()
    assert meta["model_name"] == "transformer"
    assert meta["config_hash"] == checkpoint.config_hash("transformer", config)
    assert checkpoint.config_from_dict("transformer", meta["model_config"]) == config
    ckpt.close()


def test_iterator_state_must_be_bytes_or_json(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    with pytest.raises(ValueError, match="get_state\\(\\) returned object"):
        _save(ckpt, 1, data_state=object())
    ckpt.close()


def _corrupt(step_dir, how):
    files = [f for f in glob.glob(os.path.join(step_dir, "params", "**"), recursive=True)
             if os.path.isfile(f)]
    target = max(files, key=os.path.getsize)   # the 16 KiB of w
    if how == "delete":
        os.remove(target)
    elif how == "truncate":
        os.truncate(target, os.path.getsize(target) // 2)
    elif how == "flip":   # fails zstd decoding, or else the checksums
        data = bytearray(open(target, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(target, "wb").write(bytes(data))
    else:   # arrays that read back fine but differ from what was saved
        meta_file = os.path.join(step_dir, "meta", "metadata")
        meta = json.load(open(meta_file))
        meta["checksums"]["params"][0] += 1
        json.dump(meta, open(meta_file, "w"))


@pytest.mark.parametrize("how", ["delete", "truncate", "flip", "checksum"])
def test_corrupt_latest_step_falls_back_with_a_warning_and_is_kept(tmp_path, caplog, how):
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    _save(ckpt, 1)
    _save(ckpt, 2)
    step_dir = os.path.join(ckpt.directory, "2")
    _corrupt(step_dir, how)
    files_before = sorted(os.listdir(step_dir))

    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        restored = _restore(ckpt)
    assert restored.step == 1
    np.testing.assert_array_equal(restored.params["w"], PARAMS["w"])
    assert "checkpoint step 2" in caplog.text and "corrupt" in caplog.text
    assert "using step 1 instead" in caplog.text
    if how == "checksum":
        assert "params of step 2 fail their checksums" in caplog.text
    assert sorted(os.listdir(step_dir)) == files_before   # reading never deletes
    with pytest.raises(ValueError, match="checkpoint step 2 .* is corrupt"):
        _restore(ckpt, step=2)

    # Training resumes with quarantine: step 2 moves aside intact, freeing its step number.
    assert _restore(ckpt, quarantine_corrupt=True).step == 1
    assert ckpt.steps() == [1]
    moved = glob.glob(os.path.join(tmp_path, checkpoint.CORRUPT_SUBDIR, "2-*"))
    assert len(moved) == 1 and sorted(os.listdir(moved[0])) == files_before
    _save(ckpt, 2)
    assert _restore(ckpt).step == 2
    ckpt.close()


def test_every_step_corrupt_raises_and_no_checkpoint_is_none(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    assert _restore(ckpt) is None
    _save(ckpt, 3)
    _corrupt(os.path.join(ckpt.directory, "3"), "delete")
    with pytest.raises(ValueError, match=r"every checkpoint .* is corrupt \(steps \[3\]\)"):
        _restore(ckpt)
    ckpt.close()
    with pytest.raises(ValueError, match="no checkpoints in"):
        checkpoint.restore_model(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"no checkpoint step 9 .* available steps: \[3\]"):
        checkpoint.restore_model(tmp_path, step=9)


def test_compatibility_check_names_both_sides(tmp_path, caplog):
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    _save(ckpt, 1)
    config = helpers.model_config()
    ckpt.check_compatible("transformer", config, PARAMS)   # same model: fine
    with pytest.raises(ValueError, match="model 'transformer' .* builds model 'mswa'"):
        ckpt.check_compatible("mswa", config, PARAMS)
    wider = dataclasses.replace(config, d_model=64)
    with pytest.raises(ValueError, match="shapes differ.*d_model: 32 \\(checkpoint\\) vs 64"):
        ckpt.check_compatible("transformer", wider, {"w": jnp.zeros((3, 5)), "b": PARAMS["b"]})
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        ckpt.check_compatible("transformer", dataclasses.replace(config, dtype="bfloat16"),
                              PARAMS)
    assert "dtype: 'float32' (checkpoint) vs 'bfloat16'" in caplog.text
    # An optimizer whose state has another shape is refused, not mistaken for corruption.
    other_opt = {"mu": jnp.zeros((64, 64)), "nu": jnp.zeros((64, 64)), "count": jnp.int32(0)}
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="opt_state of .*step 1"):
        ckpt.restore(_abstract(PARAMS), _abstract(other_opt), quarantine_corrupt=True)
    assert ckpt.steps() == [1]
    ckpt.close()


def test_train_refuses_another_architectures_workdir_and_touches_nothing(tmp_path):
    other = dataclasses.replace(helpers.model_config(), d_model=64)
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    _save(ckpt, 1, model_config=other)
    ckpt.close()
    listing = sorted(os.path.relpath(p, tmp_path) for p in glob.glob(f"{tmp_path}/**",
                                                                      recursive=True))
    with pytest.raises(ValueError) as error:
        trainer.train("transformer", helpers.model_config(), helpers.train_config(),
                      helpers.batches(), None, tmp_path, progress=False)
    message = str(error.value)
    assert checkpoint.config_hash("transformer", other) in message
    assert checkpoint.config_hash("transformer", helpers.model_config()) in message
    assert "d_model: 64 (checkpoint) vs 32 (this run)" in message
    assert sorted(os.path.relpath(p, tmp_path) for p in glob.glob(f"{tmp_path}/**",
                                                                   recursive=True)) == listing
