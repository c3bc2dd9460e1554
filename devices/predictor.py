"""A per-device latency predictor fitted on measured candidates; its answers are estimates, labelled so.

A search cannot measure thousands of candidates on a board, so it measures a few dozen (``compress
calibrate DEVICE``), fits this, and predicts the rest. The caller computes each candidate's features
(devices never imports compressor): any dict of numbers, e.g. ``flops``, ``params``, ``activations``,
``flops_conv``, ``n_Conv2d``. Two models, both small enough to store as JSON and evaluate with numpy:

- ``additive``: latency = overhead + sum of non-negative costs per feature unit (ms per FLOP, per
  activation element, per layer of a type), fitted by non-negative least squares on relative error
  (scikit-learn's LinearRegression(positive=True), which is scipy's NNLS).
  It is the shape of nn-Meter's per-kernel sum with features instead of a kernel table, and it
  extrapolates sanely: more work never predicts less time.
- ``loglinear``: ridge regression (scikit-learn's Ridge) of log latency on standardised log(1 + feature):
  catches sub-linear scaling (small layers underusing the cores) that an additive model misses.

``method="auto"`` picks the one with the lower cross-validated mean absolute percentage error on the
measurements. Saved with the device name, the space, the fit date, the points it was fitted on (so new
measurements refit it: ``update``) and its held-out accuracy where the caller measured one.

Per-kernel features (nn-Meter's split): a features dict may hold ``kernels``, the model as the list of
kernels a runtime runs (compressor.calibrate.kernels: conv with its BN and activation folded, linear,
attention, add, pool, norm, ...; plain dicts). ``kernel_features`` turns them into sums per kernel type:
conv FLOPs split by channel alignment to the vector width and by kernel size, bytes in and out, weights,
kernel counts. The additive model then learns one cost per unit of each, i.e. a per-kernel-type linear
cost summed over the kernels. nn-Meter measures each kernel alone and sums the lookups instead; fitting
on whole models keeps what a lone kernel misses (the session's fixed cost, and the layout reorders a
kernel shares with its neighbours in a model).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = 1
METHODS = ("additive", "loglinear")
LANES = 16  # fp32 lanes of a 512-bit vector register: ONNX Runtime's NCHWc block on AVX-512
# Version of kernel_features, stored with a fit: a predictor fitted before a feature existed ignores it
# (without noting it as uncalibrated). 2: k_conv_reorder.
KERNEL_FEATURES = 2
ADDED = {2: ("k_conv_reorder",)}


def _up(c: int, lanes: int = LANES) -> int:
    return -(-c // lanes) * lanes


def kernel_features(kernels: list[dict], lanes: int = LANES) -> dict:
    """Sums per kernel type over a model's kernels (see the module docstring): the per-kernel costs an
    additive model can learn. Conv FLOPs are split by alignment: a convolution whose output and input
    channels are multiples of the vector width runs in the blocked (NCHWc) layout at a higher FLOP rate
    than one that is not; channels rounded up to the width is the work the vector unit really does."""
    out: dict[str, float] = {}

    def add(**kv):
        for k, v in kv.items():
            out[k] = out.get(k, 0) + v

    for k in kernels:
        op = k.get("op", "other")
        if op == "conv":
            f, cin, cout = k["flops"], k["cin"] // k.get("groups", 1), k["cout"]
            cls = "aa" if cin % lanes == 0 and cout % lanes == 0 else "ao" if cout % lanes == 0 else "ua"
            # ONNX Runtime's NCHWc convolution works on up to 4 blocks of 16 output channels per pass:
            # 16 output channels run at a lower FLOP rate than 64
            blocks = min(4, -(-cout // lanes))
            add(**{"k_conv_flops": f, f"k_conv_flops_{cls}": f, f"k_conv_flops_k{k['k']}": f,
                   f"k_conv_flops_b{blocks}": f,
                   "k_conv_padflops": f * _up(cin, lanes) * _up(cout, lanes) / (cin * cout),
                   "k_conv_in": k["cin"] * k["h"] * k["w"], "k_conv_out": k["out"],
                   "k_conv_weights": cin * cout * k["k"] ** 2, "k_conv_n": 1, f"k_conv_n_{cls}": 1})
            if k.get("stride", 1) > 1:
                add(k_conv_flops_strided=f)
            if cout < lanes:
                # ONNX Runtime pads such a convolution's output to one block and reorders it back to
                # plain NCHW after it (a ReorderOutput node per conv): a copy of its output elements.
                # Seen in the optimized graph of 4- and 8-wide ResNets; 24 and 48 stay blocked.
                add(k_conv_reorder=k["out"])
        elif op == "linear":
            add(k_linear_flops=k["flops"], k_linear_weights=k["k"] * k["n"], k_linear_out=k["out"], k_linear_n=1)
        elif op == "attention":
            # softmax over heads x queries x keys, and per-head overhead: small heads are inefficient
            add(k_attention_flops=k["flops"], k_attention_n=1, k_attention_heads=k["heads"],
                k_attention_scores=k["heads"] * k["seq"] * k["kv"])
        elif op == "pool":
            add(k_pool_in=k["in"], k_pool_n=1)
        else:
            add(**{f"k_{op}_elements": k.get("out", 0), f"k_{op}_n": 1})
        add(k_n=1)
    return out


def expand(features: dict) -> dict:
    """Numbers as they are, plus ``kernel_features`` of ``features["kernels"]`` when present."""
    out = {k: float(v) for k, v in features.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if features.get("kernels"):
        out.update(kernel_features(features["kernels"]))
    return out


@dataclass
class Prediction:
    latency_ms: float
    device: str
    method: str
    estimated: bool = True  # always: a prediction is never a measurement
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "estimated"


@dataclass
class LatencyPredictor:
    device: str
    method: str
    features: list[str]
    coef: list[float]
    intercept: float
    scale: list[float]  # additive: divide each feature by it; loglinear: (mean, std) pairs flattened
    fitted_at: str
    space: str = ""
    points: list[dict] = field(default_factory=list)  # {"features": {...}, "latency_ms": x}
    cv_mape: dict = field(default_factory=dict)  # method -> cross-validated MAPE on the points
    meta: dict = field(default_factory=dict)  # e.g. held_out accuracy written by the caller
    constants: dict = field(default_factory=dict)  # features equal in every point (not in the fit)
    only: list | None = None  # the features the fit was restricted to (None: all it was given)
    schema: int = SCHEMA
    kernel_features: int = KERNEL_FEATURES  # when fitted (files written before it was recorded: 1)

    # ------------------------------------------------------------------------------ fitting

    @classmethod
    def fit(cls, device: str, samples, *, method: str = "auto", space: str = "", folds: int = 5,
            alpha: float = 1.0, only: list[str] | None = None) -> "LatencyPredictor":
        """Fit on ``samples``: (features dict, measured latency in ms) pairs, at least 3. A features dict
        may hold ``kernels`` (expanded by ``kernel_features``); ``only`` keeps just the named features
        (a fit on a handful of measurements cannot weigh thirty)."""
        pts = []
        for f, y in samples:
            x = expand(f)
            if only is not None:
                x = {k: v for k, v in x.items() if k in only}
            pts.append({"features": x, "latency_ms": float(y)})
        if len(pts) < 3:
            raise ValueError(f"a latency predictor needs at least 3 measured candidates, got {len(pts)}")
        if any(not (p["latency_ms"] > 0) for p in pts):
            raise ValueError("measured latencies must be positive")
        if method not in (*METHODS, "auto"):
            raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)} or auto")
        scores = {}
        if method == "auto":
            for m in METHODS:
                scores[m] = _cv_mape(pts, m, folds, alpha)
            method = min(scores, key=scores.get)
        p = _fit(device, pts, method, alpha)
        p.space, p.cv_mape, p.only = space, scores, (sorted(only) if only is not None else None)
        return p

    def update(self, samples) -> "LatencyPredictor":
        """A new predictor fitted on the old points plus new measurements (same method choice rule)."""
        old = [(p["features"], p["latency_ms"]) for p in self.points]
        newer = [k for v in range(self.kernel_features + 1, KERNEL_FEATURES + 1) for k in ADDED.get(v, ())]
        if newer:  # the old points were expanded without them: leave them out of the new ones too
            samples = [({k: v for k, v in expand(f).items() if k not in newer}, y) for f, y in samples]
        p = LatencyPredictor.fit(self.device, [*old, *samples], method="auto" if self.cv_mape else self.method,
                                 space=self.space, only=self.only)
        p.kernel_features = self.kernel_features  # its points are still the old feature set
        return p

    # ------------------------------------------------------------------------------ predicting

    def predict(self, features: dict) -> Prediction:
        import numpy as np

        notes = []
        features = expand(features)
        for v in range(self.kernel_features + 1, KERNEL_FEATURES + 1):  # newer than this fit: not its inputs
            for k in ADDED.get(v, ()):
                features.pop(k, None)
        # A feature the calibration never varied (or never saw) cannot be weighed: say so when it differs.
        off = sorted(k for k, v in features.items() if k not in self.features
                     and (self.only is None or k in self.only)
                     and isinstance(v, (int, float)) and float(v) != self.constants.get(k, 0.0))
        if off:
            notes.append(f"features outside what calibration varied, ignored: {', '.join(off[:5])}")
        x = np.array([float(features.get(k, 0.0)) for k in self.features])
        if self.method == "additive":
            y = self.intercept + float(np.dot(x / np.array(self.scale), self.coef))
        else:
            mu, sd = np.array(self.scale[0::2]), np.array(self.scale[1::2])
            y = math.exp(self.intercept + float(np.dot((np.log1p(np.maximum(x, 0)) - mu) / sd, self.coef)))
        flops = [p["features"].get("flops") for p in self.points if "flops" in p["features"]]
        f = features.get("flops")
        if flops and f is not None and not (0.5 * min(flops) <= f <= 2 * max(flops)):
            notes.append(f"flops {f:.3g} outside the calibrated range {min(flops):.3g}-{max(flops):.3g}")
        return Prediction(latency_ms=max(y, 1e-6), device=self.device, method=self.method, notes=notes)

    def predict_ms(self, features: dict) -> float:
        return self.predict(features).latency_ms

    # ------------------------------------------------------------------------------ storage

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyPredictor":
        if not isinstance(d, dict):
            raise ValueError(f"a latency predictor is a JSON object, not {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise ValueError(f"latency predictor schema {d.get('schema')!r}: this version reads {SCHEMA}")
        return cls(**{"kernel_features": 1, **d})

    def save(self, path: str | Path) -> Path:
        import os

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyPredictor":
        from .profile import DeviceError

        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise DeviceError(f"latency predictor {path} does not exist: run `compress calibrate DEVICE`") from None
        except IsADirectoryError:
            raise DeviceError(f"latency predictor {path} is a directory, not the JSON file `compress calibrate` "
                              "wrote") from None
        except OSError as e:
            raise DeviceError(f"latency predictor {path} cannot be read: {e.strerror or e}") from None
        except (ValueError, TypeError, AttributeError, KeyError) as e:  # not JSON, not a predictor's fields
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DeviceError(f"latency predictor {path} is not readable: {first} (expected the JSON file "
                              "`compress calibrate` wrote)") from None


def accuracy(predictor: LatencyPredictor, samples) -> dict:
    """Held-out accuracy: share predicted within 10% (and 20%) of measured, and MAPE."""
    errs = [abs(predictor.predict_ms(f) - y) / y for f, y in samples]
    if not errs:
        return {"n": 0, "within_10pct": None, "within_20pct": None, "mape": None}
    return {"n": len(errs), "within_10pct": sum(e <= 0.10 for e in errs) / len(errs),
            "within_20pct": sum(e <= 0.20 for e in errs) / len(errs), "mape": sum(errs) / len(errs),
            "max_ape": max(errs)}


def _design(pts):
    """Feature names (sorted), the matrix of the features that vary, latencies, and the constant ones."""
    import numpy as np
    from sklearn.feature_extraction import DictVectorizer

    vec = DictVectorizer(sparse=False)  # sorted names; a feature a point lacks is 0
    x = vec.fit_transform([p["features"] for p in pts])
    names = list(vec.get_feature_names_out())
    keep = np.ptp(x, axis=0) > 0 if x.size else np.zeros(0, bool)  # constant columns carry nothing
    const = {n: float(x[0, j]) for j, n in enumerate(names) if not keep[j]}
    return [n for j, n in enumerate(names) if keep[j]], x[:, keep], np.array([p["latency_ms"] for p in pts]), const


def _fit(device, pts, method, alpha) -> LatencyPredictor:
    import numpy as np
    from sklearn.linear_model import LinearRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    names, x, y, const = _design(pts)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if method == "additive":
        # Non-negative least squares on relative error: overhead + per-unit costs, all >= 0 (the overhead
        # too, so it is a column of ones rather than sklearn's free intercept); weights 1/y^2 make the
        # squared error relative. LinearRegression(positive=True) is scipy's NNLS.
        scale = np.maximum(np.abs(x).max(0), 1e-12) if x.size else np.ones(0)
        a = np.hstack([np.ones((len(y), 1)), x / scale])
        sol = LinearRegression(positive=True, fit_intercept=False).fit(a, y, sample_weight=y ** -2.0).coef_
        return LatencyPredictor(device, method, names, [float(c) for c in sol[1:]], float(sol[0]),
                                [float(s) for s in scale], now, points=pts, constants=const)
    # ridge regression of log latency on standardised log(1 + feature)
    ly = np.log(y)
    if x.shape[1]:
        z = StandardScaler()
        ridge = Ridge(alpha=alpha).fit(z.fit_transform(np.log1p(np.maximum(x, 0))), ly)
        mu, sd, coef, b0 = z.mean_, z.scale_, ridge.coef_, ridge.intercept_
    else:
        mu = sd = coef = np.zeros(0)
        b0 = ly.mean()
    scale = [float(v) for pair in zip(mu, sd) for v in pair]
    return LatencyPredictor(device, method, names, [float(c) for c in coef], float(b0), scale, now, points=pts,
                            constants=const)


def _cv_errors(pts, method, folds, alpha) -> list[float]:
    """Absolute percentage errors of K-fold cross-validation. The folds are deterministic and
    interleaved (point j is held out in fold j mod k): points sorted by size (the search's calibration
    picks) then put small and large candidates in every fold, so no fold extrapolates."""
    import numpy as np
    from sklearn.model_selection import PredefinedSplit

    k = min(folds, len(pts))
    errs = []
    for train_idx, test_idx in PredefinedSplit(np.arange(len(pts)) % k).split():
        if len(train_idx) < 2:
            continue
        m = _fit("cv", [pts[j] for j in train_idx], method, alpha)
        errs += [abs(m.predict_ms(pts[j]["features"]) - pts[j]["latency_ms"]) / pts[j]["latency_ms"] for j in test_idx]
    return errs


def _cv_mape(pts, method, folds, alpha) -> float:
    errs = _cv_errors(pts, method, folds, alpha)
    return sum(errs) / len(errs) if errs else float("inf")


def cross_validate(predictor: LatencyPredictor, folds: int = 5, alpha: float = 1.0) -> dict:
    """K-fold accuracy of ``predictor``'s method on its own points: every point is held out once, so
    it says more than one small held-out split."""
    errs = _cv_errors(predictor.points, predictor.method, folds, alpha)
    return {"folds": folds, "n": len(errs), "within_10pct": sum(e <= 0.10 for e in errs) / len(errs),
            "within_20pct": sum(e <= 0.20 for e in errs) / len(errs), "mape": sum(errs) / len(errs)}
