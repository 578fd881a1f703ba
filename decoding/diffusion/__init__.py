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
    learn2pd.py   Learn2PD's learned filter (arXiv 2509.25188): "learn2pd"; trained post hoc
                  on the model's confidences by learn2pd_train.py

`SAMPLERS` is this family's part of the sampler registry (decoding/registry.py); every entry
is greedy (argmax tokens), takes no draft model, and checks its request on the host (a
diffusion model, no MASK in the prompts, generation length a multiple of block_length).
"""
from decoding.diffusion import freedave, learn2pd
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


def _learn2pd(target, draft, config, filters):
    del draft, filters
    return MaskedDiffusion(target, config, "learn2pd", filter=_filter_of(config))


def _filter_of(config: DiffusionSamplerConfig) -> learn2pd.Filter:
    if config.learn2pd_filter is None:
        raise ValueError("sampler 'learn2pd' needs a trained filter: set "
                         "DiffusionSamplerConfig.learn2pd_filter=PATH.npz (trained by "
                         "decoding/diffusion/learn2pd_train.py, e.g. by "
                         "experiments.bench.diffusion into its workdir)")
    filt = learn2pd.load_filter(config.learn2pd_filter)
    if filt.block_length != config.block_length:
        raise ValueError(f"learn2pd_filter={config.learn2pd_filter!r} reads blocks of "
                         f"{filt.block_length} positions, but block_length="
                         f"{config.block_length}; use block_length={filt.block_length}")
    return filt


def _entry(build, check=check_request) -> SamplerEntry:
    return SamplerEntry(build, "none", False, DiffusionSamplerConfig, check)


SAMPLERS = {
    "llada": _entry(_rule("low_confidence")),
    "llada_random": _entry(_rule("random")),
    "fast_dllm": _entry(_rule("threshold")),
    "prophet": _entry(_rule("low_confidence", force_prophet=True)),
    "localleap": _entry(_rule("localleap")),
    "freedave": _entry(_freedave, freedave.check_request),
    "learn2pd": _entry(_learn2pd),
}

__all__ = ["SAMPLERS", "DiffusionSamplerConfig", "MaskedDiffusion", "FreeDave"]
