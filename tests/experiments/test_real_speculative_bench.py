"""The real-model speculative bench's command line (experiments/bench/real_speculative.py)
without the model: redrawing the plot from stored lines and rejecting bad arguments."""
import json

import pytest

from experiments.bench import real_speculative


def _line(case, value, calls, batch=1):
    return {"case": case, "metric": "speedup", "value": value, "batch": batch,
            "tokens_per_target_call": calls}


def test_a_case_measured_again_counts_as_last_measured():
    lines = [_line("ngram_edit_b1", 2.0, 6.0), _line("fly_edit_b4", 0.3, 2.0, batch=4),
             _line("ngram_edit_b1", 2.5, 6.1), _line("speculative_edit_b1", None, None),
             {"case": "smollm2_gamma4", "metric": "verify_cost_ratio", "value": 1.4}]
    points = real_speculative.latest_speedups(lines)
    assert {p["case"]: p["value"] for p in points} == {"ngram_edit_b1": 2.5,
                                                        "fly_edit_b4": 0.3}


def test_plot_from_redraws_the_png_from_stored_lines(tmp_path):
    stored, png = tmp_path / "bench.jsonl", tmp_path / "speedup.png"
    stored.write_text("".join(json.dumps(x) + "\n" for x in [
        _line("ngram_edit_b1", 2.0, 6.0), _line("fly_edit_b4", 0.3, 2.0, batch=4)]))
    real_speculative.main(["--plot_from", str(stored), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--hf_methods", "greedy,beam"], "unknown ['beam']"),
    (["--plot_from", "x.jsonl"], "--plot_from needs --plot")])
def test_bad_arguments_name_the_bad_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        real_speculative.main(argv)
    assert message in capsys.readouterr().err
