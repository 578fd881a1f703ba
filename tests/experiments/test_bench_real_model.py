"""Smoke test of experiments/bench/real_model.py end to end at tiny settings (one batch-1 case,
swiftlm and HF workers in their own processes, f32) on a tiny random GGUF file in place of the
packaged SmolLM2 (whose two loads took a minute of the suite; tests/models/test_convert_gguf.py
checks the real weights against HF), checking the JSON lines' shape and that both frameworks
decode the same greedy tokens, not the speeds."""
import math

import pytest

from experiments.bench import real_model
from tests.experiments import tiny_gguf

KEYS = {"bench", "case", "metric", "value", "goal"}


def test_real_model_bench_end_to_end(tmp_path, capsys):
    # 64 new tokens, best of 2: decode time is t_64 - t_1, which must stay well above timer
    # noise on a busy machine (the tiny model decodes a token in about a millisecond; with 8
    # tokens the difference once came out negative).
    # One torch thread: on a 2-core machine busy with other tests, two are many times slower.
    lines = real_model.main(["--cases", "b1_p16", "--new_tokens", "64", "--repeats", "2",
                             "--prefill_len", "16", "--dtypes", "float32",
                             "--frameworks", "swiftlm,hf", "--torch_threads", "1",
                             "--workdir", str(tmp_path),
                             "--gguf", tiny_gguf.write(tmp_path / "tiny.gguf")])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == len(lines)
    by_metric = {(line["metric"], line["case"]): line for line in lines}
    assert set(by_metric) == {
        ("speedup_vs_hf", "b1_p16"), ("bandwidth_fraction", "b1_p16"),
        ("prefill_speedup_vs_hf", "b1_p16"), ("peak_rss_mib", "swiftlm"),
        ("peak_rss_mib", "hf"), ("peak_rss_ratio_vs_hf", "swiftlm")}
    for line in lines:
        assert KEYS <= set(line) and line["bench"] == "real_model"
        assert isinstance(line["value"], float) and line["value"] > 0 and math.isfinite(
            line["value"]), line
        assert line["load_avg_1m"] >= 0 and line["cpus"] >= 1 and line["model"] == "tiny.gguf"
    speed = by_metric[("speedup_vs_hf", "b1_p16")]
    assert speed["goal"] == 2.0 and speed["tokens_match"] and speed["first_mismatch"] is None
    assert speed["ours_decode_tokens_per_s"] > 0 and speed["hf_decode_tokens_per_s"] > 0
    assert speed["value"] == pytest.approx(
        speed["ours_decode_tokens_per_s"] / speed["hf_decode_tokens_per_s"], rel=0.01)
    bandwidth = by_metric[("bandwidth_fraction", "b1_p16")]
    # The f32 weights a decode step streams (decode.bytes_per_token): the tiny model's 157 kB.
    assert bandwidth["goal"] == 0.6 and bandwidth["bytes_per_token"]["weights"] > 1e5
    rss = by_metric[("peak_rss_mib", "swiftlm")]
    assert rss["value"] >= rss["rss_end_mib"] > 0
    assert not list(tmp_path.glob("prompts-*.npz"))  # the parent removes its prompt file
    with pytest.raises(SystemExit):
        real_model.main(["--cases", "b1_x16"])
