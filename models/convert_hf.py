"""Conversion between swiftlm's Llama-style Transformer and Hugging Face's LlamaForCausalLM
(Touvron et al. 2023, arXiv 2302.13971).

The two models compute the same function: pre-norm RMSNorm blocks, GQA attention with RoPE in
the "rotate half" layout, SwiGLU, a final RMSNorm and an optionally tied head. Only the weight
layout differs: torch `Linear` weights are [out, in] with heads flattened into one axis, while
swiftlm keeps [in, ...out] with explicit head axes. Because both use rotate-half RoPE, q/k need
no permutation (that permutation only exists between Meta's original checkpoints and HF's).

    config_to_hf / config_from_hf          TransformerConfig <-> LlamaConfig dict (config.json)
    to_hf_state_dict / from_hf_state_dict  model <-> {HF parameter name: array}
    save_hf / load_hf                      model <-> directory of config.json + safetensors

Only numpy and safetensors are imported: loading an HF checkpoint needs neither torch nor
transformers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors import numpy as safetensors_numpy

from models.transformer import Transformer, TransformerConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # sharded checkpoints (large HF models)

# HF spells SiLU both ways; both map to torch.nn.functional.silu.
_SILU_NAMES = ("silu", "swish")
# Rotary inverse-frequency buffers that older HF checkpoints saved; they are recomputed from
# rope_theta, so they carry no information and are skipped.
_IGNORED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# -- configs -------------------------------------------------------------------------------

def config_to_hf(config: TransformerConfig, *, max_position_embeddings: int = 2048,
                 bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> dict[str, Any]:
    """A LlamaConfig-compatible dict (the contents of config.json) for `config`.

    max_position_embeddings is informational for default RoPE (neither side caps positions).
    bos/eos default to None rather than HF's Llama defaults (1, 2), which would be arbitrary ids
    in swiftlm's vocabularies and make HF's `generate` stop on them.
    """
    if config.window is not None:
        raise ValueError(f"config.window={config.window}: LlamaForCausalLM has no sliding-window "
                         "attention; only window=None converts")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.resolved_mlp_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim,
        "rms_norm_eps": config.norm_eps,
        # transformers < 5 reads rope_theta; >= 5 reads rope_parameters. Writing both keeps the
        # file loadable by either.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",  # swiftlm parameters are always f32
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def _check_rope(hf: Mapping[str, Any]) -> float:
    """rope_theta of an HF config, refusing any RoPE variant other than Llama's default."""
    scaling = hf.get("rope_scaling")
    if scaling is not None and _rope_type(scaling) != "default":
        raise ValueError(f"rope_scaling={scaling!r} is not supported: swiftlm implements only "
                         "default RoPE (rope_scaling must be null)")
    params = hf.get("rope_parameters")
    if params is not None:
        if _rope_type(params) != "default":
            raise ValueError(f"rope_parameters={params!r} is not supported: swiftlm implements "
                             "only rope_type 'default'")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"rope_parameters={params!r}: partial rotary embeddings are not "
                             "supported (partial_rotary_factor must be 1)")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def _rope_type(rope: Mapping[str, Any]) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """The TransformerConfig of a Llama config.json dict.

    overrides set swiftlm-only fields (attention_impl, dtype) or replace converted ones.
    Raises ValueError for anything the Transformer cannot reproduce exactly.
    """
    hf = dict(hf_config)
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"model_type={model_type!r} is not supported; valid: 'llama'")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise ValueError(f"HF config is missing {missing}; a Llama config needs {list(required)}")
    act = hf.get("hidden_act", "silu")
    if act not in _SILU_NAMES:
        raise ValueError(f"hidden_act={act!r} is not supported; valid: {_SILU_NAMES} (SwiGLU)")
    for bias in ("attention_bias", "mlp_bias"):
        if hf.get(bias, False):
            raise ValueError(f"{bias}={hf[bias]!r} is not supported: swiftlm's Transformer has "
                             "no biases")
    rope_theta = _check_rope(hf)

    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    n_kv_heads = hf.get("num_key_value_heads") or n_heads
    head_dim = hf.get("head_dim") or d_model // n_heads
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        mlp_dim=hf["intermediate_size"], rope_theta=rope_theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    # Leave head_dim / mlp_dim at None where they equal TransformerConfig's defaults, so that
    # config_from_hf(config_to_hf(c)) == c.
    default = TransformerConfig(**{**fields, "head_dim": None, "mlp_dim": None})
    if head_dim == default.resolved_head_dim:
        fields["head_dim"] = None
    if fields["mlp_dim"] == default.resolved_mlp_dim:
        fields["mlp_dim"] = None
    fields.update(overrides)
    return TransformerConfig(**fields)


