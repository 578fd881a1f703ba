"""Helpers for the trainer tests: a synthetic batch iterator with the data pipeline's contract,
and (run as `python -m tests.train.sharding_worker ROOT` with 8 forced host devices) the
multi-device training check that tests/train/test_sharding.py drives in a subprocess.

Given a one-device run's workdir (ROOT/single, checkpointed every step), the worker resumes
its step-1 checkpoint under a data-parallel x FSDP (data=2, fsdp=4) mesh in ROOT/fsdp, and
prints one JSON line with that run's losses and with how its checkpoint restores under a
tensor-parallel (2, 2, 2) mesh and on one device; then it
trains a small RMoE from scratch with its experts sharded over tensor=4 (expert parallelism)
in ROOT/moe, whose losses the test compares with a one-device run.
"""
import json
import os
import shutil
import sys

import numpy as np


class SyntheticBatches:
    """Deterministic packed batches (the train.data batch contract) with get_state/set_state.

    Each row packs two documents of random length followed by padding. repeat=True yields the
    same batch forever; bad_target_at=i puts a target id outside the vocabulary into batch i
    (a tokenizer/model vocabulary mismatch), which makes that step's loss NaN.
    """

    def __init__(self, seed: int = 0, batch_size: int = 4, seq_len: int = 16, vocab: int = 61,
                 *, repeat: bool = False, bad_target_at: int | None = None):
        self.seed, self.batch_size, self.seq_len, self.vocab = seed, batch_size, seq_len, vocab
        self.repeat, self.bad_target_at = repeat, bad_target_at
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        i = 0 if self.repeat else self.index
        self.index += 1
        rng = np.random.default_rng([self.seed, i])
        b, t = self.batch_size, self.seq_len
        first = rng.integers(2, t - 2, size=b)
        second = rng.integers(1, t - first + 1)
        col = np.arange(t)[None, :]
        segment_ids = np.where(col < first[:, None], 1,
                               np.where(col < (first + second)[:, None], 2, 0)).astype(np.int32)
        positions = np.where(segment_ids == 2, col - first[:, None], col) * (segment_ids > 0)
        batch = {"inputs": rng.integers(0, self.vocab, (b, t), dtype=np.int32),
                 "targets": rng.integers(0, self.vocab, (b, t), dtype=np.int32),
                 "segment_ids": segment_ids, "positions": positions.astype(np.int32),
                 "loss_mask": (segment_ids > 0).astype(np.int32)}
        if self.bad_target_at == i:
            batch["targets"][0, 0] = self.vocab + 5
        return batch

    def get_state(self) -> dict[str, int]:
        return {"index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])


# The tiny model and run every trainer test shares, so that in one test process they compile
# the train step once (train() caches compiled programs per model, mesh and optimizer config).
MODEL_CONFIG_KWARGS = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
TRAIN_CONFIG_KWARGS = dict(steps=6, lr=1e-2, warmup_steps=2, eval_batches=2, log_every=1)
BATCH_SIZE = 8   # divisible by the data-parallel mesh below
SEQ_LEN = 16

# data=2 x fsdp=4 exercises both batch sharding and parameter sharding in one compile (a
# separate data=8 run cost another compile and found nothing this one does not).
MESHES = {"fsdp": (2, 4, 1)}
TENSOR_PARALLEL = (2, 2, 2)
EXPERT_PARALLEL = (2, 1, 4)   # 8 experts over tensor=4, rows over data=2
MOE_CONFIG_KWARGS = dict(num_experts=8, top_k=2, expert_mlp_dim=16, router_dim=8,
                         n_layers=2)


def model_config():
    from models.transformer import TransformerConfig
    return TransformerConfig(**MODEL_CONFIG_KWARGS)


def moe_config():
    from models.rmoe import RMoEConfig
    return RMoEConfig(**{**MODEL_CONFIG_KWARGS, **MOE_CONFIG_KWARGS})


def train_config(**overrides):
    from train.trainer import TrainConfig
    return TrainConfig(**{**TRAIN_CONFIG_KWARGS, **overrides})


def batches(**kwargs) -> SyntheticBatches:
    return SyntheticBatches(batch_size=BATCH_SIZE, seq_len=SEQ_LEN,
                            vocab=MODEL_CONFIG_KWARGS["vocab_size"], **kwargs)


def _max_diff(a, b) -> float:
    import jax
    from flax import nnx
    leaves_a = jax.tree.leaves(nnx.state(a, nnx.Param))
    leaves_b = jax.tree.leaves(nnx.state(b, nnx.Param))
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(leaves_a, leaves_b))


def main(root: str) -> None:
    """Resumes `root`/single's step-1 checkpoint under each mesh in `root`/<mesh name>."""
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")

    from train import checkpoint, sharding, trainer

    if jax.device_count() != 8:
        raise RuntimeError(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_"
                           f"count=8), have {jax.devices()}")
    result = {"losses": {}, "start_step": {}}
    for name, sizes in MESHES.items():
        shutil.copytree(os.path.join(root, "single", "checkpoints", "1"),
                        os.path.join(root, name, "checkpoints", "1"))
        summary = trainer.train("transformer", model_config(), train_config(checkpoint_every=0),
                                batches(), None, os.path.join(root, name),
                                mesh_config=sharding.MeshConfig(*sizes), progress=False)
        result["losses"][name] = summary["losses"]
        result["start_step"][name] = summary["start_step"]

    # The FSDP run's checkpoint read back onto a tensor-parallel mesh and onto one device.
    tp_mesh = sharding.make_mesh(sharding.MeshConfig(*TENSOR_PARALLEL))
    on_tp, _, _ = checkpoint.restore_model(os.path.join(root, "fsdp"), mesh=tp_mesh)
    on_one, _, _ = checkpoint.restore_model(os.path.join(root, "fsdp"))
    result["fsdp_on_tp_vs_one_device_diff"] = _max_diff(on_tp, on_one)
    result["tp_specs"] = {"lm_head": list(on_tp.lm_head[...].sharding.spec),
                          "mlp.gate": list(on_tp.blocks[0].mlp.gate[...].sharding.spec),
                          "devices": len(on_tp.lm_head[...].sharding.device_set)}

    # Expert parallelism: an RMoE trained from scratch with its experts over tensor=4.
    moe = trainer.train("rmoe", moe_config(), train_config(steps=2), batches(), None,
                        os.path.join(root, "moe"), progress=False,
                        mesh_config=sharding.MeshConfig(*EXPERT_PARALLEL))
    result["losses"]["moe"] = moe["losses"]
    restored, _, _ = checkpoint.restore_model(
        os.path.join(root, "moe"), mesh=sharding.make_mesh(sharding.MeshConfig(*EXPERT_PARALLEL)))
    result["moe_expert_spec"] = list(restored.blocks[0].mlp.gate[...].sharding.spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
