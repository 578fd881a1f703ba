"""Decode from a trained checkpoint with any sampler of decoding/ (greedy, sampling, and the
speculative family: Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318; prompt
lookup; FLy, arXiv 2511.22972; Kangaroo-style self-speculation, arXiv 2404.18911).

    python -m experiments.generate --workdir=DIR --prompt='def fib(n):' \
        [--sampler=greedy] [--draft_workdir=DIR | --adapter_dir=DIR] [--max_new_tokens=128] \
        [--temperature=0.8 --top_k=40 --top_p=0.95] [--gamma=4] \
        [--gin_bindings='FlyConfig.window = 4'] [--seed=0] [--step=N]

Prints the prompt and its continuation, then the decoding stats as one JSON line. Prompts are
tokenized with the byte tokenizer and start with its BOS id; decoding stops at its EOS id.
Sampler knobs beyond the flags (FlyConfig.entropy_threshold, SelfSpecConfig.exit_layer, ...)
are gin bindings. The flags live only here; `decode_text` does the work and is importable.
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
    flags.DEFINE_string("prompt", DEFAULT_PROMPT, "Text to continue.", flag_values=fv)
    flags.DEFINE_string("sampler", "greedy", "Sampler name (decoding.generate.SAMPLERS).",
                        flag_values=fv)
    flags.DEFINE_string("draft_workdir", None, "Workdir of the draft model (speculative, fly).",
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


def decode_text(workdir: str, prompt: str, *, sampler: str = "greedy",
                draft_workdir: str | None = None, adapter_dir: str | None = None,
                max_new_tokens: int = 128,
                temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None, gamma: int | None = None, seed: int = 0,
                step: int | None = None,
                restore: Callable[..., tuple[Any, str, Any]] | None = None
                ) -> tuple[str, dict[str, Any]]:
    """The decoded continuation of `prompt` and the decoding stats.

    restore(workdir, step) -> (model, model_name, model_config) loads a model; default
    train.checkpoint.restore_model (imported here so decoding never depends on train).
    """
    from decoding.generate import generate
    from train.tokenizer import make_tokenizer

    sampling, config = sampler_configs(sampler, temperature=temperature, top_k=top_k,
                                       top_p=top_p, gamma=gamma)
    if restore is None:
        from train.checkpoint import restore_model as restore
    tokenizer = make_tokenizer("byte")
    model, model_name, _ = restore(workdir, step)
    if model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model in {workdir!r} has vocab_size={model.vocab_size}, fewer than "
                         f"the byte tokenizer's {tokenizer.vocab_size} ids")
    if draft_workdir and adapter_dir:
        raise ValueError(f"give a draft model (draft_workdir={draft_workdir!r}) or an "
                         f"early-exit adapter (adapter_dir={adapter_dir!r}), not both")
    draft = restore(draft_workdir, None)[0] if draft_workdir else None
    if adapter_dir:
        from train.adapter_distill import load_adapter
        draft = load_adapter(adapter_dir, model)
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    start = time.perf_counter()
    out = generate(model, [ids], sampler=sampler, max_new_tokens=max_new_tokens, seed=seed,
                   draft_model=draft, sampling=sampling, config=config,
                   eos_id=tokenizer.eos_id)
    seconds = time.perf_counter() - start
    stats = {"workdir": workdir, "model": model_name, "draft_workdir": draft_workdir,
             "adapter_dir": adapter_dir,
             "prompt_tokens": len(ids), "seconds_incl_compile": seconds, **out.stats}
    return tokenizer.decode(out.tokens[0]), stats


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fv = flag_values
    if not fv.workdir:
        raise app.UsageError("--workdir is required")
    # Importing the decoding package registers its gin configurables before parsing.
    import decoding.generate  # noqa: F401
    from experiments import gin_config

    if fv.gin_file or fv.gin_bindings:
        gin_config.parse(fv.gin_file, fv.gin_bindings)
    text, stats = decode_text(
        fv.workdir, fv.prompt, sampler=fv.sampler, draft_workdir=fv.draft_workdir,
        adapter_dir=fv.adapter_dir,
        max_new_tokens=fv.max_new_tokens, temperature=fv.temperature, top_k=fv.top_k,
        top_p=fv.top_p, gamma=fv.gamma, seed=fv.seed, step=fv.step)
    print(fv.prompt + text)
    print(json.dumps(stats))


if __name__ == "__main__":
    define_flags()
    app.run(main)