# -- weights -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
    """One parameter: its path in the NNX model, its HF name and shape, and the two layouts."""
    path: tuple
    hf_key: str
    hf_shape: tuple[int, ...]
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:  # [in, out] <-> torch Linear's [out, in]
    return w.T


def _param_table(config: TransformerConfig) -> list[_Entry]:
    """Every parameter of `config`'s Transformer, in HF's order."""
    d, v = config.d_model, config.vocab_size
    h, hkv, dh, f = (config.n_heads, config.n_kv_heads, config.resolved_head_dim,
                     config.resolved_mlp_dim)
    same, transpose = _same, _transpose

    def heads_in(n):  # ours [d, n, dh] <-> torch Linear(d -> n*dh) weight [n*dh, d]
        return (lambda w: w.reshape(d, n * dh).T, lambda w: w.T.reshape(d, n, dh))

    o_to, o_from = (lambda w: w.reshape(h * dh, d).T, lambda w: w.T.reshape(h, dh, d))
    table = [_Entry(("embed", "table"), "model.embed_tokens.weight", (v, d), same, same)]
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        blk = ("blocks", i)
        table += [
            _Entry(blk + ("attn", "q_proj"), p + "self_attn.q_proj.weight", (h * dh, d),
                   *heads_in(h)),
            _Entry(blk + ("attn", "k_proj"), p + "self_attn.k_proj.weight", (hkv * dh, d),
                   *heads_in(hkv)),
            _Entry(blk + ("attn", "v_proj"), p + "self_attn.v_proj.weight", (hkv * dh, d),
                   *heads_in(hkv)),
            _Entry(blk + ("attn", "o_proj"), p + "self_attn.o_proj.weight", (d, h * dh),
                   o_to, o_from),
            _Entry(blk + ("mlp", "gate"), p + "mlp.gate_proj.weight", (f, d), transpose, transpose),
            _Entry(blk + ("mlp", "up"), p + "mlp.up_proj.weight", (f, d), transpose, transpose),
            _Entry(blk + ("mlp", "down"), p + "mlp.down_proj.weight", (d, f), transpose, transpose),
            _Entry(blk + ("attn_norm", "scale"), p + "input_layernorm.weight", (d,), same, same),
            _Entry(blk + ("mlp_norm", "scale"), p + "post_attention_layernorm.weight", (d,),
                   same, same),
        ]
    table.append(_Entry(("final_norm", "scale"), "model.norm.weight", (d,), same, same))
    if not config.tie_embeddings:
        table.append(_Entry(("lm_head",), "lm_head.weight", (v, d), transpose, transpose))
    return table


def _check_convertible(model: Transformer) -> TransformerConfig:
    if not isinstance(model, Transformer) or not isinstance(model.config, TransformerConfig):
        raise ValueError(f"expected a swiftlm Transformer, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        if any(w is not None for w in block.attn.windows):
            raise ValueError(f"block {i} has attention windows {block.attn.windows}; "
                             "LlamaForCausalLM only has full causal attention")
    config_to_hf(model.config)  # raises on config fields HF cannot express
    return model.config


def to_hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """{LlamaForCausalLM parameter name: float32 array}, loadable with load_state_dict(strict).

    With tied embeddings, lm_head.weight is included as a copy of the embedding, because
    torch's state_dict of a tied LlamaForCausalLM lists the shared tensor under both names.
    """
    config = _check_convertible(model)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for entry in _param_table(config):
        ours = np.asarray(params[entry.path][...], dtype=np.float32)
        # A writable C-ordered copy: safetensors and torch.from_numpy want contiguous buffers,
        # and a view of a jax array is read-only.
        out[entry.hf_key] = np.array(entry.to_hf(ours), order="C", copy=True)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].copy()
    return out


