"""Mesh construction, logical-axis rules, and multi-device training: a data-parallel x FSDP run
(8 forced host devices, in a subprocess) gives the one-device losses and parameters, and its
checkpoint restores under another mesh and on one device."""
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from models.transformer import Transformer
from tests import tolerances
from tests.train import sharding_worker as helpers
from train import checkpoint, sharding, trainer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


def test_mesh_config_resolves_minus_one_and_rejects_bad_sizes():
    assert sharding.MeshConfig().resolve(8) == (8, 1, 1)
    assert sharding.MeshConfig(data=2, fsdp=-1).resolve(8) == (2, 4, 1)
    assert sharding.MeshConfig(data=1, fsdp=1, tensor=1).resolve(8) == (1, 1, 1)
    with pytest.raises(ValueError, match="more than one -1"):
        sharding.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="fsdp=0"):
        sharding.MeshConfig(fsdp=0)
    with pytest.raises(ValueError, match="divisible by 3"):
        sharding.MeshConfig(tensor=3).resolve(8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.MeshConfig(data=4, fsdp=4).resolve(8)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding.MeshConfig(rules=(("embed", "model"),))
    mesh = sharding.make_mesh()
    assert mesh.axis_names == sharding.MESH_AXES and mesh.size == jax.device_count()


def test_rules_map_model_axes_and_replicate_what_does_not_divide(caplog):
    caplog.set_level(logging.INFO, logger=sharding.__name__)
    mesh = _abstract_mesh(2, 4, 2)
    assert sharding.spec_for(("embed", "mlp"), (32, 128), mesh) == P("fsdp", "tensor")
    assert sharding.spec_for(("embed", "heads", "head_dim"), (32, 4, 8), mesh) == \
        P("fsdp", "tensor", None)
    assert sharding.spec_for(("vocab", "embed"), (61, 32), mesh) == P(None, "fsdp")
    assert "replicating dim 'vocab'" in caplog.text and "61" in caplog.text
    # An axis already used by an earlier dimension cannot shard a second one.
    assert sharding.spec_for(("mlp", "heads"), (8, 8), mesh) == P("tensor", None)
    # Unnamed parameters and unknown names are replicated; axes of size 1 are dropped.
    assert sharding.spec_for(None, (3,), mesh) == P()
    assert sharding.spec_for(("router", "embed"), (4, 32), mesh) == P(None, "fsdp")
    # Experts take the tensor axis, so an expert weight's mlp dimension stays whole.
    assert sharding.spec_for(("expert", "embed", "mlp"), (4, 32, 8), mesh) == \
        P("tensor", "fsdp", None)
    assert sharding.spec_for(("embed",), (32,), _abstract_mesh(8, 1, 1)) == P(None)
    with pytest.raises(ValueError, match="differ in rank"):
        sharding.spec_for(("embed",), (3, 4), mesh)


def test_every_transformer_parameter_gets_a_sharding():
    abstract = nnx.eval_shape(lambda: Transformer(helpers.model_config(), rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    mesh = sharding.make_mesh()
    shardings = sharding.param_shardings(params, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(params)
    assert all(isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh
               for s in jax.tree.leaves(shardings))


def test_shard_model_places_parameters_on_the_mesh():
    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.arange(8.0, dtype=np.float32).reshape(2, 4),
                               out_sharding=("embed", "mlp"), eager_sharding=False)

    mesh = sharding.make_mesh()
    model = sharding.shard_model(Tiny(), mesh)
    assert model.w[...].sharding.mesh == mesh
    np.testing.assert_array_equal(model.w[...], np.arange(8.0).reshape(2, 4))


def test_batch_sharding_splits_rows_over_data_and_fsdp():
    mesh = _abstract_mesh(2, 4, 2)
    assert sharding.batch_axes(mesh) == ("data", "fsdp")
    assert sharding.batch_sharding(mesh, batch_size=16).spec == P(("data", "fsdp"))
    assert sharding.batch_sharding(mesh, leading=1).spec == P(None, ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"batch size 12 does not split .*\(8 ways\)"):
        sharding.batch_sharding(mesh, batch_size=12)
    batch = helpers.batches().__next__()
    placed = sharding.shard_batch(batch, sharding.batch_sharding(sharding.make_mesh()))
    np.testing.assert_array_equal(np.asarray(placed["inputs"]), batch["inputs"])


def test_data_parallel_and_fsdp_training_match_one_device(tmp_path):
    single = trainer.train("transformer", helpers.model_config(),
                           helpers.train_config(checkpoint_every=1, keep_checkpoints=6),
                           helpers.batches(), None, tmp_path / "single", progress=False)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=8",
           "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "tests.train.sharding_worker", str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    reference, _, _ = checkpoint.restore_model(tmp_path / "single")
    ref_params = jax.tree.leaves(nnx.state(reference, nnx.Param))
    for name in helpers.MESHES:
        assert result["start_step"][name] == 1
        np.testing.assert_allclose(result["losses"][name], single["losses"][1:],
                                   rtol=tolerances.F32, atol=tolerances.F32)
        # The multi-device checkpoint restores on this one-device process.
        restored, model_name, _ = checkpoint.restore_model(tmp_path / name)
        assert model_name == "transformer"
        for got, want in zip(jax.tree.leaves(nnx.state(restored, nnx.Param)), ref_params):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                       rtol=tolerances.F32, atol=tolerances.F32)
    assert result["fsdp_on_tp_vs_one_device_diff"] == 0.0
    # lm_head is (embed, vocab): embed over fsdp; vocab 61 does not divide over tensor=2.
    assert result["tp_specs"]["lm_head"] == ["fsdp", None]
    assert result["tp_specs"]["mlp.gate"] == ["fsdp", "tensor"]
    assert result["tp_specs"]["devices"] == 8

    # Expert parallelism: the MoE model's experts split over tensor=4 train like one device.
    moe_single = trainer.train("rmoe", helpers.moe_config(), helpers.train_config(steps=2),
                               helpers.batches(), None, tmp_path / "moe_single", progress=False)
    np.testing.assert_allclose(result["losses"]["moe"], moe_single["losses"],
                               rtol=tolerances.F32, atol=tolerances.F32)
    assert result["moe_expert_spec"] == ["tensor", None, None]
