"""A pause that tests control, so crash, signal and lock tests act at a state the run reports, never at
a time that a faster host outruns. While the file named by COMPRESSOR_HOLD exists, a run waits after each
stage it records (``where="stage"``) and at the start of each distillation epoch after the first
(``where="epoch"``, so a checkpoint exists); a file whose text names one of them holds there alone. Unset (always, outside tests), it costs nothing."""
from __future__ import annotations

import os
import time


def hold(where: str) -> None:
    """Wait while the hold file exists; ``<file>.held`` (holding ``where``) says the run is waiting."""
    path = os.environ.get("COMPRESSOR_HOLD")
    told = False
    while path and os.path.exists(path):
        try:
            wanted = open(path).read().strip()
        except OSError:
            wanted = ""
        if wanted and wanted != where:
            return
        if not told:
            with open(path + ".held", "w") as f:
                f.write(where)
            told = True
        time.sleep(0.05)


def active() -> bool:
    return bool(os.environ.get("COMPRESSOR_HOLD"))
