"""What a model is for, and how its quality is measured: one class per recipe ``task:``.

- ``classification``: logits (batch x classes); quality is top-1 accuracy on the held-out split.
- ``embedding``: a vector per input (a sentence encoder); quality is measured against the teacher on
  held-out inputs, since there is no ground truth: ``agreement`` is the Spearman correlation between the
  student's and the teacher's pairwise cosine similarities (what retrieval sees), and
  ``probe_accuracy`` is a logistic-regression probe, cross-validated on the held-out embeddings,
  predicting each input's label (for docstrings, the module a sentence comes from).

Inputs are a tensor or a dict of tensors (Hugging Face: input_ids, attention_mask); ``call`` and
``take`` handle both so the stages need not care.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .intake import first_tensor


def call(model: nn.Module, x):
    """Run a batch that is a tensor or a dict of tensors (Hugging Face inputs)."""
    return model(**x) if isinstance(x, dict) else model(x)


def output(model: nn.Module, batch) -> torch.Tensor:
    """``model``'s output tensor on ``batch`` (the first tensor of a tuple or a ModelOutput)."""
    y = first_tensor(call(model, batch))
    if y is None:
        raise UserError(f"{type(model).__name__} returned no tensor; pruning compares outputs")
    return y


def sq_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Summed squared error of ``y`` against ``ref`` over every sample and output."""
    return float((y.float() - ref.float()).pow(2).flatten(1).sum(1).sum())


@torch.no_grad()
def sq_error_mean(teacher: nn.Module, student: nn.Module, batches) -> float | None:
    """The mean squared error of ``student``'s outputs against ``teacher``'s over ``batches``, per sample; None
    where the outputs differ in width (an embedding narrowed with its residual stream: prune.width.hidden)."""
    was = student.training
    teacher.eval()
    student.eval()
    total, n = 0.0, 0
    for b in batches:
        ref, y = output(teacher, b), output(student, b)
        if y.shape != ref.shape:
            student.train(was)
            return None
        total, n = total + sq_error(y, ref), n + len(ref)
    student.train(was)
    return total / n


def take(x, n: int):
    """The first ``n`` samples of a batch."""
    return {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]


def rows(x, i: int, j: int):
    """Samples i..j of a batch: a tensor or a dict of tensors (token inputs)."""
    return {k: v[i:j] for k, v in x.items()} if isinstance(x, dict) else x[i:j]


def at_length(x, length: int | None):
    """Token inputs padded (mask 1, ids 0) or cut to ``length``: FLOPs and latency are counted at the
    sequence length the device runs, not at one sentence's own length."""
    if not isinstance(x, dict) or not length:
        return x
    out = {}
    for k, v in x.items():
        if v.dim() == 2 and v.shape[1] != length:
            if v.shape[1] > length:
                v = v[:, :length]
            else:
                fill = torch.full((v.shape[0], length - v.shape[1]), 1 if "mask" in k else 0, dtype=v.dtype)
                v = torch.cat([v, fill], 1)
        out[k] = v
    return out


