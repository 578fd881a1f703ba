"""Training-progress reporting: a console progress bar (tqdm) and TensorBoard event files
(tensorboardX) in `<workdir>/tensorboard`.

Scalars written: train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/steps_per_s,
eval/loss, eval/perplexity, eval/bits_per_byte, and the model's own metrics (ModelOutput.metrics)
under model/ (a vector metric, e.g. an expert-load histogram, becomes one scalar per entry).
Only process 0 writes, so multi-host runs do not race on the files.
"""
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm

# tensorboardX imports torch, where installed, only to accept torch tensors (which nothing
# here passes): 4 s of every launch's start. Hide torch from that one import.
_hidden = "torch" not in sys.modules
if _hidden:
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail
try:
    from tensorboardX import SummaryWriter
finally:
    if _hidden:
        del sys.modules["torch"]

TENSORBOARD_SUBDIR = "tensorboard"


def _scalars(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in values.items():
        if isinstance(value, Mapping):  # nested model metrics (per-layer groups) -> a/b/c
            out.update(_scalars(f"{prefix}/{name}", value))
            continue
        array = np.asarray(value)
        if array.size == 1:  # reshape: numpy refuses float() of a 1-element vector
            out[f"{prefix}/{name}"] = float(array.reshape(()))
        else:
            for i, v in enumerate(array.ravel()):
                out[f"{prefix}/{name}/{i}"] = float(v)
    return out


class MetricsLogger:
    """Progress bar plus TensorBoard writer for one training run."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int,
                 progress: bool = True):
        self._main = jax.process_index() == 0
        self._writer = (SummaryWriter(os.path.join(workdir, TENSORBOARD_SUBDIR))
                        if self._main else None)
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                              disable=not (progress and self._main), dynamic_ncols=True)
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self._tokens = 0

    def log_step(self, step: int, metrics: Mapping[str, Any], tokens: int,
                   write: bool) -> dict[str, float]:
        """Record one finished step (`tokens` processed); with `write`, flush rates and
        scalars for the steps since the last write. Returns the scalars written (or {})."""
        self._tokens += tokens
        self._bar.update(step - self._bar.n)
        if not write:
            return {}
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        steps_per_s = (step - self._last_step) / elapsed
        tokens_per_s = self._tokens / elapsed
        self._last_time, self._last_step, self._tokens = now, step, 0
        model_metrics = metrics.get("model", {})
        core = {k: v for k, v in metrics.items() if k != "model"}
        scalars = {**_scalars("train", core), **_scalars("model", model_metrics),
                   "train/tokens_per_s": tokens_per_s, "train/steps_per_s": steps_per_s}
        self._bar.set_postfix(loss=f"{scalars['train/loss']:.4f}",
                              lr=f"{scalars['train/lr']:.2e}",
                              tok_s=f"{tokens_per_s:.3g}", refresh=False)
        self._write(step, scalars)
        return scalars

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        self._write(step, _scalars("eval", metrics))
        if not self._main:
            return
        shown = ("loss", "perplexity", "bits_per_byte")
        self._bar.write(f"step {step}: eval " + ", ".join(
            f"{k} {metrics[k]:.4f}" for k in shown if k in metrics))

    def _write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
