"""Masked-diffusion samplers on the shared decoding loop (spec decoding.md section 4):

    config.py     DiffusionSamplerConfig, shared by all of them (gin-configurable)
    base.py       the sampler: one forward per step, a commit rule, commit_at, options
    remasking.py  LLaDA's top-k schedule, low-confidence or random (arXiv 2502.09992): the
                  baseline ("llada", one token per step by default; "llada_random")
    threshold.py  Fast-dLLM's confidence threshold (arXiv 2505.22618): "fast_dllm"
    cache.py      Fast-dLLM's prefix and dual block KV caches: DiffusionSamplerConfig.cache
    prophet.py    Prophet's early commit (arXiv 2508.19982): "prophet", or .prophet on any
    localleap.py  LocalLeap's anchors and neighbourhoods (arXiv 2510.07081): "localleap"
    freedave.py   FreeDave's lossless draft-and-verify (arXiv 2510.00294): "freedave"
    eotp.py       end-of-text early stop (arXiv 2509.25188): DiffusionSamplerConfig.eot_stop

`SAMPLERS` is this family's part of the sampler registry (decoding/registry.py); every entry
is greedy (argmax tokens), takes no draft model, and checks its request on the host (a
diffusion model, no MASK in the prompts, generation length a multiple of block_length).
"""
from decoding.diffusion import freedave
from decoding.diffusion.base import MaskedDiffusion, check_request
from decoding.diffusion.config import DiffusionSamplerConfig
from decoding.diffusion.freedave import FreeDave
from decoding.registry import SamplerEntry


def _rule(rule: str, force_prophet: bool = False):
    def build(target, draft, config, filters):
        del draft, filters
        return MaskedDiffusion(target, config, rule, force_prophet)
    return build


def _freedave(target, draft, config, filters):
    del draft, filters
    return FreeDave(target, config)


def _entry(build, check=check_request) -> SamplerEntry:
    return SamplerEntry(build, "none", False, DiffusionSamplerConfig, check)


SAMPLERS = {
    "llada": _entry(_rule("low_confidence")),
    "llada_random": _entry(_rule("random")),
    "fast_dllm": _entry(_rule("threshold")),
    "prophet": _entry(_rule("low_confidence", force_prophet=True)),
    "localleap": _entry(_rule("localleap")),
    "freedave": _entry(_freedave, freedave.check_request),
}

__all__ = ["SAMPLERS", "DiffusionSamplerConfig", "MaskedDiffusion", "FreeDave"]
