"""Conversion between swiftlm's Llama-style Transformer and llama.cpp's GGUF files (Touvron et
al. 2023, arXiv 2302.13971; the GGUF format of ggml-org/ggml, docs/gguf.md).

A GGUF file holds the hyperparameters (`llama.*` keys), the tokenizer and chat template
(`tokenizer.*` keys; read by train/pretrained_tokenizer.py) and the tensors, each possibly
quantized in blocks. Loading goes through Hugging Face's parameter names, so the layout work
of models/convert_hf.py is shared:

    GGUF tensor  --dequantize (gguf package)-->  float32 [out, in] ("torch layout")
                 --undo llama.cpp's q/k row permutation-->  HF LlamaForCausalLM state dict
                 --convert_hf.from_hf_state_dict-->  Transformer

The permutation: Meta's original checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...
while HF rotates halves (x_i, x_{i+d/2}). HF's converter permuted q/k rows into the half layout;
llama.cpp's convert_hf_to_gguf.py permutes them back into the interleaved layout that its RoPE
kernel expects, per head. swiftlm uses the half layout, so q/k rows are un-permuted on load and
permuted again on save.

    config_from_gguf(metadata)         hyperparameters -> TransformerConfig (refuses what the
                                       Transformer cannot reproduce exactly)
    load_gguf(path, **overrides)       -> (Transformer, GGUFInfo)
    save_gguf(model, path, dtype=...)  F32 or F16 file that llama.cpp runs (with a vocabulary)

Supported tensor types are SUPPORTED_TYPES; anything else (IQ*, ternary, MXFP4 ...) is refused
by name rather than dequantized by code this project has not tested.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from models import convert_hf
from models.transformer import Transformer, TransformerConfig

ARCHITECTURES = ("llama",)
# Block formats whose dequantization (the gguf package's) is exercised by the tests, each
# against Hugging Face transformers' own GGUF dequantizer.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K",
                   "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SAVE_DTYPES = ("f32", "f16")

# GGUF tensor name -> HF LlamaForCausalLM parameter name ({i} is the layer).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file says beside the weights: its path, name, architecture, trained context
    length, the tensor types it holds (type name -> count) and all metadata (key -> value;
    the tokenizer arrays are left to the tokenizer)."""
    path: str
    name: str | None
    architecture: str
    context_length: int | None
    tensor_types: dict[str, int]
    metadata: dict[str, Any]


# -- reading -------------------------------------------------------------------------------

