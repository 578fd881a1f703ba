"""Decode with any sampler of decoding/ (greedy, sampling, and the speculative family:
Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318; prompt lookup; FLy, arXiv
2511.22972; Kangaroo-style self-speculation, arXiv 2404.18911), from a checkpoint trained here
or from a real pretrained model with its own tokenizer and chat template.

    python -m experiments.generate --workdir=DIR --prompt='def fib(n):' \
        [--sampler=greedy] [--draft_workdir=DIR | --adapter_dir=DIR] [--max_new_tokens=128] \
        [--temperature=0.8 --top_k=40 --top_p=0.95] [--gamma=4] \
        [--gin_bindings='FlyConfig.window = 4'] [--seed=0] [--step=N] \
        [--decode_attention=double_sparse [--ds_calibration=FILE] [--ds_token_sparsity=0.125]
         [--ds_dense_layers=2] [--ds_selection=query_head] [--ds_label_channels=16]
         [--ds_label_bits=4]]
    python -m experiments.generate --model=smollm2 --chat --prompt='Reverse a list in Python.'
    python -m experiments.generate --gguf=FILE.gguf | --hf_dir=DIR  [--chat] [--dtype=bfloat16]

The text is printed as it is produced, a chunk of loop steps at a time (--chunk_steps; one
device -> host copy per chunk, never one per token), then the decoding stats as one JSON line.
A workdir checkpoint uses the byte tokenizer (prompt after its BOS id, stops at its EOS id); a
real model uses its own tokenizer, --chat applies its chat template, and decoding stops at its
end-of-turn and end-of-text tokens. Sampler knobs beyond the flags (FlyConfig.entropy_threshold,
SelfSpecConfig.exit_layer, ...) are gin bindings. The flags live only here; `decode_text` does
the work and is importable.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Sequence

from absl import app, flags

DEFAULT_PROMPT = "def fibonacci(n):\n    "


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this CLI's flags. Called under __main__ only, so importing the module (tests,
    notebooks, other launchers with a --workdir flag) defines nothing."""
    fv = flag_values
    flags.DEFINE_string("workdir", None, "Workdir of the target model's checkpoint.",
                        flag_values=fv)
    flags.DEFINE_string("model", None, "A packaged real model by short name (e.g. smollm2).",
                        flag_values=fv)
    flags.DEFINE_string("gguf", None, "A Llama-architecture GGUF file.", flag_values=fv)
    flags.DEFINE_string("hf_dir", None, "A Hugging Face Llama checkpoint directory "
                        "(config.json, safetensors, tokenizer.json).", flag_values=fv)
    flags.DEFINE_bool("chat", False, "Wrap the prompt in the model's chat template as one "
                      "user message (real models only).", flag_values=fv)
    flags.DEFINE_string("system", None, "System message for --chat (default: the "
                        "template's own).", flag_values=fv)
    flags.DEFINE_string("dtype", "float32", "Weights and compute dtype of a real model "
                        "(float32, bfloat16).", flag_values=fv)
    flags.DEFINE_string("decode_attention", "dense", "Decode attention of the target: dense or "
                        "double_sparse (Double Sparsity, arXiv 2408.07092; needs a channel "
                        "calibration: python -m experiments.calibrate_double_sparsity).",
                        flag_values=fv)
    flags.DEFINE_string("ds_calibration", None, "Double Sparsity calibration file (default: "
                        "the workdir's or the packaged model's).", flag_values=fv)
    flags.DEFINE_float("ds_token_sparsity", None, "Fraction of the context each double-sparse "
                       "query attends (default 1/16).", flag_values=fv)
    flags.DEFINE_integer("ds_dense_layers", None, "First layers that decode densely (default "
                         "2, as DoubleSparse).", flag_values=fv)
    flags.DEFINE_enum("ds_selection", None, ["kv_group", "query_head"], "Which heads share "
                      "a double-sparse token set: each KV-head group (default) or each query "
                      "head (DoubleSparse's own rule).", flag_values=fv)
    flags.DEFINE_integer("ds_label_channels", None, "Label channels r per KV head (default "
                         "head_dim / 16; the README's setting is 16 of 64).", flag_values=fv)
    flags.DEFINE_integer("ds_label_bits", None, "Label precision: 16 (default), 8 or 4 bits.",
                         flag_values=fv)
    flags.DEFINE_integer("chunk_steps", 16, "Loop steps between prints of the text so far.",
                         flag_values=fv)
    flags.DEFINE_bool("stream", True, "Print the text as it is produced.", flag_values=fv)
    flags.DEFINE_string("draft_gguf", None, "A GGUF draft model sharing the target's "
                        "tokenizer (speculative samplers).", flag_values=fv)
    flags.DEFINE_string("prompt", DEFAULT_PROMPT, "Text to continue.", flag_values=fv)
    from decoding.generate import SAMPLERS  # the registry's names, never a copy
    flags.DEFINE_string("sampler", "greedy", f"Sampler name, one of: {', '.join(SAMPLERS)}.",
                        flag_values=fv)
    flags.DEFINE_bool("verbose", False, "Show full tracebacks of errors.", flag_values=fv)
    flags.DEFINE_string("draft_workdir", None, "Workdir of the draft model (speculative, fly; "
                        "specdecpp also reads its acceptance head from DIR/acceptance_head).",
                        flag_values=fv)
    flags.DEFINE_string("adapter_dir", None,
                        "A trained early-exit adapter of the target (self_spec samplers; "
                        "train one with `python -m experiments.train_adapter`).",
                        flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.", flag_values=fv)
    flags.DEFINE_float("temperature", None, "Sampling temperature (> 0).", flag_values=fv)
    flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (0: off).",
                         flag_values=fv)
    flags.DEFINE_float("top_p", None, "Nucleus mass to keep (1.0: off).", flag_values=fv)
    flags.DEFINE_integer("gamma", None, "Draft tokens per round (speculative samplers).",
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Random seed of the sampler.", flag_values=fv)
    flags.DEFINE_multi_string("gin_file", [], "Gin files (sampler configs).", flag_values=fv)
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after files.",
                              flag_values=fv)


