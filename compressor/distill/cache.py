"""The teacher's outputs computed once per run instead of once per batch of every epoch.

When the training data gives the same sample every time it is read (no random augmentation), the teacher's
output on sample ``i`` is the same in every epoch: it is computed once, kept on disk (a ``.npy`` file named
by the teacher's and the data's content hashes, memory-mapped on reading) and looked up by sample index.
The teacher runs under bf16 autocast where the trainer is ``bf16-mixed`` on the device that fills the cache, as
it would per batch; in fp32 otherwise.
The hidden features that terms read (feature, attention, MiniLM's Q/K/V) are cached the same way, one
memory-mapped file per module, fp32 while the files stay small and fp16 beyond that; for token inputs
they are stored at the data's full length and cut to each batch's (compressor.data trims a batch to its
longest sentence).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..measure import _tensor_bytes, model_key
from ..precision import autocast, is_bf16
from ..intake import first_tensor
from ..tasks import call, output
from .hooks import capture

FP32_BYTES = 256e6  # hidden features up to this size are cached in fp32 (exact), larger ones in fp16
MAX_BYTES = 8e9  # and beyond this (on disk) the teacher runs every batch instead


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return bool(a == b)


def deterministic(dataset: Dataset, n: int = 4) -> bool:
    """Whether reading the first ``n`` samples twice gives the same samples (no random augmentation)."""
    return all(_same(dataset[i], dataset[i]) for i in range(min(n, len(dataset))))


class Indexed(Dataset):
    """``dataset``'s samples with their index: (x, y, i), so a batch can look up cached teacher outputs."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


def collate_indexed(samples):
    """A batch of (x, y, i) samples: (x, y) as compressor.data.collate makes them, and the indices."""
    from ..data import collate

    x, y = collate([(x, y) for x, y, _ in samples])
    return x, y, torch.tensor([i for *_, i in samples])


def _hash_tensor(h, v) -> None:
    if isinstance(v, dict):
        for k in sorted(v):
            h.update(k.encode())
            _hash_tensor(h, v[k])
    else:
        h.update(f"{v.dtype}{tuple(v.shape)}".encode())
        h.update(_tensor_bytes(v))


def _suffix(precision: str) -> str:
    """What a cache file's name adds for the precision its teacher ran at: nothing for fp32."""
    return "-bf16" if is_bf16(precision) else ""


def _at(precision: str) -> str:
    return " under bf16 autocast" if is_bf16(precision) else ""


def in_length_order(dataset: Dataset, batch_size: int, collate):
    """(sample indices, batch) over all of ``dataset``: token inputs longest first, so each batch, trimmed to
    its longest sentence, carries little padding (a quarter of the tokens of batches in sample order at 64
    tokens on the MiniLM recipe); other inputs in sample order."""
    from ..data import longest_first, token_lengths

    lengths = token_lengths(dataset)
    for idx in torch.arange(len(dataset)).split(batch_size) if lengths is None else longest_first(lengths, batch_size):
        x, _ = collate([dataset[i] for i in idx.tolist()])
        yield idx, x


def key(teacher: torch.nn.Module, dataset: Dataset) -> str:
    """The teacher (compressor.measure.model_key: weights and architecture) and the dataset's samples,
    hashed: the cache file's name."""
    h = hashlib.sha256(model_key(teacher, dataset[0][0]).encode())
    for i in range(len(dataset)):
        _hash_tensor(h, dataset[i][0])
    return h.hexdigest()[:24]


@torch.no_grad()
def teacher_outputs(teacher: torch.nn.Module, dataset: Dataset, directory: Path, collate, batch_size: int = 256,
                    log=print, precision: str = "32-true") -> torch.Tensor:
    """The teacher's output for every sample of ``dataset`` (row i: sample i), from ``directory``'s cache file
    when one exists for this teacher, these samples and this precision, else computed and stored there.
    ``precision`` (a Lightning name) is the trainer's: ``bf16-mixed`` runs the teacher under bf16 autocast, as
    the trainer would run it on every batch (2.7x faster than fp32 on an AVX512-BF16 CPU)."""
    path = _outputs_file(directory, key(teacher, dataset), precision)
    if path.is_file():
        log(f"distill: the teacher's outputs on {len(dataset)} training samples read from {path.name}")
        return torch.from_numpy(np.load(path, mmap_mode="r").copy())
    was = teacher.training
    teacher.eval()
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    out = None
    for idx, x in in_length_order(dataset, batch_size, collate):
        x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
        with autocast(precision, device.type):
            y = output(teacher, x).float().cpu()
        if out is None:
            out = torch.empty(len(dataset), *y.shape[1:])
        out[idx] = y
    teacher.train(was)
    _save(path, out)
    log(f"distill: the teacher's outputs on {len(dataset)} training samples computed once{_at(precision)} and cached "
        f"({out.numel() * 4 / 1e6:.1f} MB)")
    return out


def _outputs_file(directory, k: str, precision: str) -> Path:
    return Path(directory) / f"teacher-outputs-{k}{_suffix(precision)}.npy"


