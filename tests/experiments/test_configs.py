"""Every shipped gin config parses and builds its model; bad configs fail naming the value."""
import pathlib

import pytest
from flax import nnx

from experiments import gin_config, pipeline
from models import registry
from train import data as data_lib
from train import sharding as sharding_lib
from train import trainer as trainer_lib

CONFIGS = sorted(p.name for p in gin_config.CONFIG_DIR.glob("*.gin"))


def test_configs_ship():
    assert {"quickstart.gin", "baseline_tiny.gin", "baseline_small.gin"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_parses_and_builds(name):
    gin_config.parse([name])
    model_name = pipeline.experiment()
    config = registry.lookup(model_name)[0]()
    data_config = data_lib.DataConfig()
    trainer_lib.TrainConfig()
    sharding_lib.MeshConfig()
    pipeline.check_vocab(config, data_lib.load_tokenizer(data_config))
    _, ctor = registry.lookup(model_name)
    abstract = nnx.eval_shape(lambda: ctor(config, rngs=nnx.Rngs(0)))
    assert abstract is not None


def test_unknown_configurable_names_valid_ones():
    with pytest.raises(ValueError, match=r"(?s)TrainConfg.*Did you mean \['TrainConfig'"):
        gin_config.parse(["quickstart.gin"], ["TrainConfg.steps = 3"])


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="stpes"):
        gin_config.parse(["quickstart.gin"], ["TrainConfig.stpes = 3"])


def test_unknown_model_and_missing_file_are_named():
    gin_config.parse(["quickstart.gin"], ['experiment.model = "gpt9"'])
    with pytest.raises(ValueError, match=r"unknown model 'gpt9'.*transformer"):
        pipeline.experiment()
    with pytest.raises(ValueError, match=r"nope\.gin.*quickstart\.gin"):
        gin_config.parse(["nope.gin"])


def test_too_small_vocab_is_rejected():
    gin_config.parse(["quickstart.gin"], ["TransformerConfig.vocab_size = 100"])
    config = registry.lookup("transformer")[0]()
    with pytest.raises(ValueError, match="vocab_size=100"):
        pipeline.check_vocab(config, data_lib.load_tokenizer(data_lib.DataConfig()))
