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

from torch import nn

# Below this many measured candidates the predictor keeps only the whole-model features in FEW.
RICH = 20
FEW = ["flops", "params", "activations", "k_n"]
# The search's measurement settings (a candidate is measured once, for its p50).
MEASURE = {"warmup": 5, "runs": 30, "max_seconds": 2.0}


def measure_model(model: nn.Module, example, device, *, warmup: int = MEASURE["warmup"], runs: int = MEASURE["runs"],
                  max_seconds: float = MEASURE["max_seconds"]) -> float:
    """p50 milliseconds at batch 1 of one model on ``device`` (compressor.measure.Meter: exported to ONNX
    in a temporary directory, measured once). ``example`` is a tensor or a dict of tensors (a text
    encoder's input_ids and attention_mask: two ONNX inputs, at the example's own sequence length, so the
    device needs no dims)."""
    from ..measure import Meter

    with Meter(device, warmup=warmup, runs=runs, max_seconds=max_seconds) as meter:
        return meter.latency_ms(model, example)


def candidate_features(model: nn.Module, example) -> dict:
    """What the predictor reads: whole-model features and the kernel list (compressor/calibrate.py)."""
    from ..calibrate import features, kernels

    return {**features(model, example), "kernels": kernels(model, example)}


def calibrate(device_name: str, device, build, genomes: list[dict], example, log=print,
              **measure_kw):
    """Measure ``genomes`` (``build(genome) -> nn.Module``) on ``device`` and fit its LatencyPredictor."""
    from devices.predictor import LatencyPredictor, cross_validate

    from ..measure import Meter

    samples = []
    with Meter(device, **{**MEASURE, **measure_kw}) as meter:  # one export and timing cache for them all
        for g in genomes:
            model = build(g)
            samples.append((candidate_features(model, example), meter.latency_ms(model, example)))
    pred = LatencyPredictor.fit(device_name, samples, space="search", only=None if len(samples) >= RICH else FEW)
    cv = cross_validate(pred, folds=min(5, len(samples)))
    pred.meta.update(cross_validation=cv, latency="p50 of one measurement, batch 1", measure=measure_kw)
    log(f"latency predictor for {device_name}: {pred.method} on {len(pred.features)} features from {len(samples)} "
        f"measured candidates; cross-validated MAPE {cv['mape']:.1%}, {cv['within_10pct']:.0%} within 10%")
    return pred


def fit_or_reuse(devices: dict, stored, space, build, example, *, given: dict | None = None, defaults=None,
                 seed: int = 0, calibration: int = 6, log=print, **measure_kw) -> dict:
    """{target: LatencyPredictor} for the search's ``devices``: the one ``given`` for a target (a file from
    `compress calibrate`), else the one the Optuna study ``stored`` already keeps (a resumed search, or
    another worker, predicts with the same one instead of refitting on new, noisy measurements), else
    one fitted now on ``calibration`` genomes of ``space`` spread over its FLOPs range, and kept in the
    study (its user attribute ``latency_models``, as ``record`` writes it)."""
    import random

    from devices.predictor import LatencyPredictor

    from .proxies import cost

    models = {}
    saved = stored.user_attrs.get("latency_models", {})
    for name, dev in devices.items():
        if name in (given or {}):
            models[name] = given[name]
            continue
        if "model" in saved.get(name, {}):  # a study from before devices.predictor has no "model": refit
            models[name] = LatencyPredictor.from_dict(saved[name]["model"])
            continue
        rng = random.Random(seed)
        sample = sorted((space.sample(rng) for _ in range(max(64, 8 * calibration))),
                        key=lambda g: cost(lambda: space.skeleton(g, defaults), example)[1])
        # Spread over the FLOPs range: the fit must cover small and large candidates alike.
        picks = [sample[round(i * (len(sample) - 1) / max(1, calibration - 1))] for i in range(calibration)]
        models[name] = calibrate(name, dev, build, picks, example, log=log, **measure_kw)
        saved[name] = record(models[name])
        stored.set_user_attr("latency_models", saved)
    return models


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
