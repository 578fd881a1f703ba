"""experiments/generate.py: flags -> sampler configs -> decoded text and one JSON stats line,
with a stand-in checkpoint loader (so this test does not depend on train/checkpoint.py)."""
import json
import sys
import types

import pytest
from absl import flags

from experiments import generate as cli
from models import registry
from models.transformer import Transformer
from tests.decoding import helpers


def test_flag_values_become_sampler_configs():
    sampling, config = cli.sampler_configs("speculative", temperature=0.7, top_k=5, gamma=3)
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (0.7, 5, 1.0)
    assert config.gamma == 3
    assert cli.sampler_configs("greedy") == (None, None)
    with pytest.raises(ValueError, match=r"'greedy' is greedy; \['temperature'\]"):
        cli.sampler_configs("greedy", temperature=0.7)
    with pytest.raises(ValueError, match="temperature=0.0"):
        cli.sampler_configs("sample", temperature=0.0)
    with pytest.raises(ValueError, match="gamma=3 applies to speculative samplers"):
        cli.sampler_configs("sample", gamma=3)
    with pytest.raises(ValueError, match="unknown sampler 'topk'"):
        cli.sampler_configs("topk")


def test_main_prints_the_continuation_and_a_json_stats_line(monkeypatch, capsys):
    # A byte-vocabulary tiny model in place of a trained checkpoint.
    model = registry.construct(Transformer, helpers.config(vocab=260), seed=0)
    fake = types.ModuleType("train.checkpoint")
    fake.restore_model = lambda workdir, step=None: (model, "transformer", model.config)
    monkeypatch.setitem(sys.modules, "train.checkpoint", fake)

    flag_values = flags.FlagValues()
    cli.define_flags(flag_values)
    flag_values(["generate", "--workdir=somewhere", "--prompt=ab", "--max_new_tokens=3"])
    cli.main(["generate"], flag_values)
    lines = capsys.readouterr().out.splitlines()
    stats = json.loads(lines[-1])
    assert lines[0].startswith("ab")
    assert stats["sampler"] == "greedy" and stats["workdir"] == "somewhere"
    assert stats["prompt_tokens"] == 3 and stats["new_tokens"][0] <= 3


def test_self_speculation_decodes_through_a_saved_adapter(tmp_path):
    from train.adapter_distill import save_adapter

    model = registry.construct(Transformer, helpers.config(vocab=260), seed=0)
    save_adapter(helpers.adapter(model, noise=0.01), tmp_path / "adapter")
    restore = lambda workdir, step=None: (model, "transformer", model.config)  # noqa: E731
    text, stats = cli.decode_text("somewhere", "ab", sampler="self_spec_greedy",
                                  adapter_dir=str(tmp_path / "adapter"), max_new_tokens=6,
                                  restore=restore)
    plain, _ = cli.decode_text("somewhere", "ab", max_new_tokens=6, restore=restore)
    assert text == plain  # greedy self-speculation is lossless
    assert stats["adapter_dir"] == str(tmp_path / "adapter") and stats["target_calls"] > 0
    with pytest.raises(ValueError, match="not both"):
        cli.decode_text("somewhere", "ab", sampler="self_spec_greedy", draft_workdir="x",
                        adapter_dir=str(tmp_path / "adapter"), restore=restore)


def test_too_many_new_tokens_are_refused_at_once_naming_the_largest(monkeypatch, capsys):
    from decoding.generate import SAMPLERS
    from experiments import decode_budget

    model = registry.construct(Transformer, helpers.config(vocab=260), seed=0)
    fake = types.ModuleType("train.checkpoint")
    fake.restore_model = lambda workdir, step=None: (model, "transformer", model.config)
    monkeypatch.setitem(sys.modules, "train.checkpoint", fake)
    flag_values = flags.FlagValues()
    cli.define_flags(flag_values)
    assert all(name in flag_values["sampler"].help for name in SAMPLERS)
    flag_values(["generate", "--workdir=somewhere", "--prompt=ab",
                 "--max_new_tokens=100000000000"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate"], flag_values)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "max_new_tokens=100000000000 does not fit" in err
    largest = int(err.split("the largest that fits is ")[1].split()[0])
    # The boundary is exact: the largest value passes the check, one more does not.
    budget = 2**20
    fits, _ = decode_budget.largest_max_new_tokens([model], 3, memory_bytes=budget)
    decode_budget.check_max_new_tokens([model], 3, fits, memory_bytes=budget)
    with pytest.raises(ValueError, match=f"largest that fits is {fits} "):
        decode_budget.check_max_new_tokens([model], 3, fits + 1, memory_bytes=budget)
    assert 0 < fits < largest
    with pytest.raises(ValueError, match="context length is 40"):
        decode_budget.check_max_new_tokens([model], 3, 38, context_length=40)
