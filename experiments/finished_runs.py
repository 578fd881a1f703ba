"""The finished runs of a long experiment (a reproduction's training runs), one JSON line each
in WORKDIR/results.jsonl, so that a re-run skips what is done and an interrupted one resumes
at the next run instead of starting over."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Hashable


class FinishedRuns:
    """{key: row} of the rows in `workdir`/results.jsonl that `matches` (e.g. the same step
    count as this invocation), empty when fresh; `add` records a row as it finishes."""

    def __init__(self, workdir: str, key: Callable[[dict], Hashable],
                 matches: Callable[[dict], bool], *, fresh: bool = False):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "results.jsonl")
        self.key = key
        self.rows: dict[Hashable, dict[str, Any]] = {}
        if os.path.exists(self.path) and not fresh:
            with open(self.path) as f:
                for line in f:
                    row = json.loads(line)
                    if matches(row):
                        self.rows[key(row)] = row

    def __contains__(self, key: Hashable) -> bool:
        return key in self.rows

    def add(self, row: dict[str, Any]) -> None:
        self.rows[self.key(row)] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
