"""The embedded corpus: a tfds builder over the running interpreter's standard-library sources.

Every Python install carries its standard library's `.py` files, so swiftlm always has a real
(~30 MB) text corpus without downloading anything. `PythonStdlib` (tfds name "python_stdlib")
turns them into examples {"text": source, "path": path relative to the stdlib root}, split by
a stable hash of that path into train (~98%) and validation (~2%), and writes them in ArrayRecord
format, which tfds writes and grain reads without TensorFlow. The dataset version is the Python
version it was built from (3.11.7 -> tfds version "3.11.7"), since another Python ships other
sources; a build is cached under the data dir and reused by later calls.

    builder = build_stdlib_dataset()              # data dir: $SWIFTLM_DATA_DIR, else ./data
    source = builder.as_data_source("validation")  # random access, records of UTF-8 bytes
"""
from __future__ import annotations

import hashlib
import inspect
import io
import os
import pathlib
import sys
import sysconfig
import tokenize

import tensorflow_datasets as tfds
from etils import epath

DATASET_NAME = "python_stdlib"
VALIDATION_PERCENT = 2.0
# Third-party packages live inside the stdlib tree on many installs (pyenv, distro Pythons);
# they are not the standard library and differ from machine to machine.
_EXCLUDED_DIR_NAMES = frozenset({"site-packages", "dist-packages", "__pycache__"})


def default_data_dir() -> str:
    """Where datasets are built and cached: $SWIFTLM_DATA_DIR, else "data" under the cwd."""
    return os.environ.get("SWIFTLM_DATA_DIR") or "data"


def stdlib_root() -> pathlib.Path:
    """The running interpreter's standard-library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    """The running interpreter's version as a semver string, e.g. "3.11.7"."""
    major, minor, micro = sys.version_info[:3]
    return f"{major}.{minor}.{micro}"


def _is_virtualenv(directory: pathlib.Path) -> bool:
    # A virtual environment is recognised by its pyvenv.cfg, not by its name: the stdlib has
    # a genuine `venv` package that belongs in the corpus.
    return (directory / "pyvenv.cfg").is_file()


def list_stdlib_files(root: str | os.PathLike | None = None) -> list[str]:
    """Sorted POSIX paths, relative to `root`, of the stdlib's .py files.

    Skips site-packages / dist-packages, virtual environments and __pycache__; does not follow
    symlinked directories (so nothing outside the tree sneaks in).
    """
    root = pathlib.Path(root) if root is not None else stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = pathlib.Path(dirpath)
        # Pruning in place stops os.walk from descending into excluded directories at all.
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _EXCLUDED_DIR_NAMES and not _is_virtualenv(here / d))
        found.extend((here / f).relative_to(root).as_posix()
                     for f in filenames if f.endswith(".py"))
    return sorted(found)


def split_of(relative_path: str, validation_percent: float = VALIDATION_PERCENT) -> str:
    """"train" or "validation" for a file, from an MD5 of its relative path.

    MD5 (not Python's salted hash()) keeps the split identical across runs and machines, and
    hashing the path (not the contents) keeps a file on the same side across Python versions.
    """
    digest = hashlib.md5(relative_path.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 10_000
    return "validation" if bucket < validation_percent * 100 else "train"


def read_source(path: str | os.PathLike) -> str:
    """A Python file's text, decoded by its PEP 263 coding cookie.

    The stdlib test suite deliberately carries files with odd or broken encodings; those
    decode with U+FFFD replacements instead of failing the build.
    """
    raw = pathlib.Path(path).read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding, errors="replace")
    except (SyntaxError, LookupError):
        return raw.decode("utf-8", errors="replace")


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
    """tfds builder over the interpreter's stdlib .py files (see module docstring).

    `root` overrides the stdlib directory (tests use a tiny fake tree); the version still names
    the running Python, so build an overridden root into its own data dir.
    """

    VERSION = tfds.core.Version(python_version())
    RELEASE_NOTES = {python_version(): "Standard library sources of this Python version."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.x resolves the builder's file through `importlib_resources`, a backport it
        # only installs for Python < 3.9, so builders defined inside a package fail on newer
        # Pythons. This is the same file, found without it.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, root: str | os.PathLike | None = None, **kwargs):
        self._root = pathlib.Path(root) if root is not None else stdlib_root()
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Python standard library .py sources (site-packages excluded).",
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "path": tfds.features.Text(),
            }),
            homepage="https://docs.python.org/3/library/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the corpus is on this machine
        by_split = {"train": [], "validation": []}
        for rel in list_stdlib_files(self._root):
            by_split[split_of(rel)].append(rel)
        return {name: self._generate_examples(paths) for name, paths in by_split.items()}

    def _generate_examples(self, paths: list[str]):
        for rel in paths:
            text = read_source(self._root / rel)
            # Empty files (mostly bare __init__.py) would only add BOS->EOS pairs.
            if text.strip():
                yield rel, {"text": text, "path": rel}


def build_stdlib_dataset(data_dir: str | os.PathLike | None = None,
                         root: str | os.PathLike | None = None) -> PythonStdlib:
    """The prepared python_stdlib builder, building it into `data_dir` on first use only."""
    data_dir = str(data_dir or default_data_dir())
    builder = PythonStdlib(data_dir=data_dir, root=root)
    # download_and_prepare is a no-op when this version already exists in data_dir.
    try:
        builder.download_and_prepare(file_format="array_record")
    except FileExistsError:
        # Another process (a parallel test worker, a second launch) finished the same build
        # first; tfds builds into a temporary directory and renames it, so the winner's copy
        # is complete and identical. Use it.
        builder = PythonStdlib(data_dir=data_dir, root=root)
        if not builder.is_prepared():
            raise
    return builder
