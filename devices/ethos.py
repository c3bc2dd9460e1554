"""Arm Ethos-U NPUs: Vela's performance estimate for an int8 TFLite, labelled as an estimate.

No board is needed: Vela compiles the model for the profile's accelerator configuration and system
configuration (clock, memory bandwidths) and reports cycles, inference time and memory use, written to
``<net>_summary_<system-config>.csv`` (Vela 5.2 does not print the time to stdout). Operators Vela
cannot place on the NPU run on the Cortex-M; they are listed, and their time is not in the estimate.
"""
from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .measurement import Measurement
from .profile import DeviceError, DeviceProfile, check_ready

_CPU_OP = re.compile(r"^\s*CPU:\s*(\S+)\s*=\s*(.*?)\s*(\(outputs.*\))?$")
# Vela names the rejected operator's type only in its warnings; the CPU: lines say "Passthrough".
_REJECTED = re.compile(r"^Warning \(supported operators\) operator: (\w+), ofm: '(.*)'")


def cpu_ops(stdout: str) -> list[str]:
    """'TYPE (tensor name)' for each operator Vela leaves on the CPU."""
    lines = stdout.splitlines()
    ops = [f"{m.group(1)} ({m.group(2)[-60:]})" for ln in lines if (m := _REJECTED.match(ln))]
    return ops or [f"{m.group(1)} ({m.group(2)[-60:]})" for ln in lines if (m := _CPU_OP.match(ln))]
_COUNT = re.compile(r"^(CPU|NPU) operators = (\d+)")


def _vela() -> str | None:
    here = Path(sys.executable).parent / "vela"
    return str(here) if here.is_file() else shutil.which("vela")


def parse_vela(stdout: str, summary_csv: str | Path | None) -> dict:
    """Vela's stdout (operator placement) and summary CSV -> one flat dict of figures."""
    out: dict = {"cpu_ops": cpu_ops(stdout), "cpu_op_count": 0, "npu_op_count": 0}
    for ln in stdout.splitlines():
        if m := _COUNT.match(ln.strip()):
            out[f"{m.group(1).lower()}_op_count"] = int(m.group(2))
    if summary_csv and Path(summary_csv).is_file():
        with open(summary_csv, newline="") as f:
            row = next(csv.DictReader(f), {})
        num = {}
        for k, v in row.items():
            try:
                num[k] = float(v)
            except (TypeError, ValueError):
                num[k] = v
        out.update({
            "inference_time_s": num.get("inference_time"), "inferences_per_second": num.get("inferences_per_second"),
            "core_clock_hz": num.get("core_clock"), "cycles_total": num.get("cycles_total"),
            "cycles_npu": num.get("cycles_npu"), "nn_macs": num.get("nn_macs"),
            # Vela reports memory in KiB
            "sram_used_kib": num.get("sram_memory_used"), "dram_used_kib": num.get("dram_memory_used"),
            "on_chip_flash_used_kib": num.get("on_chip_flash_memory_used"),
            "off_chip_flash_used_kib": num.get("off_chip_flash_memory_used"),
            "weights_original_bytes": num.get("total_original_weights"),
            "weights_encoded_bytes": num.get("total_npu_encoded_weights"),
            "accelerator": row.get("accelerator_configuration"), "system_config": row.get("system_config"),
            "memory_mode": row.get("memory_mode"),
        })
    return out


class EthosUEstimator:
    def __init__(self, profile: DeviceProfile):
        self.profile = profile
        o = profile.options
        if "accelerator_config" not in o:
            raise DeviceError(f"device profile {profile.name}: options.accelerator_config is required "
                              "(e.g. ethos-u55-128)")
        self.accelerator = o["accelerator_config"]
        self.system_config = o.get("system_config")
        self.memory_mode = o.get("memory_mode")
        self.config = o.get("config")  # a user's vela.ini; Vela's own Arm/vela.ini otherwise
        self.optimise = o.get("optimise", "Performance")

    def available(self) -> bool:
        return self.why_unavailable() is None

    def why_unavailable(self) -> str | None:
        if _vela() is None:
            return "Vela is not installed (pip install 'compressor[ethos]')"
        return None

    def run_vela(self, model: Path, out_dir: Path) -> dict:
        cmd = [_vela(), str(model), "--accelerator-config", self.accelerator, "--output-dir", str(out_dir),
               "--optimise", self.optimise, "--show-cpu-operations"]
        for flag, value in (("--config", self.config), ("--system-config", self.system_config),
                            ("--memory-mode", self.memory_mode)):
            if value:
                cmd += [flag, str(value)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            err = [ln for ln in (p.stderr + p.stdout).strip().splitlines() if ln.strip()]
            raise DeviceError(f"Vela rejected {model.name} for {self.accelerator}: "
                              f"{err[-1][:300] if err else 'exit code ' + str(p.returncode)}")
        csvs = sorted(out_dir.glob(f"{model.stem}_summary_*.csv"))
        return parse_vela(p.stdout, csvs[0] if csvs else None)

    def measure(self, model: str | Path, *, batch: int = 1, warmup: int = 0, runs: int = 0,
                max_seconds: float = 0.0, precision: str = "int8", dims: dict | None = None) -> Measurement:
        """Vela's estimate for ``model`` (an int8 .tflite); warmup/runs/max_seconds do not apply."""
        from importlib.metadata import version

        check_ready(self, precision, ': export a full-int8 TFLite')
        model = Path(model)
        if model.suffix != ".tflite" or not model.is_file():
            raise DeviceError(f"device {self.profile.name}: Vela estimates a .tflite file, not {model.name}")
        if batch != 1:
            raise DeviceError(f"device {self.profile.name}: Ethos-U models have batch 1 (asked for {batch})")
        with tempfile.TemporaryDirectory(prefix="vela-") as tmp:
            r = self.run_vela(model, Path(tmp))
        if r.get("inference_time_s") is None:
            raise DeviceError(f"Vela wrote no performance summary for {model.name}")
        if r["npu_op_count"] == 0:
            raise DeviceError(f"Vela placed no operator of {model.name} on the {self.accelerator} "
                              f"({r['cpu_op_count']} on the CPU: {', '.join(r['cpu_ops'][:3])}): "
                              "is it a full-int8 TFLite?")
        ms = r["inference_time_s"] * 1e3
        shapes = {}
        try:  # ai-edge-litert comes with litert-torch; Vela alone does not need it
            from ai_edge_litert.interpreter import Interpreter

            shapes = {d["name"]: [int(s) for s in d["shape"]] for d in Interpreter(str(model)).get_input_details()}
        except Exception:
            pass
        notes = [f"estimated by Vela {version('ethos-u-vela')} for {self.accelerator}, "
                 f"{self.system_config or 'default system config'}, {self.memory_mode or 'default memory mode'}"]
        if r["cpu_ops"]:
            notes.append(f"{len(r['cpu_ops'])} operator(s) fall back to the Cortex-M CPU and are not in the "
                         f"estimate: {', '.join(r['cpu_ops'][:5])}{' ...' if len(r['cpu_ops']) > 5 else ''}")
        return Measurement(device=self.profile.name, runtime="vela", runtime_version=version("ethos-u-vela"),
                           precision=precision, batch=1, threads=0, input_shapes=shapes, warmup=0, runs=0,
                           p50_ms=ms, p90_ms=ms, p99_ms=ms, mean_ms=ms, std_ms=0.0, min_ms=ms, cv=0.0,
                           estimated=True, artifact=model.name, provider=self.accelerator, notes=notes,
                           peak_rss_mb=None, extra=r)