def sampler_configs(sampler: str, *, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None,
                    gamma: int | None = None) -> tuple[Any, Any]:
    """(sampling, config) for generate(): gin-configured defaults with the given overrides.

    Sampling knobs are only accepted by sampling samplers, gamma only by speculative ones.
    """
    from decoding import generate as generate_lib
    from decoding.sampling import SamplingConfig

    spec = generate_lib.sampler_spec(sampler)
    sampling_names = tuple(n for n in generate_lib.SAMPLERS
                           if generate_lib.sampler_spec(n).samples)
    knobs = {k: v for k, v in (("temperature", temperature), ("top_k", top_k),
                               ("top_p", top_p)) if v is not None}
    sampling = None
    if spec.samples:
        sampling = dataclasses.replace(SamplingConfig(), **knobs)
    elif knobs:
        raise ValueError(f"sampler {sampler!r} is greedy; {sorted(knobs)} apply only to "
                         f"sampling samplers: {sampling_names}")
    config = None
    if spec.config_cls is not None:
        config = spec.config_cls()
        if gamma is not None:
            config = dataclasses.replace(config, gamma=gamma)
    elif gamma is not None:
        raise ValueError(f"gamma={gamma} applies to speculative samplers, not {sampler!r}")
    return sampling, config


@dataclasses.dataclass
class _Target:
    """The model to decode from and how to talk to it."""
    model: Any
    tokenizer: Any
    description: dict[str, Any]
    stop_ids: tuple[int, ...]
    pretrained: bool


def _load_target(workdir, model_name, gguf, hf_dir, step, dtype, restore) -> _Target:
    sources = {k: v for k, v in (("workdir", workdir), ("model", model_name), ("gguf", gguf),
                                 ("hf_dir", hf_dir)) if v}
    if len(sources) != 1:
        raise ValueError(f"give exactly one of workdir, model, gguf or hf_dir; got "
                         f"{sources or 'none'}")
    if workdir:
        from train.tokenizer import make_tokenizer

        if restore is None:
            from train.checkpoint import restore_model as restore
        tokenizer = make_tokenizer("byte")
        model, name, _ = restore(workdir, step)
        if model.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model in {workdir!r} has vocab_size={model.vocab_size}, fewer "
                             f"than the byte tokenizer's {tokenizer.vocab_size} ids")
        return _Target(model, tokenizer, {"workdir": workdir, "model": name},
                       (tokenizer.eos_id,), pretrained=False)
    from experiments.pretrained import load_pretrained

    pre = load_pretrained(name=model_name, gguf=gguf, hf_dir=hf_dir, dtype=dtype)
    return _Target(pre.model, pre.tokenizer, {"source": pre.source, **pre.info},
                   tuple(pre.tokenizer.stop_ids), pretrained=True)


