"""The configuration every masked-diffusion sampler shares (decoding/diffusion/), with its
defaults from the official code (spec decoding.md section 4) scaled to this repository's tiny
generations, and its checks.
"""
from __future__ import annotations

import dataclasses

import gin

CACHES = ("none", "prefix", "dual")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DiffusionSamplerConfig:
    """block_length: semi-autoregressive block size (LLaDA: 32; every row's generation length
        must be a multiple of it).
    steps_per_block: refinement steps per block of the top-k schedule (llada, prophet);
        None = block_length, one token per step (LLaDA's best setting, the baseline).
    threshold: Fast-dLLM's confidence threshold tau (0.9).
    kappa / tau / radius: LocalLeap's anchor threshold (0.9), neighbourhood threshold (0.75)
        and neighbourhood radius (4).
    draft_steps: FreeDave's K drafts verified per forward (4).
    cache: Fast-dLLM's approximate block KV cache: "none", "prefix" (the prompt and finished
        blocks are cached, refreshed at each new block) or "dual" (the masked suffix too; only
        the current block is recomputed).
    prophet: Prophet's early commit on top of the sampler; prophet_thresholds are its logit-gap
        thresholds for the first, middle and last third of the nominal steps (7.5, 5.0, 2.5).
    eot_stop: end-of-text early stop (EoTP): once a masked position predicts end-of-text, the
        positions after the most confident such one are filled with it.
    learn2pd_filter: Learn2PD's trained filter (.npz of decoding/diffusion/learn2pd.py; the
        "learn2pd" sampler needs it); filter_threshold: the filter probability above which a
        masked position commits (0.96).
    """
    block_length: int = 16
    steps_per_block: int | None = None
    threshold: float = 0.9
    kappa: float = 0.9
    tau: float = 0.75
    radius: int = 4
    draft_steps: int = 4
    cache: str = "none"
    prophet: bool = False
    prophet_thresholds: tuple[float, float, float] = (7.5, 5.0, 2.5)
    eot_stop: bool = False
    learn2pd_filter: str | None = None
    filter_threshold: float = 0.96

    def __post_init__(self):
        if self.block_length < 1:
            raise ValueError(f"block_length={self.block_length} must be at least 1")
        if self.steps_per_block is not None and not 1 <= self.steps_per_block <= \
                self.block_length:
            raise ValueError(f"steps_per_block={self.steps_per_block} must be in [1, "
                             f"block_length={self.block_length}] (every step commits at "
                             "least one token) or None")
        for name in ("threshold", "kappa", "tau", "filter_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must be a probability in [0, 1]")
        if self.radius < 0:
            raise ValueError(f"radius={self.radius} must be >= 0")
        if self.draft_steps < 1:
            raise ValueError(f"draft_steps={self.draft_steps} must be at least 1")
        if self.cache not in CACHES:
            raise ValueError(f"cache={self.cache!r}; valid: {CACHES}")
        if len(self.prophet_thresholds) != 3 or any(t < 0 for t in self.prophet_thresholds):
            raise ValueError(f"prophet_thresholds={self.prophet_thresholds} must be three "
                             "logit gaps >= 0")

    @property
    def resolved_steps_per_block(self) -> int:
        return self.block_length if self.steps_per_block is None else self.steps_per_block
