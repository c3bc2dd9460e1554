"""Distillation under Lightning DDP: two CPU processes (gloo) against one, same effective batch.

The recipe's trainer section passes strategy/devices/num_nodes straight to Lightning, so the same recipe
runs on GPUs and nodes. `ddp_fork` keeps the pipeline in one Python process (the script launcher of
plain `ddp` re-runs the command for every rank)."""
import json

import compressor
from conftest import TINY

TOLERANCE = 0.05  # absolute held-out accuracy


def test_two_process_ddp_matches_one_process(tmp_path):
    r = json.loads(json.dumps(TINY))
    r["distill"] = {"epochs": 10, "lr": 0.03}
    r["profile"]["runs"] = 5
    q = {}
    for strategy, devices, batch in (("auto", 1, 128), ("ddp_fork", 2, 64)):
        out = compressor.run(r, tmp_path / strategy, log=lambda s: None, overrides=[
            f"distill.trainer.strategy={strategy}", f"distill.trainer.devices={devices}", f"data.batch_size={batch}"])
        m = compressor.verify(out)
        assert m["recipe"]["distill"]["trainer"]["devices"] == devices
        q[strategy] = m["quality"]["student"]["accuracy"]
    assert q["auto"] > 0.5
    assert abs(q["ddp_fork"] - q["auto"]) <= TOLERANCE, q
