"""The teacher's outputs computed once per run instead of once per batch of every epoch.

When the training data gives the same sample every time it is read (no random augmentation), the teacher's
output on sample ``i`` is the same in every epoch: it is computed once, kept on disk (a ``.npy`` file named
by the teacher's and the data's content hashes, memory-mapped on reading) and looked up by sample index.
Terms that read the teacher's hidden features (feature, attention, MiniLM) still run the teacher.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..measure import _tensor_bytes, model_key
from ..tasks import output


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


def key(teacher: torch.nn.Module, dataset: Dataset) -> str:
    """The teacher (compressor.measure.model_key: weights and architecture) and the dataset's samples,
    hashed: the cache file's name."""
    h = hashlib.sha256(model_key(teacher, dataset[0][0]).encode())
    for i in range(len(dataset)):
        _hash_tensor(h, dataset[i][0])
    return h.hexdigest()[:24]


@torch.no_grad()
def teacher_outputs(teacher: torch.nn.Module, dataset: Dataset, directory: Path, collate, batch_size: int = 256,
                    log=print) -> torch.Tensor:
    """The teacher's output for every sample of ``dataset`` (row i: sample i), from ``directory``'s cache file
    when one exists for this teacher and these samples, else computed and stored there."""
    path = Path(directory) / f"teacher-outputs-{key(teacher, dataset)}.npy"
    if path.is_file():
        log(f"distill: the teacher's outputs on {len(dataset)} training samples read from {path.name}")
        return torch.from_numpy(np.load(path, mmap_mode="r").copy())
    was = teacher.training
    teacher.eval()
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    rows = []
    for x, _ in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
        rows.append(output(teacher, x).float().cpu())
    teacher.train(was)
    out = torch.cat(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, out.numpy())
    tmp.replace(path)
    log(f"distill: the teacher's outputs on {len(dataset)} training samples computed once and cached "
        f"({out.numel() * 4 / 1e6:.1f} MB)")
    return out
