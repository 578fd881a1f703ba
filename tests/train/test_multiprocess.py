"""Multi-process data-parallel training through experiments/launch.py: two processes on
localhost (one CPU device each, gloo collectives, jax.distributed) train the tiny model for a
few steps and match a single-process run's losses; only process 0 prints and writes event
files, and the checkpoint both processes wrote together restores."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests import tolerances
from tests.experiments import tiny_corpus
from train import checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, bindings, cache, *extra):
    args = [sys.executable, "-m", "experiments.launch", "--gin_file=baseline_tiny.gin",
            f"--workdir={workdir}", *[f"--gin_bindings={b}" for b in bindings], *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache}
    return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_processes_match_one_process(tmp_path, tmp_path_factory):
    bindings = tiny_corpus.tiny_bindings(tiny_corpus.build(tmp_path / "data"), steps=4,
                                         checkpoint_every=2)
    cache = tiny_corpus.compile_cache(tmp_path_factory)
    port = _free_port()
    multi = [_launch(tmp_path / "multi", bindings, cache,
                     f"--coordinator_address=localhost:{port}", "--num_processes=2",
                     f"--process_id={i}") for i in range(2)]
    single = _launch(tmp_path / "single", bindings, cache)
    outputs = [p.communicate(timeout=300)[0] for p in (*multi, single)]
    for p, out in zip((*multi, single), outputs):
        assert p.returncode == 0, out[-3000:]
    summary = {name: json.loads((tmp_path / name / "summary.json").read_text())
               for name in ("multi", "single")}
    assert len(summary["single"]["losses"]) == 4
    np.testing.assert_allclose(summary["multi"]["losses"], summary["single"]["losses"],
                               rtol=tolerances.F32, atol=tolerances.F32)
    np.testing.assert_allclose(summary["multi"]["eval_loss"], summary["single"]["eval_loss"],
                               rtol=tolerances.F32)
    assert summary["multi"]["eval_bytes"] == summary["single"]["eval_bytes"]
    # Process 0 reports; process 1 prints neither the config, the eval nor the summary.
    assert '"finished": true' in outputs[0] and "gin files:" in outputs[0]
    assert "finished" not in outputs[1] and "eval loss" not in outputs[1]
    assert "gin files:" not in outputs[1]
    ckpt = checkpoint.Checkpointer(tmp_path / "multi", read_only=True, async_save=False)
    try:
        assert ckpt.steps() == [2, 4]
        assert ckpt.read_metadata(4)["model_name"] == "transformer"
    finally:
        ckpt.close()
    # (Parameters are not compared to 1e-5: Adam divides by sqrt(v), which amplifies the
    # all-reduce's different summation order on near-zero gradients.)
    model, name, _ = checkpoint.restore_model(tmp_path / "multi")
    assert name == "transformer" and model.vocab_size == 260
