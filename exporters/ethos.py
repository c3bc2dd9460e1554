"""PyTorch -> full-int8 TFLite (litert-torch) -> Vela-compiled TFLite for an Arm Ethos-U NPU.

The recipe that Vela compiles 100% onto the NPU (FIELD-NOTES): torch.export -> PT2EQuantizer
(symmetric, per-channel weights, int8 activations) -> prepare_pt2e, calibrate, convert_pt2e
(fold_quantize=False) -> litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=q)).
The TFLite's inputs and outputs are int8 too (scale and zero point recorded in the Artifact).

Exporters never import compressor: the caller passes the torch module and calibration inputs.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from .artifact import Artifact, ExportError, sha256

# Vela names an operator it leaves on the CPU in its warnings (the CPU: lines say only "Passthrough").
# devices/ethos.py reads the same output for its estimates; exporters never import devices.
_REJECTED = re.compile(r"^Warning \(supported operators\) operator: (\w+), ofm: '(.*)'")
_CPU_OP = re.compile(r"^\s*CPU:\s*(\S+)\s*=\s*(.*?)\s*(\(outputs.*\))?$")


def vela_cpu_ops(stdout: str) -> list[str]:
    """'TYPE (tensor name)' for each operator Vela leaves on the CPU."""
    lines = stdout.splitlines()
    ops = [f"{m.group(1)} ({m.group(2)[-60:]})" for ln in lines if (m := _REJECTED.match(ln))]
    return ops or [f"{m.group(1)} ({m.group(2)[-60:]})" for ln in lines if (m := _CPU_OP.match(ln))]


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1][:300] if lines else ''}"


def _tflite_io(path: Path) -> tuple[list[dict], list[dict]]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(str(path))

    def rows(details):
        return [{"name": d["name"], "shape": [int(s) for s in d["shape"]], "dtype": d["dtype"].__name__,
                 "scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])}
                for d in details]

    return rows(it.get_input_details()), rows(it.get_output_details())


def tflite_parity(path: str | Path, model, inputs) -> dict:
    """Run the int8 TFLite on ``inputs`` (a batch; one sample at a time) against PyTorch in fp32.

    Returns max abs error in the output's units and top-1 agreement (for classifiers).
    """
    import numpy as np
    import torch
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(str(path))
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    with torch.no_grad():
        ref = model.eval()(inputs)
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).detach().cpu().numpy()
    outs = []
    for x in inputs.detach().cpu().numpy():
        x = x[None]
        s, z = i["quantization"]
        if np.issubdtype(i["dtype"], np.integer) and s:
            info = np.iinfo(i["dtype"])
            x = np.clip(np.round(x / s) + z, info.min, info.max).astype(i["dtype"])
        it.set_tensor(i["index"], x.astype(i["dtype"]))
        it.invoke()
        y = it.get_tensor(o["index"]).astype(np.float32)
        s, z = o["quantization"]
        if s:
            y = (y - z) * s
        outs.append(y[0])
    got = np.stack(outs)
    diff = np.abs(got - ref)
    r = {"samples": int(len(got)), "max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
    if ref.ndim == 2 and ref.shape[1] > 1:
        r["top1_agreement"] = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return r


def export_tflite_int8(model, example_inputs: tuple, path: str | Path, *, calibration=None,
                       check_inputs=None, role: str = "student", parent: str = "export") -> Artifact:
    """Quantize ``model`` to full int8 and write a TFLite file at ``path``.

    ``calibration``: an iterable of input batches (tensors or tuples of tensors); ``example_inputs``
    alone is used when none is given (a poor calibration: say so in the report). ``check_inputs``: a
    batch tensor for the int8-vs-fp32 comparison recorded in ``extra['parity']``.
    """
    try:
        import litert_torch
        import torch
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        raise ExportError(f"full-int8 TFLite needs litert-torch ({e.name} is missing): "
                          "pip install 'compressor[ethos]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    model = model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                captured = torch.export.export(model, tuple(example_inputs)).module()
            except Exception as e:
                raise ExportError(f"torch.export of {type(model).__name__} failed (needed for int8 TFLite): "
                                  f"{_first_line(e)}") from None
            quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            prepared = prepare_pt2e(captured, quantizer)
            batches = 0
            for batch in (calibration if calibration is not None else [example_inputs]):
                batch = batch if isinstance(batch, (tuple, list)) else (batch,)
                # The TFLite has a fixed batch of example_inputs' size: feed calibration one sample at a
                # time when it is 1, so the graph sees the shapes it was captured with.
                n0 = example_inputs[0].shape[0]
                for k in range(0, batch[0].shape[0], n0):
                    prepared(*(b[k:k + n0] for b in batch))
                    batches += 1
            converted = convert_pt2e(prepared, fold_quantize=False)
            move_exported_model_to_eval(converted)  # an exported GraphModule ignores .eval()
            try:
                edge = litert_torch.convert(converted, tuple(example_inputs),
                                            quant_config=QuantConfig(pt2e_quantizer=quantizer))
                edge.export(str(tmp))
            except ExportError:
                raise
            except Exception as e:
                raise ExportError(f"litert-torch could not convert {type(model).__name__} to int8 TFLite: "
                                  f"{_first_line(e)}") from None
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    inputs, outputs = _tflite_io(path)
    import torchao

    art = Artifact(path=str(path), format="tflite", precision="int8", sha256=sha256(path),
                   bytes=path.stat().st_size, inputs=inputs, outputs=outputs,
                   toolchain={"litert_torch": litert_torch.__version__, "torch": torch.__version__,
                              "torchao": torchao.__version__},
                   role=role, parent=parent,
                   extra={"quantizer": "PT2EQuantizer symmetric per-channel int8", "calibration_batches": batches})
    if batches <= 1:
        art.extra["warning"] = "calibrated on the example input only"
    if check_inputs is not None:
        art.extra["parity"] = tflite_parity(path, model, check_inputs)
    return art


# --------------------------------------------------------------------------------------------- Vela

def vela_executable() -> str | None:
    """Vela's console script beside this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "vela"
    return str(here) if here.is_file() else shutil.which("vela")