def size(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def as_tuple(x) -> tuple:
    """Positional export arguments, in the order the data names them (forward(input_ids, attention_mask))."""
    return tuple(x.values()) if isinstance(x, dict) else (x,)


def input_names(x) -> tuple[str, ...]:
    return tuple(x) if isinstance(x, dict) else ("input",)


def feeds(x, names) -> dict:
    """ONNX Runtime feeds for the session's input ``names``."""
    if isinstance(x, dict):
        return {n: x[n].detach().cpu().numpy() for n in names}
    return {names[0]: x.detach().cpu().numpy()}


def dynamic_axes(x, output: str) -> dict:
    """Batch on every input and output; the sequence too for token inputs."""
    if isinstance(x, dict):
        axes = {k: {0: "batch", 1: "sequence"} if v.dim() == 2 else {0: "batch"} for k, v in x.items()}
    else:
        axes = {"input": {0: "batch"}}
    return {**axes, output: {0: "batch"}}


def onnx_io(x, output: str, dynamic_batch: bool = True) -> dict:
    """exporters.onnx.export_onnx keyword arguments for inputs like ``x``: names and dynamic axes."""
    return dict(input_names=input_names(x), output_names=(output,),
                dynamic_axes=dynamic_axes(x, output) if dynamic_batch else None)


def to_numpy(x):
    return {k: v.detach().cpu().numpy() for k, v in x.items()} if isinstance(x, dict) else x.detach().cpu().numpy()


class Classification:
    name, metric, output = "classification", "accuracy", "logits"
    val_metric = "acc"

    def prepare(self, teacher, data, batch_size: int) -> None:
        pass

    def check_output(self, y, n: int, data, what: str) -> int:
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != n:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise UserError(f"{what} output has shape {shape}; classification needs (batch, classes)")
        if y.shape[1] < data.num_classes:
            raise UserError(f"{what} outputs {y.shape[1]} classes but the data has labels up to {data.num_classes - 1}")
        return int(y.shape[1])

    @torch.no_grad()
    def score(self, model, data, batch_size: int) -> dict:
        model.eval()
        correct = total = 0
        for x, y in data.loader("test", batch_size):
            correct += int((call(model, x).argmax(-1) == y).sum())
            total += int(y.numel())
        return {"accuracy": correct / max(total, 1)}

    def score_onnx(self, path, data) -> dict:
        sess = _session(path)
        names = [i.name for i in sess.get_inputs()]
        correct = total = 0
        for x, y in data.loader("test", 256):
            pred = sess.run(None, feeds(x, names))[0].argmax(-1)
            correct += int((pred == y.numpy()).sum())
            total += len(y)
        return {"accuracy": correct / max(total, 1)}

    def teacher_score(self, teacher, data, batch_size: int) -> dict:
        return self.score(teacher, data, batch_size)


class Embedding:
    name, metric, output = "embedding", "agreement", "embedding"
    val_metric = "cosine"

    def __init__(self):
        self.reference: np.ndarray | None = None  # the teacher's held-out embeddings
        self.teacher_probe: float | None = None

    def check_output(self, y, n: int, data, what: str) -> int:
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != n or not y.is_floating_point():
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise UserError(f"{what} output has shape {shape}; the embedding task needs (batch, dimensions) "
                            "floats (a sentence encoder: hf-encoder pools and normalises)")
        return int(y.shape[1])

    @staticmethod
    @torch.no_grad()
    def embed(model, data, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        model.eval()
        es, ys = [], []
        for x, y in data.loader("test", batch_size):
            es.append(call(model, x).float())
            ys.append(y)
        return torch.cat(es).numpy(), torch.cat(ys).numpy()

    def prepare(self, teacher, data, batch_size: int) -> None:
        if self.reference is None:
            self.reference, labels = self.embed(teacher, data, batch_size)
            self.teacher_probe = probe(self.reference, labels)

    def metrics(self, emb: np.ndarray, labels: np.ndarray) -> dict:
        ref = self.reference
        if emb.shape[0] != ref.shape[0]:
            raise UserError(f"embedding: {emb.shape[0]} held-out embeddings against the teacher's {ref.shape[0]}")
        acc = probe(emb, labels)
        cos = float((_unit(emb) * _unit(ref)).sum(1).mean()) if emb.shape[1] == ref.shape[1] else float("nan")
        return {"agreement": agreement(ref, emb), "probe_accuracy": acc,
                "probe_retained": acc / self.teacher_probe if self.teacher_probe else float("nan"), "cosine": cos}

    def score(self, model, data, batch_size: int) -> dict:
        return self.metrics(*self.embed(model, data, batch_size))

    def score_onnx(self, path, data) -> dict:
        sess = _session(path)
        names = [i.name for i in sess.get_inputs()]
        es, ys = [], []
        for x, y in data.loader("test", 64):
            es.append(sess.run(None, feeds(x, names))[0])
            ys.append(y.numpy())
        return self.metrics(np.concatenate(es), np.concatenate(ys))

    def teacher_score(self, teacher, data, batch_size: int) -> dict:
        self.prepare(teacher, data, batch_size)
        return {"agreement": 1.0, "probe_accuracy": self.teacher_probe, "probe_retained": 1.0, "cosine": 1.0}


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def agreement(ref: np.ndarray, emb: np.ndarray) -> float:
    """Spearman correlation between two models' pairwise cosine similarities over the same inputs."""
    from scipy.stats import spearmanr

    iu = np.triu_indices(len(ref), 1)
    a, b = _unit(ref), _unit(emb)
    return float(spearmanr((a @ a.T)[iu], (b @ b.T)[iu]).statistic)


def probe(emb: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Linear-probe accuracy: logistic regression on the embeddings, ``folds``-fold cross-validated."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_score

    if len(np.unique(labels)) < 2:
        return float("nan")
    clf = LogisticRegression(C=10.0, max_iter=3000)
    return float(cross_val_score(clf, _unit(emb), labels, cv=KFold(folds, shuffle=True, random_state=seed)).mean())


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


TASKS = {"classification": Classification, "embedding": Embedding}


def get_task(name: str):
    return TASKS[name]()
