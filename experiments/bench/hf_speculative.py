"""Hugging Face transformers' side of the real-model speculative bench
(experiments/bench/real_speculative.py): the same f32 GGUF weights and prompts through HF's
greedy `generate`, prompt lookup, LayerSkip-style `assistant_early_exit` (arXiv 2404.16710)
and assisted generation with the same distilled draft (Leviathan et al., arXiv 2211.17192)."""
from __future__ import annotations

import os
import time

# Methods by our sampler names (self_spec = `assistant_early_exit`, speculative_greedy =
# assisted generation with the draft).
HF_METHODS = ("greedy", "ngram", "self_spec", "speculative_greedy")


def hf_side(gguf: str, prompts, budget: int, stop_ids, exit_layer: int, repeats: int,
            draft_gguf: str | None = None, methods=None):
    """HF transformers on the same f32 weights and prompts, batch 1 (its assisted generation
    takes one sequence): greedy, prompt lookup (prompt_lookup_num_tokens=10, our n-gram
    gamma), LayerSkip-style `assistant_early_exit` (its self-speculation, without an
    adapter) and, given draft_gguf, assisted generation with that draft; or the subset
    `methods` of HF_METHODS (greedy always runs: it is their baseline). Yields
    (method, {seconds, tokens}), greedy first."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    directory, name = os.path.split(gguf)
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                              dtype=torch.float32).eval()
    hf.generation_config.pad_token_id = 0
    wanted = set(methods or HF_METHODS) | {"greedy"}
    methods = {"greedy": {}}
    if "ngram" in wanted:
        methods["ngram"] = {"prompt_lookup_num_tokens": 10}
    if "self_spec" in wanted:
        methods[f"self_spec_l{exit_layer}"] = {"assistant_early_exit": exit_layer}
    if draft_gguf and "speculative_greedy" in wanted:
        directory, name = os.path.split(draft_gguf)
        assistant = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                         dtype=torch.float32).eval()
        assistant.generation_config.num_assistant_tokens = 4  # our gamma
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        methods["speculative_greedy"] = {"assistant_model": assistant}
    with torch.inference_mode():
        for method, extra in methods.items():
            def call(prompts=prompts):
                rows = []
                for p in prompts:
                    ids = torch.tensor([p], dtype=torch.long)
                    o = hf.generate(ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=budget, do_sample=False,
                                    eos_token_id=list(stop_ids), **extra)
                    rows.append(o[0, len(p):].tolist())
                return rows
            call(prompts[:1])  # warm-up on one prompt: torch's first call allocates
            best, tokens = float("inf"), None
            for _ in range(repeats):
                start = time.perf_counter()
                tokens = call()
                best = min(best, time.perf_counter() - start)
            yield method, {"seconds": best, "tokens": tokens}
