"""The sweep file format (see experiments/sweep_runner.py for the whole picture): the `Sweep`
gin configurable a sweep file binds, and its expansion into points (zip within an axis,
product across axes), each named by its values.
"""
from __future__ import annotations

import dataclasses
import itertools
import pathlib
import re
from typing import Any, Sequence

import gin

SWEEP_DIR = pathlib.Path(__file__).parent / "sweeps"
# What experiments/launch.py's summary.json offers to collect.
METRICS = ("train_loss", "eval_loss", "eval_perplexity", "eval_bits_per_byte", "eval_tokens",
           "eval_bytes", "num_params", "seconds", "step", "start_step")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Sweep:
    """What a sweep runs (see the module docstring). base: gin files (paths, or names of
    shipped configs); bindings: applied to every point after the base files; axes: dicts of
    binding -> values (zipped within a dict, product across dicts); metrics: keys of the
    launches' summary.json to collect."""
    base: Sequence[str] = ()
    bindings: Sequence[str] = ()
    axes: Sequence[dict[str, Sequence[Any]]] = ()
    metrics: Sequence[str] = ("eval_loss", "eval_bits_per_byte")

    def __post_init__(self):
        for name in ("base", "bindings", "metrics"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"Sweep.{name}={value!r} must be a list of strings")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "axes", tuple(dict(a) for a in self.axes))
        if not self.base:
            raise ValueError("Sweep.base is empty; name the gin files every point starts "
                             "from, e.g. Sweep.base = ['baseline_tiny.gin']")
        if not self.axes:
            raise ValueError("Sweep.axes is empty; give at least one axis, e.g. "
                             "Sweep.axes = [{'TrainConfig.lr': [1e-3, 3e-3]}]")
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ValueError(f"Sweep.metrics {bad or '(empty)'} unknown; valid: {METRICS}")
        seen = set()
        for axis in self.axes:
            if not axis:
                raise ValueError("Sweep.axes holds an empty axis {}")
            lengths = {k: len(v) for k, v in axis.items()}
            if len(set(lengths.values())) != 1 or 0 in lengths.values():
                raise ValueError(f"the bindings of a zipped axis need as many values each "
                                 f"(and at least one); got {lengths}")
            for key in axis:
                if "." not in key or key in seen:
                    raise ValueError(f"axis binding {key!r} must be 'Configurable.param' and "
                                     "appear in one axis only")
                seen.add(key)


@dataclasses.dataclass(frozen=True)
class Point:
    values: dict[str, Any]   # binding -> value, in axis order
    name: str                # its workdir's name, from the values

    def bindings(self) -> list[str]:
        return [f"{k} = {gin_literal(v)}" for k, v in self.values.items()]


def gin_literal(value: Any) -> str:
    if isinstance(value, (str, bool, int, float, type(None), list, tuple, dict)):
        return repr(value)
    raise ValueError(f"sweep value {value!r} is not a gin literal (str, number, bool, None, "
                     "list, tuple or dict)")


def resolve_sweep_file(path: str) -> str:
    """`path` as given, or a shipped sweep's name in experiments/sweeps/."""
    for candidate in (pathlib.Path(path), SWEEP_DIR / path, SWEEP_DIR / f"{path}.gin"):
        if candidate.is_file():
            return str(candidate)
    raise ValueError(f"sweep file {path!r} not found; shipped sweeps: {shipped_sweeps()}")


def shipped_sweeps() -> list[str]:
    return sorted(p.name for p in SWEEP_DIR.glob("*.gin"))


def load_sweep(path: str) -> Sweep:
    """Parses a sweep file (it may bind nothing but Sweep) into a Sweep."""
    path = resolve_sweep_file(path)
    gin.clear_config()
    try:
        gin.parse_config_file(path)
        return Sweep()
    finally:
        gin.clear_config()


def short_names(sweep: Sweep) -> dict[str, str]:
    """binding -> its column name: the parameter name, or the whole binding where two axes
    share a parameter name."""
    keys = [k for axis in sweep.axes for k in axis]
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def expand(sweep: Sweep) -> list[Point]:
    """The points of the sweep, in product order (the last axis varies fastest)."""
    names = short_names(sweep)
    per_axis = [[dict(zip(axis, vals)) for vals in zip(*axis.values())] for axis in sweep.axes]
    points = []
    for combo in itertools.product(*per_axis):
        values = {k: v for part in combo for k, v in part.items()}
        name = ",".join(f"{names[k]}={slug(v)}" for k, v in values.items())
        points.append(Point(values, name))
    return points


def slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(value)).strip("_") or "_"