def from_hf_state_dict(state_dict: Mapping[str, Any], config: TransformerConfig) -> Transformer:
    """A Transformer holding the weights of an HF Llama state dict (arrays in any float dtype,
    converted to f32). Keys and shapes are checked against `config` before anything is built."""
    table = _param_table(config)
    expected = {e.hf_key for e in table}
    given = set(state_dict)
    missing = sorted(expected - given)
    if missing:
        raise ValueError(f"state dict is missing {len(missing)} key(s) needed by {config}: "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    # A tied checkpoint may still list the head (torch's state_dict names the shared tensor
    # twice); it is accepted if it really is the embedding, checked below.
    tied_head = config.tie_embeddings and "lm_head.weight" in given
    allowed = {"lm_head.weight"} if tied_head else set()
    unexpected = sorted(k for k in given - expected - allowed if not _IGNORED_KEY.fullmatch(k))
    if unexpected:
        raise ValueError(f"state dict has {len(unexpected)} key(s) that {config} has no place "
                         f"for: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    arrays = {}
    for entry in table:
        value = np.asarray(state_dict[entry.hf_key])
        if value.shape != entry.hf_shape:
            raise ValueError(f"{entry.hf_key} has shape {value.shape}; the config expects "
                             f"{entry.hf_shape}")
        # asarray, not astype: an f32 input is used as is (no second copy of the model; a
        # 135M-parameter GGUF load peaked at 1.9 GB with the copy).
        arrays[entry.path] = entry.from_hf(np.asarray(value, np.float32))
    if tied_head:
        head = np.asarray(state_dict["lm_head.weight"])
        embed = np.asarray(state_dict["model.embed_tokens.weight"])
        if head.shape != embed.shape or not np.array_equal(head, embed):
            raise ValueError("config.tie_embeddings=True but lm_head.weight differs from "
                             "model.embed_tokens.weight; use tie_embeddings=False")

    # Build the module abstractly (no random init), then drop the converted arrays in place.
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    for path, variable in flat:
        variable.set_value(jnp.asarray(arrays.pop(path)))  # pop: free each host copy early
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# -- files ---------------------------------------------------------------------------------

def save_hf(model: Transformer, directory: str | os.PathLike) -> None:
    """Writes config.json and model.safetensors that LlamaForCausalLM.from_pretrained reads.

    A tied head is stored once, under model.embed_tokens.weight, as HF's own save_pretrained
    does.
    """
    state_dict = to_hf_state_dict(model)
    if model.config.tie_embeddings:
        del state_dict["lm_head.weight"]
    os.makedirs(directory, exist_ok=True)
    # metadata format "pt": transformers refuses safetensors files without a known format tag.
    safetensors_numpy.save_file(state_dict, os.path.join(directory, WEIGHTS_FILE),
                                metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(model.config), f, indent=2)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays. numpy has no bfloat16, so bf16
    tensors (the usual dtype of released checkpoints) are read through the flax backend, which
    yields ml_dtypes.bfloat16 arrays."""
    out, bf16 = {}, []
    with safe_open(path, framework="numpy") as f:
        for key in f.keys():
            if f.get_slice(key).get_dtype() == "BF16":
                bf16.append(key)
            else:
                out[key] = f.get_tensor(key)
    if bf16:
        with safe_open(path, framework="flax") as f:
            for key in bf16:
                out[key] = np.asarray(f.get_tensor(key))
    return out


def load_hf(directory: str | os.PathLike, **overrides: Any) -> Transformer:
    """The Transformer stored in an HF Llama checkpoint directory (config.json plus
    model.safetensors, or shards listed in model.safetensors.index.json).

    overrides are passed to config_from_hf (e.g. attention_impl, dtype).
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"{directory!r} has no {CONFIG_FILE}; not an HF checkpoint directory")
    with open(config_path) as f:
        config = config_from_hf(json.load(f), **overrides)

    single = os.path.join(directory, WEIGHTS_FILE)
    index = os.path.join(directory, WEIGHTS_INDEX_FILE)
    if os.path.isfile(single):
        shards = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    else:
        raise ValueError(f"{directory!r} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")
    state_dict: dict[str, np.ndarray] = {}
    for shard in shards:
        state_dict.update(_read_safetensors(shard))
    return from_hf_state_dict(state_dict, config)