def compile_vela(tflite: str | Path, out_dir: str | Path, *, accelerator_config: str,
                 system_config: str | None = None, memory_mode: str | None = None, config: str | None = None,
                 optimise: str = "Performance", allow_cpu_ops: bool = False, role: str = "student",
                 parent: str = "export") -> Artifact:
    """Compile an int8 TFLite for one Ethos-U configuration; the Artifact is Vela's ``*_vela.tflite``.

    Operators Vela cannot place on the NPU run on the Cortex-M; with ``allow_cpu_ops=False`` that is an
    ExportError naming them. Vela's summary CSV (cycles, inference time, SRAM/flash) goes into extra.
    """
    vela = vela_executable()
    if vela is None:
        raise ExportError("Vela is not installed: pip install 'compressor[ethos]'")
    tflite, out_dir = Path(tflite), Path(out_dir)
    if not tflite.is_file():
        raise ExportError(f"Vela: {tflite} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".vela-") as tmp:
        cmd = [vela, str(tflite), "--accelerator-config", accelerator_config, "--output-dir", tmp,
               "--optimise", optimise, "--show-cpu-operations"]
        if config:
            cmd += ["--config", config]
        if system_config:
            cmd += ["--system-config", system_config]
        if memory_mode:
            cmd += ["--memory-mode", memory_mode]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            err = [ln for ln in (p.stderr + p.stdout).strip().splitlines() if ln.strip()]
            raise ExportError(f"Vela rejected {tflite.name} for {accelerator_config}: "
                              f"{err[-1][:300] if err else 'exit code ' + str(p.returncode)}")
        cpu_ops = vela_cpu_ops(p.stdout)
        if cpu_ops and not allow_cpu_ops:
            raise ExportError(f"Vela placed {len(cpu_ops)} operator(s) of {tflite.name} on the CPU for "
                              f"{accelerator_config}: {', '.join(cpu_ops[:5])}"
                              f"{' ...' if len(cpu_ops) > 5 else ''} (full int8 of ops the NPU supports "
                              "is needed; see `vela --supported-ops-report`)")
        produced = Path(tmp) / f"{tflite.stem}_vela.tflite"
        summaries = sorted(Path(tmp).glob(f"{tflite.stem}_summary_*.csv"))
        summary = {}
        if summaries:
            with open(summaries[0], newline="") as f:
                summary = next(csv.DictReader(f), {})
        target = out_dir / f"{tflite.stem}_{accelerator_config}_vela.tflite"
        os.replace(produced, target)
        if summaries:
            os.replace(summaries[0], target.with_suffix(".csv"))
    from importlib.metadata import version

    inputs, outputs = _tflite_io(tflite)
    return Artifact(path=str(target), format="vela", precision="int8", sha256=sha256(target),
                    bytes=target.stat().st_size, inputs=inputs, outputs=outputs,
                    toolchain={"vela": version("ethos-u-vela")}, role=role, parent=parent,
                    extra={"accelerator_config": accelerator_config, "system_config": system_config,
                           "memory_mode": memory_mode, "source": tflite.name, "cpu_ops": cpu_ops,
                           "summary_csv": target.with_suffix(".csv").name if summaries else None,
                           "inference_time_s": float(summary["inference_time"]) if summary else None,
                           "cycles_total": float(summary["cycles_total"]) if summary else None})
