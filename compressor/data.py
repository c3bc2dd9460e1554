"""Datasets: built-in ones (name -> function) and a user's ``module:function``.

A dataset function returns either a dict with ``train`` and ``test`` (and optionally ``val``) datasets
of (input, label) pairs, or a single dataset that is split by the recipe's fractions and seed.
Input metadata (shape, mean/std) travels with the data into the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Subset, TensorDataset, default_collate, random_split

from .errors import UserError
from .text import docstrings  # text for Hugging Face encoders; transformers loads only when it is used


def trim(x):
    """A batch of padded token inputs cut to its longest sequence (padding past it is pure cost)."""
    if isinstance(x, dict) and "attention_mask" in x and x["attention_mask"].dim() == 2:
        n = max(int(x["attention_mask"].sum(1).max()), 1)
        return {k: v[:, :n] if v.dim() == 2 else v for k, v in x.items()}
    return x


def collate(samples):
    x, y = default_collate(samples)
    return trim(x), y


def token_lengths(ds: Dataset) -> torch.Tensor | None:
    """Each sample's number of tokens (its attention mask's sum) where samples are padded token inputs, else
    None. Subsets of a tokenised dataset (the validation split cut from the training one) read the masks at once."""
    base, idx = ds, None
    while isinstance(base, Subset):
        picked = torch.as_tensor(base.indices, dtype=torch.long)
        idx, base = (picked if idx is None else picked[idx]), base.dataset
    if isinstance(getattr(base, "attention_mask", None), torch.Tensor):
        mask = base.attention_mask if idx is None else base.attention_mask[idx]
        return mask.sum(1)
    if len(ds) == 0:
        return None
    x = ds[0][0]
    if not (isinstance(x, dict) and isinstance(x.get("attention_mask"), torch.Tensor) and x["attention_mask"].dim() == 1):
        return None
    return torch.stack([ds[i][0]["attention_mask"].sum() for i in range(len(ds))])


def longest_first(lengths: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Sample indices in batches, longest sentence first (ties in sample order): each batch, trimmed to its
    longest, carries little padding. For passes whose order does not matter (validation, the teacher cache)."""
    return list(torch.argsort(lengths, descending=True, stable=True).split(batch_size))


class LengthGrouped(BatchSampler):
    """Shuffled batches of sentences of similar length, a new draw each epoch: the samples are shuffled, cut
    into pools of ``pool`` batches, each pool sorted by length and cut into batches, and the batches shuffled
    (Hugging Face's group_by_length). Every batch is then trimmed to its longest sentence (``trim``), so a
    batch pays for about its own length instead of the longest of 32 random ones: on docstrings at 64 tokens
    the mean padded length falls from 59 to about 23 tokens."""

    def __init__(self, lengths: torch.Tensor, batch_size: int, seed: int = 0, pool: int = 50,
                 generator: torch.Generator | None = None):
        self.lengths, self.batch_size, self.pool = lengths, batch_size, pool
        self.drop_last = False
        self.generator = generator or torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        g, b = self.generator, self.batch_size
        order = torch.randperm(len(self.lengths), generator=g)
        batches = []
        for start in range(0, len(order), b * self.pool):
            chunk = order[start:start + b * self.pool]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += [chunk[i:i + b].tolist() for i in range(0, len(chunk), b)]
        for i in torch.randperm(len(batches), generator=g).tolist():
            yield batches[i]