def prompt_ids(target: _Target, prompt: str, *, chat: bool = False,
               system: str | None = None) -> list[int]:
    """The prompt's ids: chat-formatted for --chat, else the model's plain encoding (the byte
    tokenizer's BOS first; a real model's BOS only where its metadata asks for one)."""
    if not target.pretrained:
        if chat:
            raise ValueError("--chat needs a model with a chat template; workdir checkpoints "
                             "use the byte tokenizer, which has none (use --model, --gguf or "
                             "--hf_dir)")
        return [target.tokenizer.bos_id] + target.tokenizer.encode(prompt)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        return target.tokenizer.encode_chat(messages)
    if system:
        raise ValueError(f"system={system!r} applies only with --chat")
    return target.tokenizer.encode_prompt(prompt)


class _TextStream:
    """Turns the loop's chunks of ids into printed text deltas, and times the chunks: the
    first chunk includes compilation, so the decode rate is taken over the later ones."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.shown = ""
        self.times: list[tuple[float, int]] = []

    def __call__(self, rows: list[list[int]]) -> None:
        self.times.append((time.perf_counter(), len(rows[0])))
        text = self.tokenizer.decode(rows[0])
        # A chunk may end inside a multi-byte character; hold its replacement mark back.
        stable = text.rstrip("\ufffd")
        if self.on_text is not None and stable.startswith(self.shown):
            self.on_text(stable[len(self.shown):])
            self.shown = stable

    def decode_tokens_per_second(self) -> float | None:
        if len(self.times) < 2 or self.times[-1][1] <= self.times[0][1]:
            return None
        (t0, n0), (t1, n1) = self.times[0], self.times[-1]
        return (n1 - n0) / (t1 - t0)


def decode_text(workdir: str | None, prompt: str, *, sampler: str = "greedy",
                model_name: str | None = None, gguf: str | None = None,
                hf_dir: str | None = None, chat: bool = False, system: str | None = None,
                dtype: str = "float32", decode_attention: str = "dense",
                ds_calibration: str | None = None, ds_token_sparsity: float | None = None,
                ds_dense_layers: int | None = None, ds_selection: str | None = None,
                ds_label_channels: int | None = None, ds_label_bits: int | None = None,
                draft_workdir: str | None = None, draft_gguf: str | None = None,
                adapter_dir: str | None = None, max_new_tokens: int = 128,
                temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None, gamma: int | None = None, seed: int = 0,
                step: int | None = None, on_text: Callable[[str], None] | None = None,
                chunk_steps: int = 16,
                restore: Callable[..., tuple[Any, str, Any]] | None = None
                ) -> tuple[str, dict[str, Any]]:
    """The decoded continuation of `prompt` and the decoding stats.

    The target is a workdir checkpoint, a packaged model (model_name), a GGUF file or an HF
    directory (exactly one). on_text(delta) receives the text as it is produced, every
    chunk_steps loop steps. restore(workdir, step) -> (model, model_name, model_config) loads
    a workdir model; default train.checkpoint.restore_model (imported here so decoding never
    depends on train).
    """
    from decoding.generate import generate

    sampling, config = sampler_configs(sampler, temperature=temperature, top_k=top_k,
                                       top_p=top_p, gamma=gamma)
    drafts = {k: v for k, v in (("draft_workdir", draft_workdir), ("draft_gguf", draft_gguf),
                                ("adapter_dir", adapter_dir)) if v}
    if len(drafts) > 1:
        raise ValueError(f"give a draft model or an early-exit adapter, not both: {drafts}")
    target = _load_target(workdir, model_name, gguf, hf_dir, step, dtype, restore)
    from experiments.calibrate_double_sparsity import decoding_model
    target.model = decoding_model(target.model, decode_attention, ds_calibration,
                                  workdir=workdir, pretrained=model_name,
                                  token_sparsity=ds_token_sparsity,
                                  dense_layers=ds_dense_layers, selection=ds_selection,
                                  label_channels=ds_label_channels,
                                  label_bits=ds_label_bits)
    ids = prompt_ids(target, prompt, chat=chat, system=system)
    draft = None
    if draft_workdir:
        if restore is None:
            from train.checkpoint import restore_model as restore
        draft = restore(draft_workdir, None)[0]
        if sampler.startswith("specdecpp"):
            # SpecDec++ drafts with the draft's acceptance head, saved beside it by
            # experiments/train_draft.py --head_steps (train/acceptance_distill.py).
            import os

            from train.acceptance_distill import load_head
            draft = load_head(os.path.join(draft_workdir, "acceptance_head"), draft)
    elif draft_gguf:
        from experiments.pretrained import load_pretrained

        draft = load_pretrained(gguf=draft_gguf, dtype=dtype).model
    elif adapter_dir:
        from train.adapter_distill import load_adapter
        draft = load_adapter(adapter_dir, target.model)
    from experiments.decode_budget import check_max_new_tokens
    check_max_new_tokens([target.model] + ([draft] if draft_workdir or draft_gguf else []),
                         len(ids), max_new_tokens,
                         context_length=target.description.get("context_length"))
    stream = _TextStream(target.tokenizer, on_text)
    start = time.perf_counter()
    out = generate(target.model, [ids], sampler=sampler, max_new_tokens=max_new_tokens,
                   seed=seed, draft_model=draft, sampling=sampling, config=config,
                   eos_id=list(target.stop_ids), on_chunk=stream, chunk_steps=chunk_steps)
    seconds = time.perf_counter() - start
    text = target.tokenizer.decode(out.tokens[0])
    if on_text is not None and text.startswith(stream.shown) and text != stream.shown:
        on_text(text[len(stream.shown):])
    stats = {**target.description, **drafts, "chat": chat, "prompt_tokens": len(ids),
             "seconds_incl_compile": seconds,
             "decode_tokens_per_second": stream.decode_tokens_per_second(), **out.stats,
             "tokens": out.tokens[0]}
    return text, stats


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fv = flag_values
    if not (fv.workdir or fv.model or fv.gguf or fv.hf_dir):
        raise app.UsageError("give a model: --workdir, --model, --gguf or --hf_dir")
    # orbax reports every restore (and a read-only directory) through absl; keep the
    # console to the text.
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)
    # Importing the decoding package registers its gin configurables before parsing.
    import decoding.generate  # noqa: F401
    from experiments import gin_config
    from experiments.cli_errors import USER_ERRORS, one_line_error

    if fv.gin_file or fv.gin_bindings:
        try:
            gin_config.parse(fv.gin_file, fv.gin_bindings)
        except USER_ERRORS as e:
            raise SystemExit(one_line_error(e, fv.verbose, "generate")) from None
    if not fv.chat:
        print(fv.prompt, end="", flush=True)
    elif fv.stream:
        print("assistant: ", end="", flush=True)

    def show(delta: str) -> None:
        print(delta, end="", flush=True)

    try:
        text, stats = decode_text(
            fv.workdir, fv.prompt, sampler=fv.sampler, model_name=fv.model, gguf=fv.gguf,
            hf_dir=fv.hf_dir, chat=fv.chat, system=fv.system, dtype=fv.dtype,
            decode_attention=fv.decode_attention, ds_calibration=fv.ds_calibration,
            ds_token_sparsity=fv.ds_token_sparsity, ds_dense_layers=fv.ds_dense_layers,
            ds_selection=fv.ds_selection, ds_label_channels=fv.ds_label_channels,
            ds_label_bits=fv.ds_label_bits,
            draft_workdir=fv.draft_workdir, draft_gguf=fv.draft_gguf,
            adapter_dir=fv.adapter_dir, max_new_tokens=fv.max_new_tokens,
            temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p, gamma=fv.gamma,
            seed=fv.seed, step=fv.step, on_text=show if fv.stream else None,
            chunk_steps=fv.chunk_steps)
    except USER_ERRORS as e:  # bad input: one line naming the problem (--verbose: traceback)
        print()
        raise SystemExit(one_line_error(e, fv.verbose, "generate")) from None
    if not fv.stream:
        print(text, end="")
    print()
    print(json.dumps(stats))


if __name__ == "__main__":
    define_flags()
    app.run(main)
