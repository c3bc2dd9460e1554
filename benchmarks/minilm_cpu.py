"""MiniLM-L6 on this CPU: the compressed student against what a user would do instead, side by side.

    python benchmarks/minilm_cpu.py                          # compress run minilm-l6, then the table
    python benchmarks/minilm_cpu.py --work /tmp/minilm --set distill.epochs=1 --runs 20

1. `compress run minilm-l6` (profiles/recipes/minilm-l6.yaml): MiniLM-L6 pruned to 3 layers, distilled
   on docstrings, int8 by ONNX Runtime's dynamic per-channel quantizer. A finished bundle in --work is
   reused while its recipe is unchanged.
2. The same three runtimes for the teacher (the peers) and for the student:
     ORT fp32            ONNX Runtime, the fp32 ONNX export
     ORT dynamic int8    ONNX Runtime dynamic quantization, int8 weights per channel (Optimum's
                         ORTQuantizer path for Transformers on CPUs: same quantizer, same settings)
     NNCF int8 OpenVINO  nncf.quantize of the OpenVINO model (ModelType.TRANSFORMER, 300 calibration
                         sentences), run with an explicit f32 precision hint for what stays float (on AMX
                         CPUs OpenVINO otherwise picks bf16)
   Latency: 2 threads, inputs padded to 128 tokens, batch 1 and 32, p50. Quality, on held-out text from
   modules the student never saw: Spearman agreement of pairwise cosine similarities with the fp32
   teacher, and a linear probe (which module a sentence comes from) relative to the teacher's.
A peer whose package is missing is reported as unavailable; the rest still run. Writes
benchmarks/results/minilm_cpu.json and .md with the machine, the versions and the date.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from host import repo_path  # noqa: E402  (results hold no absolute paths)

SEQUENCE = 128
THREADS = 2


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def machine() -> dict:
    from compressor.bundle import TOOLCHAIN, toolchain_versions
    from devices.bench_onnxruntime import host_info

    return {**host_info(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "threads": THREADS,
            "versions": toolchain_versions((*TOOLCHAIN, "optimum", "optimum-onnx")),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def compress(work: Path, overrides: list[str]) -> Path:
    """The bundle of `compress run minilm-l6` (reused when its recipe is unchanged)."""
    import yaml

    from compressor import run
    from compressor.recipe import load_recipe

    bundle = work / "bundle"
    wanted = load_recipe("minilm-l6", overrides).model_dump(mode="json")
    if (bundle / "recipe.yaml").is_file() and yaml.safe_load((bundle / "recipe.yaml").read_text()) == wanted:
        log(f"reusing {bundle} (same recipe)")
        return bundle
    t0 = time.time()
    out = run("minilm-l6", bundle, overrides=overrides, force=True, resume=(work / "bundle.partial").exists())
    log(f"compress run minilm-l6: {time.time() - t0:.0f} s")
    return out


# ----------------------------------------------------------------------------------- the runtimes

class ORT:
    def __init__(self, path: Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]
        self.path = path

    def __call__(self, feeds: dict) -> np.ndarray:
        return self.sess.run(None, {n: feeds[n] for n in self.names})[0]

    def latency(self, batch: int, runs: int) -> dict:
        from devices.bench_onnxruntime import measure

        r = measure(str(self.path), batch=batch, threads=THREADS, warmup=5, runs=runs, max_seconds=30,
                    dims={"sequence": SEQUENCE})
        return {"p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"], "cv": r["cv"], "runs": r["runs"]}


class OpenVINO:
    def __init__(self, xml: Path):
        import openvino as ov

        core = ov.Core()
        self.model = core.read_model(str(xml))
        self.compiled = core.compile_model(self.model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                               "INFERENCE_NUM_THREADS": THREADS})
        self.names = [i.get_any_name() for i in self.compiled.inputs]
        self.path = xml

    def __call__(self, feeds: dict) -> np.ndarray:
        req = self.compiled.create_infer_request()
        return req.infer({n: feeds[n] for n in self.names})[self.compiled.output(0)]

    def latency(self, batch: int, runs: int) -> dict:
        from devices import get_device, load_profile

        dims = {n: [batch, SEQUENCE] for n in self.names}
        m = get_device(load_profile("openvino-cpu")).measure(self.path, batch=batch, warmup=5, runs=runs,
                                                             max_seconds=30, precision="int8", dims=dims)
        return {"p50_ms": m.p50_ms, "p90_ms": m.p90_ms, "cv": m.cv, "runs": m.runs}


# --------------------------------------------------------------------------------- the variants

def export_teacher(recipe: dict, data, work: Path) -> Path:
    from compressor.hf import hf_encoder
    from compressor.tasks import as_tuple, onnx_io
    from exporters.onnx import export_onnx

    path = work / "teacher.onnx"
    if not path.is_file():
        teacher = hf_encoder(**recipe["teacher"]["kwargs"])
        x = data.tensors("test", limit=2)[0]
        export_onnx(teacher, as_tuple(x), path, opset=17, role="teacher", **onnx_io(x, "embedding"))
    return path


def dynamic_int8(fp32: Path, out: Path) -> Path:
    from exporters.qdq import quantize_dynamic

    if not out.is_file() or out.stat().st_mtime < Path(fp32).stat().st_mtime:
        quantize_dynamic(fp32, out)
    return out


def nncf_openvino(fp32: Path, out: Path, calib: list[dict]) -> Path:
    """NNCF post-training int8 of the OpenVINO model (what a user of NNCF + OpenVINO does)."""
    import nncf
    import openvino as ov

    if not out.is_file() or out.stat().st_mtime < Path(fp32).stat().st_mtime:  # made from an older file: redo
        model = ov.Core().read_model(str(fp32))
        q = nncf.quantize(model, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(calib))
        ov.save_model(q, str(out))
    return out


def batches(data, split: str, size: int) -> list[dict]:
    return [{k: v.numpy() for k, v in x.items()} for x, _ in data.loader(split, size)]


def quality(fn, held_out: list[dict], labels: np.ndarray, ref: np.ndarray, teacher_probe: float) -> dict:
    from compressor.tasks import agreement, probe

    emb = np.concatenate([fn(b) for b in held_out])
    acc = probe(emb, labels)
    return {"agreement": agreement(ref, emb), "probe_accuracy": acc, "probe_retained": acc / teacher_probe}


# ------------------------------------------------------------------------------------------ report

def _f(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# MiniLM-L6 on this CPU: compressed student against the peers", "",
             f"{m['date']}; {m.get('cpu_model', 'unknown CPU')}, {m.get('cpus')} cores, {m['threads']} threads; load average at start "
             f"{m['load_average_at_start']}. Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
             + ".", "",
             f"Inputs padded to {SEQUENCE} tokens; p50 latency in ms, the fastest of {res.get('rounds', 1)} "
             f"round-robin rounds. Quality on {res['held_out']} held-out "
             f"sentences from modules the student never saw: agreement = Spearman of pairwise cosine "
             "similarities against the fp32 teacher; probe = linear-probe accuracy (which module) relative to "
             "the teacher's.", "",
             "| model | runtime | params | GFLOPs/sample | file MB | b1 p50 | b32 p50 | agreement | probe (rel.) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r.get("unavailable"):
            lines.append(f"| {r['model']} | {r['runtime']} | | | | unavailable: {r['unavailable']} | | | |")
            continue
        lines.append(f"| {r['model']} | {r['runtime']} | {r['params']:,} | {r['gflops']:.2f} | {r['mb']:.1f} | "
                     f"{_f(r['b1']['p50_ms'])} | {_f(r['b32']['p50_ms'], '.1f')} | {r['agreement']:.4f} | "
                     f"{100 * r['probe_retained']:.1f}% |")
    s = res["summary"]
    lines += ["", f"Fastest peer at batch 1: {s['fastest_peer']} ({_f(s['fastest_peer_b1_ms'])} ms). "
              f"Fastest student: {s['fastest_student']} ({_f(s['fastest_student_b1_ms'])} ms): "
              f"**{s['speedup_b1']:.2f}x** (goal 4x), agreement {s['student_agreement']:.3f} (goal 0.9), "
              f"probe {100 * s['student_probe_retained']:.1f}% of the teacher's (goal 97%)."
              + (f" Round by round the ratio was {', '.join(f'{r:.2f}x' for r in s['speedup_b1_per_round'])}."
                 if len(s.get("speedup_b1_per_round", ())) > 1 else ""), "",
              f"Bundle: {res['bundle']['stages_seconds']} s of stages; student: {_student(res['bundle']['student'])}.",
              ""]
    if res.get("overrides"):
        lines += ["Recipe: minilm-l6 with " + " ".join(f"`--set {o}`" for o in res["overrides"]) + ".", ""]
    if res.get("note"):
        lines += [res["note"], ""]
    return "\n".join(lines)


def _student(genome: dict) -> str:
    """The student in words: the teacher's layers it lost, then what width pruning cut (student paths)."""
    parts = []
    if genome.get("removed"):
        parts.append("teacher layers " + ", ".join(p.rsplit(".", 1)[-1] for p in genome["removed"]) + " removed")
    width = genome.get("width") or {}
    for path, heads in width.get("heads", {}).items():
        parts.append(f"{path.removeprefix('model.encoder.')}: {len(heads)} heads cut")
    for path, p in width.get("ffn", {}).items():
        parts.append(f"{p['producer'].removeprefix('model.encoder.')}: {len(p['keep'])} FFN neurons kept")
    return "; ".join(parts) or str(genome)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "minilm"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, as compress run")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds; each file keeps its fastest p50")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "minilm_cpu"))
    ap.add_argument("--note", default="", help="a line for the markdown (e.g. what else ran on the machine)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine(), "note": args.note, "rounds": args.rounds, "overrides": args.overrides}

    import torch

    from compressor.data import load_data
    from compressor.models import count_flops, count_params
    from compressor.recipe import load_recipe
    from compressor.tasks import at_length, probe

    bundle = compress(work, args.overrides)
    manifest = json.loads((bundle / "manifest.json").read_text())
    recipe = load_recipe(bundle / "recipe.yaml")
    t = recipe.teacher.kwargs
    data = load_data(recipe.data, recipe.seed, defaults={"tokenizer_path": t.get("path"),
                                                         "tokenizer_package": t.get("package")})
    held_out = batches(data, "test", 64)
    labels = np.concatenate([y.numpy() for _, y in data.loader("test", 64)])
    calib = [{k: v.numpy() for k, v in x.items()} for x, _ in itertools.islice(data.loader("train", 1), 300)]
    res["held_out"] = len(labels)

    from compressor.hf import hf_encoder
    from compressor.prune import rebuild

    teacher = hf_encoder(**t).eval()
    x128 = at_length(data.tensors("test", limit=1)[0], SEQUENCE)
    student = rebuild(manifest["student"])  # pruned, or searched (search.family: teacher): its shapes
    sizes = {"teacher": (count_params(teacher), count_flops(teacher, x128)),
             "student": (count_params(student), count_flops(student, x128))}
    with torch.no_grad():
        ref = np.concatenate([teacher(**{k: torch.from_numpy(v) for k, v in b.items()}).numpy() for b in held_out])
    teacher_probe = probe(ref, labels)
    res["teacher_probe_accuracy"] = teacher_probe

    files = {"teacher": export_teacher(recipe.model_dump(), data, work), "student": bundle / "model" / "student.onnx"}
    rows, runtimes = [], []
    for role, fp32 in files.items():
        variants = [("ORT fp32", lambda p=fp32: ORT(p))]
        int8 = bundle / "model" / "student.int8.onnx" if role == "student" else work / "teacher.int8.onnx"
        variants.append(("ORT dynamic int8", lambda p=fp32, o=int8: ORT(dynamic_int8(p, o))))
        variants.append(("NNCF int8 OpenVINO", lambda p=fp32, r=role: OpenVINO(nncf_openvino(p, work / f"{r}.nncf.xml", calib))))
        for name, make in variants:
            row = {"model": role, "runtime": name, "params": sizes[role][0], "gflops": sizes[role][1] / 1e9}
            try:
                rt = make()
            except ImportError as e:
                row["unavailable"] = f"{e.name or e} not installed"
                rows.append(row)
                log(f"{role} {name}: unavailable ({row['unavailable']})")
                continue
            path = Path(rt.path)
            row["file"] = repo_path(path)
            row["mb"] = (path.stat().st_size + (path.with_suffix(".bin").stat().st_size
                                                 if path.suffix == ".xml" else 0)) / 1e6
            row.update(quality(rt, held_out, labels, ref, teacher_probe))
            rows.append(row)
            runtimes.append((row, rt, sizes[role][1]))
    # Latency round robin: every file measured once per round, each keeping its fastest round's p50, so a
    # slow spell of the shared machine cannot fall on one model alone.
    for rnd in range(args.rounds):
        for row, rt, fl in runtimes:
            for b in (1, 32):
                m = rt.latency(b, args.runs)
                m["gflop_per_s"] = fl * b / (m["p50_ms"] / 1e3) / 1e9
                row.setdefault(f"b{b}_rounds", []).append(round(m["p50_ms"], 4))
                if f"b{b}" not in row or m["p50_ms"] < row[f"b{b}"]["p50_ms"]:
                    row[f"b{b}"] = m
            log(f"round {rnd + 1}/{args.rounds} {row['model']} {row['runtime']}: b1 {row['b1_rounds'][-1]:.2f} ms, "
                f"b32 {row['b32_rounds'][-1]:.1f} ms, agreement {row['agreement']:.4f}, "
                f"probe {100 * row['probe_retained']:.1f}%")
    res["rows"] = rows
    ok = [r for r in rows if not r.get("unavailable")]
    peers = [r for r in ok if r["model"] == "teacher"]
    studs = [r for r in ok if r["model"] == "student"]
    fp, fs = min(peers, key=lambda r: r["b1"]["p50_ms"]), min(studs, key=lambda r: r["b1"]["p50_ms"])
    # Each round's ratio (the two measured minutes apart, not hours): how far the shared host moved the figure.
    per_round = [a / b for a, b in zip(fp["b1_rounds"], fs["b1_rounds"])]  # in the order measured
    res["summary"] = {"fastest_peer": fp["runtime"], "fastest_peer_b1_ms": fp["b1"]["p50_ms"],
                      "fastest_student": fs["runtime"], "fastest_student_b1_ms": fs["b1"]["p50_ms"],
                      "speedup_b1": fp["b1"]["p50_ms"] / fs["b1"]["p50_ms"],
                      "speedup_b1_per_round": [round(r, 3) for r in per_round],
                      "student_agreement": fs["agreement"], "student_probe_retained": fs["probe_retained"],
                      "goal_met": bool(fp["b1"]["p50_ms"] / fs["b1"]["p50_ms"] >= 4 and fs["agreement"] >= 0.9
                                       and fs["probe_retained"] >= 0.97)}
    res["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["bundle"] = {"path": repo_path(bundle), "stages_seconds": round(sum(s["seconds"] for s in manifest["stages"])),
                     "student": manifest["student"], "quality": manifest["quality"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # --out names a stem: minilm_cpu.search gives minilm_cpu.search.json (with_suffix would replace ".search")
    out = out.with_name(out.name.removesuffix(".json").removesuffix(".md"))
    out.with_name(out.name + ".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    out.with_name(out.name + ".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