def stack(xs: list):
    """Stack samples that are tensors or dicts of tensors (Hugging Face inputs)."""
    if isinstance(xs[0], dict):
        return trim({k: torch.stack([x[k] for x in xs]) for k in xs[0]})
    return torch.stack(xs)


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]  # one sample, without the batch axis
    num_classes: int
    meta: dict = field(default_factory=dict)  # mean/std, source, preprocessing

    def loader(self, split: str, batch_size: int, shuffle: bool = False, workers: int = 0, seed: int = 0,
               by_length: bool = False, dataset: Dataset | None = None, collate_fn=collate):
        """Batches of ``split`` (or of ``dataset``, a view of it such as cache.Indexed), shuffled with ``seed``
        when ``shuffle``; ``by_length``, where the samples are token inputs, batches sentences of similar length:
        drawn anew each epoch when shuffled (LengthGrouped), else in length order, longest first."""
        ds = getattr(self, split) if dataset is None else dataset
        lengths = token_lengths(getattr(self, split)) if by_length else None
        if lengths is not None:  # shuffled: grouped anew each epoch; else longest first, the same every time
            batches = LengthGrouped(lengths, batch_size, seed) if shuffle else \
                [b.tolist() for b in longest_first(lengths, batch_size)]
            return DataLoader(ds, batch_sampler=batches, num_workers=workers, persistent_workers=workers > 0,
                              collate_fn=collate_fn)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                          generator=g, persistent_workers=workers > 0, collate_fn=collate_fn)

    def tensors(self, split: str, limit: int | None = None) -> tuple[torch.Tensor | dict, torch.Tensor]:
        ds = getattr(self, split)
        n = len(ds) if limit is None else min(limit, len(ds))
        xs, ys = zip(*(ds[i] for i in range(n)))
        return stack(list(xs)), torch.as_tensor(ys)

    def held_out(self, trained_on: int, limit: int = 2048) -> tuple[torch.Tensor | dict, torch.Tensor]:
        """The validation split, then the training samples after the first ``trained_on`` whose labels are
        known (at most ``limit`` in all): what a model trained on ``tensors("train", limit=trained_on)`` has
        not seen. A small validation split ranks candidates by a handful of samples (180 on digits); the
        unused training samples make the ranking several times less noisy. Where the validation split was kept
        apart from training by the dataset (``meta["val_apart"]``: docstrings' modules of their own), it alone: the
        training samples would score fit to the training distribution, not what the held-out split measures."""
        picked = [self.val[i] for i in range(min(limit, len(self.val)))]
        stop = trained_on if self.meta.get("val_apart") else len(self.train)
        for i in range(trained_on, stop):
            if len(picked) >= limit:
                break
            x, y = self.train[i]
            if int(y) >= 0:  # a hidden label (the few-labels setting) cannot score
                picked.append((x, y))
        if not picked:
            raise UserError(f"no held-out samples to score on: the validation split is empty and the training split "
                            f"has no sample past the first {trained_on} (set data.val_fraction)")
        xs, ys = zip(*picked)
        return stack(list(xs)), torch.as_tensor(ys)


class HiddenLabels(Dataset):
    """A training split whose labels are kept for a stratified ``fraction`` of samples and hidden (-1)
    for the rest: the few-labels setting, where distillation learns from the teacher's outputs on
    every sample and the ``ce`` loss sees only the labelled ones. ``labelled`` lists the kept indices."""

    def __init__(self, ds: Dataset, fraction: float, seed: int):
        self.dataset, self.fraction = ds, fraction
        labels = torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])
        g = torch.Generator().manual_seed(seed)
        keep = []
        for c in labels.unique().tolist():  # per class, at least one label each
            idx = (labels == c).nonzero().flatten()
            n = max(1, round(fraction * len(idx)))
            keep += idx[torch.randperm(len(idx), generator=g)[:n]].tolist()
        self.labelled = sorted(keep)
        self.mask = torch.zeros(len(ds), dtype=torch.bool)
        self.mask[self.labelled] = True

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, (y if self.mask[i] else torch.tensor(-1, dtype=torch.long))


def digits(image_size: int = 32, label_fraction: float = 1.0) -> TensorDataset:
    """sklearn's bundled 8x8 digits (1797 images, 10 classes), upsampled bilinearly to ``image_size``.

    Upsampling makes the compute of a CNN on them non-trivial, as for real images. Pixels are scaled to
    [0, 1] and standardised with the dataset's mean and std (recorded in the manifest).
    ``label_fraction`` < 1 keeps labels for that fraction of the *training* split only (stratified by
    class, chosen with the recipe's seed); the rest carry label -1. Validation and test keep theirs.
    The teacher must then come from a checkpoint trained with all labels.
    """
    from sklearn.datasets import load_digits

    if not 8 <= image_size <= 256:
        raise UserError(f"data.kwargs.image_size {image_size}: use 8 to 256")
    if not 0 < label_fraction <= 1:
        raise UserError(f"data.kwargs.label_fraction {label_fraction}: use a fraction in (0, 1]")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean, std = float(x.mean()), float(x.std())
    x = (x - mean) / std
    ds = TensorDataset(x, torch.tensor(d.target, dtype=torch.long))
    ds.meta = {"source": "sklearn.datasets.load_digits", "image_size": image_size, "mean": [mean],
               "std": [std], "preprocessing": "x/16, bilinear resize, (x-mean)/std"}
    if label_fraction < 1:
        ds.meta["label_fraction"] = label_fraction  # applied by load_data to the training split
    return ds


# name -> function(**kwargs) -> dataset or dict of datasets
DATASETS = {"digits": digits, "docstrings": docstrings}


def _split(ds: Dataset, fractions: tuple[float, float], seed: int) -> tuple[Dataset, Dataset, Dataset]:
    n = len(ds)
    n_test = max(1, round(n * fractions[1]))
    n_val = max(1, round(n * fractions[0])) if fractions[0] > 0 else 0
    n_train = n - n_test - n_val
    if n_train < 1:
        raise UserError(f"data has {n} samples: too few to split off {n_val} validation and {n_test} test samples")
    return tuple(random_split(ds, [n_train, n_val, n_test], generator=torch.Generator().manual_seed(seed)))


