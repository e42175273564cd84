"""The edited model's scores of a sequence, kept across evaluations while they provably still hold.

A sequential study scores its earlier edits again in every later round (a sample of them, all of them
at the end). Where an editor can name everything its effect on a prompt depends on
(``Editor.row_versions``: MEMoE with a grown adapter names the row's anchor, the frozen block the anchor
index routes it to and that block's weights), a sequence scored under the same version gives the same
teacher-forced argmaxes and log-probs, and the same greedy generation, as before; ``ScoreMemo`` keeps
them, keyed by (the sequence's token ids, the version), and writes the ones found in this process to a
JSON file that a later evaluation (another task, another process) reads again. A row whose version has
changed (a re-edit moved its subject to a new block; a newly edited subject is found in it) or that has
none is computed again. Written by hand because it is a dictionary and a file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence


class ScoreMemo:
    """Teacher-forced results (argmax ids, target ids, mean log-prob) and generations, by key. ``files``:
    earlier ``save`` outputs of the same study and model."""

    def __init__(self, files: Sequence[str | Path] = ()):
        self.tf: dict[str, tuple[list[int], list[int], float]] = {}
        self.gen: dict[str, str] = {}
        self.new_tf: dict[str, tuple[list[int], list[int], float]] = {}
        self.new_gen: dict[str, str] = {}
        self.hits = self.misses = 0
        for f in files:
            data = json.loads(Path(f).read_text())
            if data.get("kind") != "memoe-score-memo":
                raise ValueError(f"{f}: not a memoe score memo (field 'kind')")
            self.tf.update({k: (v[0], v[1], v[2]) for k, v in data["tf"].items()})
            self.gen.update(data["gen"])

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha1(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()

    def lookup(
        self, versions: Sequence[str | None], key_of: Callable[[int, str], str], get: Callable
    ) -> tuple[dict, dict]:
        """For rows with a version: their keys (``key_of(row, version)``) and the kept values found by
        ``get`` (``get_tf`` or ``get_gen``), both by row; counts the hits and misses."""
        keys = {i: key_of(i, v) for i, v in enumerate(versions) if v is not None}
        found = {i: got for i, k in keys.items() if (got := get(k)) is not None}
        self.hits, self.misses = self.hits + len(found), self.misses + len(versions) - len(found)
        return keys, found

    def get_tf(self, key: str):
        return self.new_tf.get(key) or self.tf.get(key)

    def put_tf(self, key: str, pred: list[int], target: list[int], logprob: float) -> None:
        if key not in self.tf:
            self.new_tf[key] = (list(pred), list(target), float(logprob))

    def get_gen(self, key: str) -> str | None:
        return self.new_gen[key] if key in self.new_gen else self.gen.get(key)

    def put_gen(self, key: str, text: str) -> None:
        if key not in self.gen:
            self.new_gen[key] = text

    @property
    def new(self) -> bool:
        return bool(self.new_tf or self.new_gen)

    def save(self, path: str | Path) -> Path | None:
        """The entries found since this object was made (None: there are none)."""
        if not self.new:
            return None
        doc = {"kind": "memoe-score-memo", "tf": self.new_tf, "gen": self.new_gen}
        Path(path).write_text(json.dumps(doc, separators=(",", ":")))
        return Path(path)