def open_gguf(path):
    """A gguf.GGUFReader of the file at `path` (a reader is returned as it is). Parsing the
    metadata of a real model's file (its 49k tokenizer strings) takes seconds of Python, so a
    loader that wants the weights and the tokenizer opens the file once and hands the reader
    to both load_gguf and PretrainedTokenizer.from_gguf."""
    import gguf  # imported here: only GGUF users need the package

    if isinstance(path, gguf.GGUFReader):
        return path
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a cut or foreign file
        raise ValueError(f"{path!r} is not a readable GGUF file (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e


def _field_value(field) -> Any:
    try:
        return field.contents()
    except Exception:  # a value type the gguf package cannot decode; nothing here needs it
        return None


def read_metadata(reader, *, skip_prefix: str = "tokenizer.ggml.") -> dict[str, Any]:
    """{key: value} of a GGUFReader's fields, leaving out the (large) tokenizer arrays."""
    return {k: _field_value(f) for k, f in reader.fields.items()
            if not k.startswith(skip_prefix)}


def config_from_gguf(metadata: Mapping[str, Any], *, vocab_size: int | None = None,
                     tied: bool = True, **overrides: Any) -> TransformerConfig:
    """The TransformerConfig of a GGUF file's metadata. vocab_size: when the file has no
    `{arch}.vocab_size`, the embedding's row count. tied: whether the file lacks output.weight.
    Raises ValueError for an architecture or a feature the Transformer cannot reproduce."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; valid: {ARCHITECTURES}")

    def get(key, default=None):
        return metadata.get(f"{arch}.{key}", default)

    required = ("embedding_length", "block_count", "feed_forward_length",
                "attention.head_count")
    missing = [f"{arch}.{k}" for k in required if get(k) is None]
    if missing:
        raise ValueError(f"GGUF metadata is missing {missing}")
    if get("expert_count", 0):
        raise ValueError(f"{arch}.expert_count={get('expert_count')}: mixture-of-experts GGUF "
                         "files are not supported; only dense Llama models convert")
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{arch}.rope.scaling.type={scaling!r} is not supported: swiftlm "
                         "implements only default RoPE (valid: 'none')")
    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length") or d_model // n_heads)
    value_dim = int(get("attention.value_length") or head_dim)
    if value_dim != head_dim:
        raise ValueError(f"{arch}.attention.value_length={value_dim} differs from key_length="
                         f"{head_dim}; swiftlm's attention needs equal key and value widths")
    rope_dim = int(get("rope.dimension_count") or head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{arch}.rope.dimension_count={rope_dim} is not the head width "
                         f"{head_dim}: partial rotary embeddings are not supported")
    vocab = get("vocab_size", vocab_size)
    if vocab is None:
        raise ValueError("GGUF metadata has no vocab_size and the caller gave none")
    hf = {
        "model_type": "llama", "vocab_size": int(vocab), "hidden_size": d_model,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv") or n_heads),
        "head_dim": head_dim, "rope_theta": _f32_value(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": _f32_value(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "tie_word_embeddings": tied,
    }
    return convert_hf.config_from_hf(hf, **overrides)


def _f32_value(x: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it: GGUF stores eps
    and theta as float32, so 1e-5 comes back as 9.99999974738e-06 otherwise."""
    return float(str(np.float32(x)))


def _permutation_heads(hf_key: str, config: TransformerConfig) -> int | None:
    if hf_key.endswith("self_attn.q_proj.weight"):
        return config.n_heads
    if hf_key.endswith("self_attn.k_proj.weight"):
        return config.n_kv_heads
    return None


def interleave_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's half-rotation q/k rows -> llama.cpp's interleaved-pair rows (per head)."""
    out_dim = w.shape[0]
    return (w.reshape(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def deinterleave_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of interleave_rows: llama.cpp's q/k rows -> HF's."""
    out_dim = w.shape[0]
    return (w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    why = (" (it holds Llama-3.1-style rope scaling, which is not supported)"
           if gguf_name == "rope_freqs.weight" else "")
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in a Llama Transformer{why}")


def _check_type(tensor) -> None:
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"tensor {tensor.name!r} has type {kind}, which is not supported; "
                         f"valid: {SUPPORTED_TYPES}")


def _dequantize(tensor) -> np.ndarray:
    """One reader tensor as float32 in torch layout ([out, in]: GGUF lists dims innermost
    first)."""
    from gguf import quants

    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    values = quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, np.float32).reshape(shape)


def load_gguf(path, **overrides: Any) -> tuple[Transformer, GGUFInfo]:
    """A Transformer holding a Llama GGUF file's weights (dequantized to float32), and what
    the file says beside them. `path` is the file or a reader of it (open_gguf). overrides
    set swiftlm-only config fields (dtype, attention_impl). The architecture, then every
    tensor's type and name, are checked before any tensor is dequantized."""
    reader = open_gguf(path)
    path = os.fspath(reader.data.filename) if reader is path else path
    metadata = read_metadata(reader)
    names = [t.name for t in reader.tensors]
    if "token_embd.weight" not in names:
        raise ValueError(f"{os.fspath(path)!r} has no token_embd.weight tensor")
    embed = reader.tensors[names.index("token_embd.weight")]
    config = config_from_gguf(metadata, vocab_size=int(embed.shape[-1]),
                              tied="output.weight" not in names, **overrides)
    for tensor in reader.tensors:
        _check_type(tensor)
        _hf_name(tensor.name)
    state_dict = {}
    for tensor in reader.tensors:
        hf_key = _hf_name(tensor.name)
        w = _dequantize(tensor)
        heads = _permutation_heads(hf_key, config)
        state_dict[hf_key] = w if heads is None else deinterleave_rows(w, heads)
    model = convert_hf.from_hf_state_dict(state_dict, config)
    arch = metadata["general.architecture"]
    types = dict(collections.Counter(t.tensor_type.name for t in reader.tensors))
    info = GGUFInfo(path=os.fspath(path), name=metadata.get("general.name"), architecture=arch,
                    context_length=metadata.get(f"{arch}.context_length"), tensor_types=types,
                    metadata=metadata)
    return model, info


