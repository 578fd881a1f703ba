"""The pure helpers of experiments/bench/speculative.py: prompt cutting, the first generated
line, and greedy agreement (no models, no training)."""
import pytest

from experiments.bench import speculative as bench


def test_prompts_end_at_a_line_break_and_the_task_is_the_next_line():
    doc = "import os\n\n\ndef f(x):\n    return x + 1\n" + "# pad\n" * 3
    pairs = bench.cut_prompts([doc], 1, prompt_bytes=12, seed=0)
    prompt, line = pairs[0]
    assert len(prompt) == 12 and prompt.endswith(b"\n")
    start = doc.encode().index(prompt) + len(prompt)
    assert doc.encode()[start:].split(b"\n", 1)[0] == line and line.strip()
    assert len(bench.cut_prompts([doc], 5, prompt_bytes=12)) == 5   # every eligible line
    with pytest.raises(ValueError, match="num_prompts=6"):
        bench.cut_prompts([doc], 6, prompt_bytes=12)


def test_first_line_agreement_and_prefix_match():
    assert bench.prefix_match(b"    return x", b"    return y") == 11 / 12
    assert bench.prefix_match(b"", b"abc") == 0.0
    assert bench.first_line(list(b"    return x\n    pass") + [257]) == b"    return x"
    assert bench.first_line([256] + list(b"abc")) == b"abc"     # specials carry no bytes
    assert bench.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5   # stops at the divergence
    assert bench.agreement([1, 2], [1, 2, 3]) == 1.0


def test_verify_cost_times_both_calls_on_a_tiny_model():
    from experiments.bench import verify_cost
    from tests.decoding import helpers

    rows = verify_cost.measure(helpers.config(vocab=64), [2, 3], repeats=2)
    assert [r["gamma"] for r in rows] == [2, 3]
    assert all(r["one_token_ms"] > 0 and r["verify_ms"] > 0 for r in rows)
    assert all(abs(r["value"] - r["verify_ms"] / r["one_token_ms"]) < 1e-9 for r in rows)
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        verify_cost.main(["--models", "huge"])