def _save(path: Path, out: torch.Tensor) -> None:
    """``out`` to ``path`` as .npy, whole or not at all (a run killed mid-write leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, out.numpy())
    tmp.replace(path)


def _cut(x, n: int):
    """Token inputs (a dict with a 2-D attention mask) cut to their first ``n`` tokens."""
    return {k: v[:, :n] if v.dim() == 2 else v for k, v in x.items()}


@torch.no_grad()
def token_axes(teacher: torch.nn.Module, x, paths) -> tuple[int, dict[str, tuple], dict[str, tuple[int, ...]]]:
    """For token inputs ``x`` (one sample at the data's full length): (that length, each hooked feature's
    shape at it without the batch axis, the axes of each that follow the number of tokens). The axes are found
    by running the sample at the full length and one token shorter, whatever the module returns."""
    length = x["attention_mask"].shape[-1]
    shapes = []
    for n in (length, length - 1):
        with capture(teacher, paths, "teacher") as feats:
            call(teacher, _cut(x, n))
        shapes.append({p: tuple(f.shape[1:]) for p, f in feats.items()})
    axes = {p: tuple(a + 1 for a, (u, v) in enumerate(zip(shapes[0][p], shapes[1][p])) if u != v) for p in paths}
    return length, shapes[0], axes


def cut_features(f: torch.Tensor, axes: tuple[int, ...], n: int) -> torch.Tensor:
    for a in axes:
        f = f.narrow(a, 0, n)
    return f


@torch.no_grad()
def teacher_features(teacher: torch.nn.Module, dataset: Dataset, directory: Path, collate, paths,
                     batch_size: int = 64, log=print, precision: str = "32-true"):
    """The teacher's hidden features at ``paths`` for every sample of ``dataset`` (row i: sample i), from
    ``directory``'s files when they exist for this teacher, these samples and these paths, else computed and
    stored there: ({path: memory-mapped array}, {path: token axes}); None when they would take more than
    MAX_BYTES. ``precision``: as for teacher_outputs."""
    paths = list(dict.fromkeys(paths))
    was = teacher.training
    teacher.eval()
    x0 = dataset[0][0]
    tokens = isinstance(x0, dict) and "attention_mask" in x0
    x1 = {k: v[None] for k, v in x0.items()} if isinstance(x0, dict) else x0[None]
    if tokens:
        length, shapes, axes = token_axes(teacher, x1, paths)
    else:
        with capture(teacher, paths, "teacher") as feats:
            call(teacher, x1)
        length, shapes, axes = None, {p: tuple(f.shape[1:]) for p, f in feats.items()}, {p: () for p in paths}
    n = len(dataset)
    total = sum(n * int(np.prod(sh)) * 4 for sh in shapes.values())
    if total > MAX_BYTES * 2:
        teacher.train(was)
        log(f"distill: the teacher's features on {n} samples would take {total / 2e9:.1f} GB in fp16; the teacher runs "
            "on every batch")
        return None
    dtype = np.float32 if total <= FP32_BYTES else np.float16
    samples_key = key(teacher, dataset)
    h = hashlib.sha256((samples_key + repr(paths) + np.dtype(dtype).name + _suffix(precision)).encode()).hexdigest()[:24]
    files = {p: Path(directory) / f"teacher-features-{h}-{k}.npy" for k, p in enumerate(paths)}
    if all(f.is_file() for f in files.values()):
        teacher.train(was)
        log(f"distill: the teacher's features at {len(paths)} module(s) on {n} training samples read from the cache")
        return {p: np.load(f, mmap_mode="r") for p, f in files.items()}, axes
    Path(directory).mkdir(parents=True, exist_ok=True)
    tmp = {p: f.with_name(f".{f.name}.tmp") for p, f in files.items()}
    out = {p: np.lib.format.open_memmap(tmp[p], mode="w+", dtype=dtype, shape=(n, *shapes[p])) for p in paths}
    device = next((q.device for q in teacher.parameters()), torch.device("cpu"))
    # The same pass fills the outputs' file (teacher_outputs then reads it instead of running the teacher again).
    outputs_file, outputs = _outputs_file(directory, samples_key, precision), None
    for idx, x in in_length_order(dataset, batch_size, collate):
        x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
        with capture(teacher, paths, "teacher") as feats, autocast(precision, device.type):
            y = first_tensor(call(teacher, x))
        if y is not None and not outputs_file.is_file():
            if outputs is None:
                outputs = torch.empty(n, *y.shape[1:])
            outputs[idx] = y.float().cpu()
        for p, f in feats.items():
            f = f.float().cpu()
            for a in axes[p]:  # a batch trimmed to its longest sentence: zeros up to the full length
                pad = [0, 0] * (f.dim() - 1 - a) + [0, length - f.shape[a]]
                f = torch.nn.functional.pad(f, pad)
            out[p][idx.numpy()] = f.numpy().astype(dtype)
    teacher.train(was)
    for p in paths:
        if dtype == np.float16 and not np.isfinite(out[p]).all():
            raise ValueError(f"the teacher's features at {p} overflow fp16; set distill.cache_teacher: false")
        out[p].flush()
        del out[p]
        tmp[p].replace(files[p])
    if outputs is not None:
        _save(outputs_file, outputs)
    log(f"distill: the teacher's features at {len(paths)} module(s){' and outputs' if outputs is not None else ''} on {n} "
        f"training samples computed once{_at(precision)} and cached ({total / (1 if dtype == np.float32 else 2) / 1e6:.1f} MB, {np.dtype(dtype).name})")
    return {p: np.load(f, mmap_mode="r") for p, f in files.items()}, axes
