"""Load a real pretrained Llama-family model with its own tokenizer: from a GGUF file, a Hugging
Face checkpoint directory, or a packaged model by short name (models/packaged.py: "smollm2").

    pre = load_pretrained(name="smollm2")                 # or gguf=PATH, or hf_dir=DIR
    ids = pre.tokenizer.encode_chat([{"role": "user", "content": "..."}])
    out = generate(pre.model, [ids], eos_id=pre.tokenizer.stop_ids, ...)

This is the one place that pairs a checkpoint with its tokenizer (models/ knows no tokenizers,
train/ knows no checkpoint formats); experiments.generate, the demo, the real-model benchmark
and the notebooks all load through it.

dtype="bfloat16" stores the weights in bf16 as well as computing in it, which halves the bytes
a decode step streams; float32 keeps the file's dequantized values exactly.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import convert_gguf, convert_hf, packaged
from models.transformer import DTYPES, Transformer
from train.pretrained_tokenizer import PretrainedTokenizer


@dataclasses.dataclass
class Pretrained:
    """A loaded model, its tokenizer, and where they came from (source: path of the file or
    directory; info: what the checkpoint says beside its weights)."""
    model: Transformer
    tokenizer: PretrainedTokenizer
    source: str
    info: dict[str, Any]


def cast_weights(model: nnx.Module, dtype: str) -> nnx.Module:
    """The model with every floating-point weight stored in `dtype` ("float32", "bfloat16")."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; valid: {tuple(DTYPES)}")
    target = DTYPES[dtype]
    graphdef, state = nnx.split(model)
    state = jax.tree.map(
        lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return nnx.merge(graphdef, state)


def load_pretrained(*, name: str | None = None, gguf: str | None = None,
                    hf_dir: str | None = None, dtype: str = "float32",
                    attention_impl: str = "xla_dense") -> Pretrained:
    """Exactly one of name (packaged.PACKAGED), gguf (a .gguf file) or hf_dir (config.json,
    safetensors and tokenizer.json). The tokenizer is checked against the model's vocabulary."""
    given = {k: v for k, v in (("name", name), ("gguf", gguf), ("hf_dir", hf_dir)) if v}
    if len(given) != 1:
        raise ValueError(f"give exactly one of name=, gguf= or hf_dir=; got {given or 'none'}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; valid: {tuple(DTYPES)}")
    overrides = {"dtype": dtype, "attention_impl": attention_impl}
    if name:
        gguf = packaged.packaged_gguf(name)
    if gguf:
        reader = convert_gguf.open_gguf(gguf)   # parsed once for weights and tokenizer
        model, gguf_info = convert_gguf.load_gguf(reader, **overrides)
        tokenizer = PretrainedTokenizer.from_gguf(reader)
        del reader   # its memory map of the file goes with it
        info = {"format": "gguf", "name": gguf_info.name,
                "tensor_types": gguf_info.tensor_types,
                "context_length": gguf_info.context_length}
        source = os.fspath(gguf)
    else:
        model = convert_hf.load_hf(hf_dir, **overrides)
        tokenizer = PretrainedTokenizer.from_hf_dir(hf_dir)
        info = {"format": "hf"}
        source = os.fspath(hf_dir)
    tokenizer.check_vocab(model.config.vocab_size)
    if dtype != "float32":
        model = cast_weights(model, dtype)
    info.update(dtype=dtype, num_params=model.num_params())
    return Pretrained(model=model, tokenizer=tokenizer, source=source, info=info)
