"""What every draft-and-verify sampler shares: sizes derived from gamma, the acceptance rule
(greedy without a sampling config, lossless with one), and building the loop state for the
models it uses. Subclasses are frozen dataclasses with `target`, `config` (with `gamma`) and,
where they draft with another model, `draft`."""
from decoding import loop, sampling
from decoding.speculative import rules


class DraftAndVerify:

    def graphs(self) -> dict:
        """The models whose caches the loop state carries."""
        draft = getattr(self, "draft", None)
        return {"target": self.target} if draft is None else {"target": self.target,
                                                               "draft": draft}

    @property
    def hist_size(self) -> int:
        # Accepted-token counts per round run from 0 to gamma + 1 (the bonus token).
        return self.config.gamma + 2

    @property
    def cache_slack(self) -> int:
        # Room past the committed tokens for one round's drafts and the bonus token.
        return self.config.gamma + 2

    @property
    def counter_names(self) -> tuple[str, ...]:
        return self.rule(None).counter_names

    def rule(self, params: sampling.SamplingParams | None):
        """The acceptance rule for this call's sampling parameters (None: greedy)."""
        return rules.GreedyRule() if params is None else rules.LosslessRule(params)

    def init(self, weights, tokens, prompt_lengths, max_new_tokens, eos_id, rng, *,
             prefill_length: int) -> loop.LoopState:
        return loop.init_state(self.graphs(), weights, tokens, prompt_lengths, max_new_tokens,
                               eos_id, rng, prefill_length=prefill_length,
                               cache_slack=self.cache_slack, hist_size=self.hist_size,
                               counters=self.counter_names)
