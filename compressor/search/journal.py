"""The teacher search's ladder on disk (``Journal``): what a killed search resumes from."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .subnets import Trial


class Journal:
    """The ladder's progress on disk, so a killed search resumes where it stopped: each candidate's cost (latency
    included: measuring again would draw new noise and could change which candidates meet a budget) and rung
    scores, saved after each one. A saved candidate is reused only when the one built now has the same content
    hash (compressor.measure.model_key), and the whole file only when its ``key`` (the teacher, the data, the
    search's settings) is the run's."""

    def __init__(self, path, key: str):
        self.path, self.key, self.teacher_ms, self.reference_ms = path, key, {}, {}
        self.saved: dict[str, dict] = {}
        if path.is_file():
            doc = json.loads(path.read_text())
            if doc.get("key") == key:
                self.saved, self.teacher_ms = doc["trials"], doc.get("teacher_ms", {})
                self.reference_ms = doc.get("as_fast_as_ms", {})

    def restore(self, trial: Trial, model_key: str) -> bool:
        trial.key = model_key
        got = self.saved.get(_genome_key(trial.genome))
        if not got or got["model"] != model_key:
            return False
        trial.cost, trial.rungs, trial.start = got["cost"], got["rungs"], got.get("start", {})
        return True

    def save(self, trials: list[Trial]) -> None:
        from ..files import write_json

        write_json(self.path, {"key": self.key, "teacher_ms": self.teacher_ms, "as_fast_as_ms": self.reference_ms,
                               "trials": {_genome_key(t.genome): {"model": t.key, "cost": t.cost, "rungs": t.rungs,
                                                                    "start": t.start}
                                          for t in trials if t.key}})


def _genome_key(genome: dict) -> str:
    return json.dumps(genome, sort_keys=True)
