"""Latency of a candidate on a target device for the search: measured, or predicted by the device's
latency predictor (devices/predictor.py, the one implementation, also behind `compress calibrate`).
Every number says which it is.

The search measures ``calibration`` candidates spread over the FLOPs range and fits the predictor on
them. A handful of points cannot weigh the thirty per-kernel features that `compress calibrate` fits on
60+ measurements, so below ``RICH`` points the fit keeps a few whole-model features (FLOPs, parameters,
activations, kernel count); its cross-validated error on its own points is recorded beside it, so a
reader can judge the search's latencies.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

# Below this many measured candidates the predictor keeps only the whole-model features in FEW.
RICH = 20
FEW = ["flops", "params", "activations", "k_n"]


def measure_model(model: nn.Module, example, device, *, warmup: int = 5, runs: int = 30,
                  max_seconds: float = 2.0) -> float:
    """p50 milliseconds at batch 1: export to ONNX in a temporary directory and measure on ``device``.
    ``example`` is a tensor or a dict of tensors (a text encoder's input_ids and attention_mask: two
    ONNX inputs, at the example's own sequence length, so the device needs no dims)."""
    from exporters.onnx import export_onnx

    from ..tasks import as_tuple, onnx_io, take

    x = take(example, 1)
    with tempfile.TemporaryDirectory(prefix="compressor-search-") as tmp:
        path = Path(tmp) / "candidate.onnx"
        export_onnx(model, as_tuple(x), path, dynamic_batch=False, **onnx_io(x, "output", dynamic_batch=False))
        m = device.measure(path, batch=1, warmup=warmup, runs=runs, max_seconds=max_seconds)
    return float(m.p50_ms)


def candidate_features(model: nn.Module, example) -> dict:
    """What the predictor reads: whole-model features and the kernel list (compressor/calibrate.py)."""
    from ..calibrate import features, kernels

    return {**features(model, example), "kernels": kernels(model, example)}


def calibrate(device_name: str, device, build, genomes: list[dict], example, log=print,
              **measure_kw):
    """Measure ``genomes`` (``build(genome) -> nn.Module``) on ``device`` and fit its LatencyPredictor."""
    from devices.predictor import LatencyPredictor, cross_validate

    samples = []
    for g in genomes:
        model = build(g)
        samples.append((candidate_features(model, example), measure_model(model, example, device, **measure_kw)))
    pred = LatencyPredictor.fit(device_name, samples, space="search", only=None if len(samples) >= RICH else FEW)
    cv = cross_validate(pred, folds=min(5, len(samples)))
    pred.meta.update(cross_validation=cv, latency="p50 of one measurement, batch 1", measure=measure_kw)
    log(f"latency predictor for {device_name}: {pred.method} on {len(pred.features)} features from {len(samples)} "
        f"measured candidates; cross-validated MAPE {cv['mape']:.1%}, {cv['within_10pct']:.0%} within 10%")
    return pred


def record(pred) -> dict:
    """The stage record's account of a predictor: which one (a file from `compress calibrate`, or fitted by
    the search), fitted on what, its cross-validated error, and the whole predictor (so a resumed search
    predicts with the same one)."""
    return {"predictor": "devices.predictor.LatencyPredictor", "source": pred.meta.get("source", "fitted by the search"),
            "device": pred.device, "space": pred.space, "fitted_at": pred.fitted_at, "method": pred.method,
            "features": pred.features, "fitted_on": len(pred.points), "held_out": pred.meta.get("cross_validation"),
            "label": "predicted", "model": pred.to_dict()}


def load_predictors(recipe) -> dict:
    """{target: LatencyPredictor} for ``search.predictor`` (a file from `compress calibrate`): the search
    predicts that target with it instead of fitting its own. A missing or unreadable file, or one calibrated
    for a device that is not one of the recipe's targets, is a one-line UserError."""
    from devices import DeviceError, load_profile
    from devices.predictor import LatencyPredictor

    from ..errors import UserError

    spec = recipe.search
    if spec is None or not spec.predictor:
        return {}
    try:
        pred = LatencyPredictor.load(spec.predictor)
    except DeviceError as e:
        raise UserError(f"search.predictor: {e}") from None
    for target in recipe.targets:
        try:
            name = load_profile(target).name
        except DeviceError:
            name = None
        if pred.device in (target, name):
            pred.meta["source"] = str(spec.predictor)
            return {target: pred}
    raise UserError(f"search.predictor: {spec.predictor} was calibrated for device {pred.device!r}, which is not one "
                    f"of the recipe's targets ({', '.join(recipe.targets) or 'none'}); add it to targets or calibrate "
                    f"a target (`compress calibrate TARGET`)")