def _num_classes(ds: Dataset) -> int:
    if isinstance(ds, TensorDataset):
        return int(ds.tensors[1].max()) + 1
    if isinstance(ds, Subset):
        return _num_classes(ds.dataset)
    return int(max(int(ds[i][1]) for i in range(len(ds)))) + 1


def _first_non_finite(ds: Dataset, limit: int = 2048) -> int | None:
    """Index of a sample with NaN/inf: all of a tensor dataset, else the first ``limit`` samples."""
    base, idx = ds, None
    if isinstance(ds, Subset) and isinstance(ds.dataset, TensorDataset):
        base, idx = ds.dataset, torch.as_tensor(ds.indices, dtype=torch.long)
    if isinstance(base, TensorDataset):
        x = base.tensors[0] if idx is None else base.tensors[0][idx]
        if x.is_floating_point():
            bad = (~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero()
            return int(bad[0]) if len(bad) else None
        return None
    for i in range(min(len(ds), limit)):
        x = ds[i][0]
        if isinstance(x, dict):
            x = next((v for v in x.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
            return i
    return None


def load_data(spec, seed: int, defaults: dict | None = None) -> DataSplits:
    """Build the data named by a recipe's ``data`` section and check that it is usable. ``defaults``
    fill keyword arguments the function takes and the recipe leaves out (a teacher's tokenizer)."""
    import inspect

    from .models import resolve_ref

    fn = DATASETS.get(spec.dataset) if ":" not in spec.dataset else resolve_ref(spec.dataset, "data")
    if fn is None:
        raise UserError(f"data {spec.dataset!r} is not a built-in dataset ({', '.join(sorted(DATASETS))}) "
                        "nor a 'module:function' reference")
    kwargs = dict(spec.kwargs)
    try:
        accepted = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        accepted = {}
    for k, v in (defaults or {}).items():
        if v is not None and k not in kwargs and k in accepted:
            kwargs[k] = v
    try:
        out = fn(**kwargs)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"data {spec.dataset!r} raised {type(e).__name__}: {e}") from None
    meta = dict(getattr(out, "meta", {}) or {})
    if isinstance(out, dict):
        if "train" not in out or "test" not in out:
            raise UserError(f"data {spec.dataset!r} returned a dict without 'train' and 'test' "
                            f"(keys: {', '.join(map(str, out))})")
        train, test = out["train"], out["test"]
        val = out.get("val")
        if val is None:
            n_val = round(len(train) * spec.val_fraction)
            if n_val:
                train, val = random_split(train, [len(train) - n_val, n_val],
                                          generator=torch.Generator().manual_seed(seed))
            else:
                val = test
        meta.update(out.get("meta", {}) or {})
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
        train, test = out[0], out[-1]
        val = out[1] if len(out) == 3 else test
    else:
        train, val, test = _split(out, (spec.val_fraction, spec.test_fraction), seed)
        if spec.val_fraction == 0:
            val = test
    for name, ds in (("train", train), ("test", test)):
        try:
            n = len(ds)
        except TypeError:
            raise UserError(f"data {spec.dataset!r}: the {name} split has no length (a map-style dataset is needed)") from None
        if n == 0:
            raise UserError(f"data {spec.dataset!r}: the {name} split is empty")
    sample = train[0]
    ok_input = isinstance(sample, (tuple, list)) and len(sample) == 2 and (
        isinstance(sample[0], torch.Tensor) or (isinstance(sample[0], dict) and sample[0]
                                                and all(isinstance(v, torch.Tensor) for v in sample[0].values())))
    if not ok_input:
        raise UserError(f"data {spec.dataset!r}: each sample must be an (input, label) pair, the input a tensor "
                        f"or a dict of tensors (Hugging Face inputs), got {type(sample).__name__}")
    x0 = sample[0] if isinstance(sample[0], torch.Tensor) else next(iter(sample[0].values()))
    for name, ds in (("train", train), ("val", val), ("test", test)):
        bad = _first_non_finite(ds)
        if bad is not None:
            raise UserError(f"data {spec.dataset!r}: {name} sample {bad} contains NaN or inf")
    ncls = int(meta.get("num_classes") or max(_num_classes(train), _num_classes(test)))
    if meta.get("label_fraction", 1) < 1:
        train = HiddenLabels(train, float(meta["label_fraction"]), seed)
        meta["labelled"] = len(train.labelled)
    meta.setdefault("dataset", spec.dataset)
    meta.update(train=len(train), val=len(val), test=len(test), seed=seed)
    return DataSplits(train, val, test, tuple(x0.shape), ncls, meta)
