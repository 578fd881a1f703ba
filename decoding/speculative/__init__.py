"""Speculative samplers on the shared decoding loop: draft-model speculative decoding and
sampling (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318), prompt-lookup
n-gram drafting, FLy loosely speculative decoding (arXiv 2511.22972), Kangaroo-style
early-exit self-speculation (arXiv 2404.18911) and SpecDec++'s adaptive draft length
(arXiv 2405.19715).

    rules.py        accept rules: greedy, lossless, FLy
    verify.py       the target verification round and draft-cache catch-up
    draft_model.py  a separate draft model
    ngram.py        prompt lookup (alone, and FLy's first level)
    fly.py          FLy's multi-level drafter and sampler
    self_spec.py    early-exit drafting through the target's own first layers
    specdecpp.py    a draft model whose acceptance head stops drafting per row
"""
from decoding.speculative.draft_model import DraftModelSpeculative, SpeculativeConfig
from decoding.speculative.fly import FlyConfig, FlySpeculative
from decoding.speculative.ngram import NgramConfig, NgramSpeculative, ngram_propose
from decoding.speculative.rules import FlyRule, GreedyRule, LosslessRule
from decoding.speculative.self_spec import SelfSpecConfig, SelfSpeculative
from decoding.speculative.specdecpp import SpecDecPP, SpecDecPPConfig

__all__ = [
    "DraftModelSpeculative", "SpeculativeConfig", "FlyConfig", "FlySpeculative", "NgramConfig",
    "NgramSpeculative", "ngram_propose", "FlyRule", "GreedyRule", "LosslessRule",
    "SelfSpecConfig", "SelfSpeculative", "SpecDecPP", "SpecDecPPConfig",
]
