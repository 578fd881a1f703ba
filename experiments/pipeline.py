"""Train-and-evaluate, importable: what `experiments.launch` runs, callable from a notebook.

Everything here is configured through gin (model, data, trainer, mesh); the absl flags live only
in experiments/launch.py. `run(workdir)` builds the dataset if needed, trains (resuming from the
workdir's checkpoints), evaluates bits per byte on the validation split, and optionally decodes
a greedy continuation from the saved checkpoint; `real_model_chat` answers a question with the
packaged real model (SmolLM2-135M-Instruct) through the same decoding loop.
"""
import dataclasses
import logging
from typing import Any

import gin
import numpy as np

from models import registry
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import sharding as sharding_lib
from train import trainer as trainer_lib

log = logging.getLogger(__name__)

# Ends mid-line: a prompt ending in indentation makes a small greedy model emit more spaces.
DEFAULT_PROMPT = "class Queue:\n    def __init__(self"


@gin.configurable
def experiment(model: str = gin.REQUIRED) -> str:
    """The model name of this experiment (a key of models/registry.py)."""
    registry.lookup(model)  # unknown names fail here, naming the valid ones
    return model


def check_vocab(model_config: Any, tokenizer) -> None:
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and vocab < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size={vocab} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} ids ({tokenizer!r}); set vocab_size >= "
                         f"{tokenizer.vocab_size}")


def run(workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Trains and evaluates the gin-configured experiment in `workdir`; returns the summary."""
    model_name = experiment()
    model_config = registry.lookup(model_name)[0]()
    data_config = data_lib.DataConfig()
    tokenizer = data_lib.load_tokenizer(data_config)
    check_vocab(model_config, tokenizer)
    train_config = trainer_lib.TrainConfig()
    byte_lengths = tokenizer.token_byte_lengths()
    summary = trainer_lib.train(
        model_name, model_config, train_config,
        data_lib.make_iterator(data_config, tokenizer),
        lambda: data_lib.eval_batches(data_config, tokenizer),
        workdir, mesh_config=sharding_lib.MeshConfig(),
        bytes_fn=lambda batch: data_lib.target_byte_count(batch, byte_lengths),
        progress=progress)
    summary["model_name"] = model_name
    summary["model_config"] = dataclasses.asdict(model_config)
    return summary


def greedy_continuation(workdir: str, prompt: str = DEFAULT_PROMPT,
                        max_new_tokens: int = 96) -> str:
    """Decodes a greedy continuation of `prompt` from the workdir's latest checkpoint."""
    from decoding.generate import generate  # decoding is optional for training-only use

    model, _, _ = checkpoint_lib.restore_model(workdir)
    tokenizer = data_lib.load_tokenizer(data_lib.DataConfig())
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    out = generate(model, [ids], sampler="greedy", max_new_tokens=max_new_tokens,
                   eos_id=tokenizer.eos_id)
    return tokenizer.decode(np.asarray(out.tokens[0]).tolist())


DEMO_QUESTION = "Write a Python function that checks whether a string is a palindrome."


def real_model_chat(question: str = DEMO_QUESTION, *, model_name: str = "smollm2",
                    max_new_tokens: int = 200, on_text=None) -> tuple[str, dict[str, Any]]:
    """A packaged real model's greedy answer to a chat-formatted `question`, streamed to
    on_text(delta) a chunk of steps at a time, and its decoding stats (tokens/s among them)."""
    from experiments.generate import decode_text  # decoding is optional for training-only use

    return decode_text(None, question, model_name=model_name, chat=True,
                       max_new_tokens=max_new_tokens, on_text=on_text)