# -- writing -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer part of a GGUF file, in llama.cpp's terms: `model` "gpt2" (byte-level
    BPE: tokens spelled in GPT-2's byte alphabet, merges) or "llama" (SentencePiece: tokens
    with scores). token_types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte."""
    model: str
    tokens: Sequence[str]
    token_types: Sequence[int]
    bos_id: int
    eos_id: int
    pad_id: int | None = None
    unk_id: int | None = None
    pre: str | None = None
    merges: Sequence[str] = ()
    scores: Sequence[float] | None = None
    add_bos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None


def _add_vocab(writer, vocab: GGUFVocab, vocab_size: int) -> None:
    if len(vocab.tokens) != vocab_size:
        raise ValueError(f"the vocabulary has {len(vocab.tokens)} tokens but the model's "
                         f"vocab_size is {vocab_size}; they must be equal")
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    if vocab.scores is not None:
        writer.add_token_scores(list(vocab.scores))
    if vocab.model == "gpt2":
        writer.add_token_merges(list(vocab.merges))  # llama.cpp requires the key, even empty
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


@contextlib.contextmanager
def gguf_writer(path: str | os.PathLike, arch: str):
    """A gguf.GGUFWriter that writes to a temporary name; when the block ends cleanly the file
    is written out and renamed to `path`, otherwise it is removed. So a failed write never
    leaves a half file at `path` or destroys one already there."""
    import gguf

    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_gguf(model: Transformer, path: str | os.PathLike, *, dtype: str = "f32",
              vocab: GGUFVocab | None = None, name: str = "swiftlm",
              context_length: int = 2048) -> None:
    """Writes `model` as a llama-architecture GGUF file with F32 or F16 weights (norm scales
    stay F32, as llama.cpp's converter keeps 1-D tensors). llama.cpp needs a vocabulary to run
    a file; `vocab` supplies one (experiments/export_gguf.py builds it from the model's
    tokenizer). The file is written to a temporary name and renamed, so a failed write never
    leaves a half file at `path` or destroys an existing one."""
    import gguf

    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for saving; valid: {SAVE_DTYPES}")
    config = model.config
    state_dict = convert_hf.to_hf_state_dict(model)  # refuses windows and non-Llama models
    if config.tie_embeddings:
        del state_dict["lm_head.weight"]
    to_gguf = {hf: g for g, hf in _GLOBAL_NAMES.items()}
    for i in range(config.n_layers):
        for g, hf in _LAYER_NAMES.items():
            to_gguf[f"model.layers.{i}.{hf}"] = f"blk.{i}.{g}"

    with gguf_writer(path, "llama") as writer:
        writer.add_name(name)
        writer.add_context_length(context_length)
        writer.add_embedding_length(config.d_model)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.resolved_mlp_dim)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_key_length(config.resolved_head_dim)
        writer.add_value_length(config.resolved_head_dim)
        writer.add_rope_dimension_count(config.resolved_head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32"
                             else gguf.LlamaFileType.MOSTLY_F16)
        if vocab is not None:
            _add_vocab(writer, vocab, config.vocab_size)
        for hf_key, w in state_dict.items():
            heads = _permutation_heads(hf_key, config)
            if heads is not None:
                w = interleave_rows(w, heads)
            if dtype == "f16" and w.ndim > 1:
                w = w.astype(np.float16)
            writer.add_tensor(to_gguf[hf_key], np.ascontiguousarray(w))
