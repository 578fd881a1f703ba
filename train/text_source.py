"""Text sources by name: random-access documents of one text feature of a tfds dataset split,
in ArrayRecord format through `builder.as_data_source` and grain (TensorFlow is never imported).
"python_stdlib" (train/corpus.py) is built on first use; any other tfds text dataset works by name
once prepared in the data dir. train/data.py packs these into batches; the tokenizer trainer
(train/tokenizer.py) reads them raw, which is why this lives apart from both.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
from typing import Any

import grain
import tensorflow_datasets as tfds

from train import corpus

default_data_dir = corpus.default_data_dir


def _prepared_dataset_names(data_dir: str) -> list[str]:
    # A prepared tfds dataset is NAME/[CONFIG/]VERSION/dataset_info.json under the data dir.
    root = pathlib.Path(data_dir)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir()
                  if d.is_dir() and (any(d.glob("*/dataset_info.json"))
                                     or any(d.glob("*/*/dataset_info.json"))))


def known_dataset_names(data_dir: str | os.PathLike | None = None) -> list[str]:
    """python_stdlib, the datasets prepared in `data_dir`, and tfds' catalog."""
    data_dir = str(data_dir or default_data_dir())
    names = set(tfds.list_builders(with_community_datasets=False))
    names.update(_prepared_dataset_names(data_dir), [corpus.DATASET_NAME])
    return sorted(names)


def _unknown_dataset_error(name: str, data_dir: str) -> ValueError:
    names = known_dataset_names(data_dir)
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {close}?" if close else ""
    return ValueError(
        f"unknown dataset {name!r}.{hint} Built in: [{corpus.DATASET_NAME!r}]; prepared in "
        f"{data_dir!r}: {_prepared_dataset_names(data_dir)}; valid names: {names}")


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    if name == corpus.DATASET_NAME:
        return corpus.build_stdlib_dataset(data_dir)
    try:
        # For a dataset prepared in data_dir but unknown to this tfds install, tfds falls back
        # to reading its dataset_info.json, so no builder code is needed.
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise _unknown_dataset_error(name, data_dir) from None
    if not builder.is_prepared():
        raise ValueError(
            f"dataset {name!r} is not prepared in {data_dir!r}; prepare it with "
            f"`tfds build {name} --file_format=array_record --data_dir={data_dir}`")
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"dataset {name!r} in {data_dir!r} is stored as {builder.info.file_format.value}; "
            "grain needs random access, so rebuild it with --file_format=array_record")
    return builder


def load_text_source(name: str, split: str, feature: str = "text",
                     data_dir: str | os.PathLike | None = None) -> grain.MapDataset:
    """Random-access documents (UTF-8 bytes) of one text feature of a tfds dataset split.

    `split` may use tfds slicing ("train[:10%]"). Unknown dataset names, splits and features
    raise ValueError naming the bad value and the valid ones.
    """
    data_dir = str(data_dir or default_data_dir())
    builder = _builder(name, data_dir)
    features = builder.info.features
    if feature not in features:
        raise ValueError(f"dataset {name!r} has no feature {feature!r}; its features: "
                         f"{sorted(features.keys())}")
    if not isinstance(features[feature], tfds.features.Text):
        raise ValueError(f"feature {feature!r} of dataset {name!r} is "
                         f"{type(features[feature]).__name__}, not Text")
    split_name = split.split("[")[0]
    if split_name not in builder.info.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; its splits: "
                         f"{sorted(builder.info.splits.keys())}")
    source = builder.as_data_source(split=split)
    if len(source) == 0:
        raise ValueError(f"split {split!r} of dataset {name!r} has no examples")
    return grain.MapDataset.source(source).map(_Feature(feature))


@dataclasses.dataclass(frozen=True)
class _Feature:
    """Picks one feature from a record (a class, not a lambda, so pipelines can pickle)."""
    key: str

    def __call__(self, record: dict[str, Any]) -> bytes | str:
        return record[self.key]
