"""The files each device runtime needs, from the exported ONNX (and, for Ethos-U, the torch module).

One call per target for the pipeline's export stage. It takes the runtime name and the profile's
``options`` as plain data (exporters never import compressor, and do not need devices either). A target
whose toolchain is missing or which rejects the model gives a one-line problem, not an exception, so the
rest of the bundle is still written; the TensorRT build script is written even when no engine can be.
"""
from __future__ import annotations

from pathlib import Path

from .artifact import Artifact, ExportError

# runtime -> the artefact formats its device measures, best first (devices take files, not Artifacts)
FORMATS = {"onnxruntime": ("onnx",), "openvino": ("openvino", "onnx"), "tensorrt": ("tensorrt", "onnx"),
           "vela": ("tflite",)}


def export_for_target(runtime: str, options: dict, onnx: Artifact, out_dir: str | Path, *, model=None,
                      example_inputs: tuple | None = None, calibration=None, check_inputs=None,
                      precisions: tuple[str, ...] = ("fp32",)) -> tuple[list[Artifact], list[str]]:
    """(artifacts, problems) for one target runtime; ``onnx.path`` must be a readable file here."""
    out_dir = Path(out_dir)
    onnx_path = Path(onnx.path)
    stem = onnx_path.stem
    arts: list[Artifact] = []
    try:
        if runtime == "openvino":
            from .openvino import export_openvino

            arts.append(export_openvino(onnx_path, out_dir / f"{stem}.xml", precision=onnx.precision, role=onnx.role))
        elif runtime == "tensorrt":
            from .tensorrt import export_tensorrt

            # fp32 ONNX -> the fastest float precision the target lists; a QDQ ONNX -> int8
            prec = "int8" if onnx.precision == "int8" else ("fp16" if "fp16" in precisions else "fp32")
            batch = (int(options.get("min_batch", 1)), int(options.get("opt_batch", 1)), int(options.get("max_batch", 8)))
            arts.append(export_tensorrt(onnx_path, out_dir / f"{stem}.{prec}.engine", precision=prec, batch=batch,
                                        workspace_mb=int(options.get("workspace_mb", 1024)),
                                        timing_cache=out_dir / "timing.cache", role=onnx.role))
        elif runtime == "vela":
            from .ethos import compile_vela, export_tflite_int8

            if model is None or example_inputs is None:
                raise ExportError("an Ethos-U target needs the torch module and an example input (int8 TFLite)")
            tfl = out_dir / f"{stem}.int8.tflite"
            if not tfl.is_file():  # several Ethos-U targets share one int8 TFLite
                arts.append(export_tflite_int8(model, tuple(example_inputs), tfl, calibration=calibration,
                                               check_inputs=check_inputs, role=onnx.role))
            arts.append(compile_vela(tfl, out_dir, accelerator_config=options["accelerator_config"],
                                     system_config=options.get("system_config"),
                                     memory_mode=options.get("memory_mode"), config=options.get("config"),
                                     optimise=options.get("optimise", "Performance"), allow_cpu_ops=True,
                                     role=onnx.role))
        elif runtime != "onnxruntime":
            raise ExportError(f"no exporter for runtime {runtime!r}")
    except ExportError as e:
        return arts, [str(e)]
    problems = [f"Vela left {len(a.extra['cpu_ops'])} operator(s) on the CPU: {', '.join(a.extra['cpu_ops'][:3])}"
                for a in arts if a.format == "vela" and a.extra.get("cpu_ops")]
    return arts, problems
