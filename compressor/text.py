"""Text that ships on every machine: the docstrings of installed modules, tokenised for an encoder.

Training and held-out sentences come from *different* modules, so held-out quality is measured on text
the student never saw. Each sentence's label is the index of its module within its split: a linear
probe on the embeddings predicts it (compressor/tasks.py).
"""
from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings

import torch
from torch.utils.data import Dataset

from .errors import UserError

TRAIN_MODULES = ("os", "json", "collections", "itertools", "functools", "pathlib", "re", "typing", "argparse",
                 "logging", "subprocess", "threading", "asyncio", "email", "http.client", "urllib.request",
                 "xml.etree.ElementTree", "unittest", "decimal", "fractions", "statistics", "random", "shutil",
                 "tarfile", "zipfile", "csv", "sqlite3", "datetime", "calendar", "string", "textwrap", "difflib")
# Validation: modules of neither list, so choosing on it (the best epoch, the search's candidates) sees text from
# modules the student never trained on, as the held-out split does, at no cost to the training text.
VAL_MODULES = ("types", "weakref", "queue", "hashlib", "math", "ast", "tokenize", "traceback", "platform",
               "concurrent.futures", "mailbox", "base64", "urllib.parse", "http.server", "smtplib", "uuid",
               "xmlrpc.client", "ipaddress", "configparser", "pdb", "doctest", "shlex", "gzip", "plistlib",
               "xml.dom.minidom", "imaplib", "ftplib", "pydoc", "socketserver", "optparse", "shelve", "bz2", "lzma")
HELD_OUT_MODULES = ("inspect", "dataclasses", "enum", "contextlib", "heapq", "bisect", "socket", "ssl",
                    "pickle", "copy", "tempfile", "glob", "io", "codecs", "locale", "gettext")
# More training text (data.kwargs.library_modules): documented modules of the libraries the project and its
# hf extra install (SciPy, scikit-learn, torch, Transformers, Matplotlib, NumPy, SymPy, NetworkX, Optuna, ...):
# with every paragraph, 49k training sentences for minilm-l6 against 29k from its own modules.
LIBRARY_MODULES = ("scipy.linalg", "scipy.optimize", "scipy.sparse", "scipy.integrate", "scipy.interpolate",
                   "scipy.special", "scipy.spatial", "scipy.ndimage", "scipy.fft", "scipy.io", "scipy.cluster",
                   "scipy.sparse.linalg", "sklearn.ensemble", "sklearn.metrics", "sklearn.model_selection",
                   "sklearn.decomposition", "sklearn.cluster", "sklearn.svm", "sklearn.neighbors", "sklearn.tree",
                   "sklearn.feature_extraction.text", "sklearn.pipeline", "sklearn.utils", "sklearn.manifold",
                   "sklearn.mixture", "sklearn.naive_bayes", "sklearn.neural_network", "sklearn.covariance",
                   "sklearn.impute", "sklearn.compose", "sklearn.feature_selection", "sklearn.calibration",
                   "torch.optim", "torch.optim.lr_scheduler", "torch.utils.data", "torch.autograd", "torch.fx",
                   "torch.export", "torch.linalg", "torch.fft", "torch.sparse", "torch.onnx", "torch.cuda",
                   "torch.ao.quantization", "torch.nn.init", "torch.nn.utils", "torch.utils.checkpoint",
                   "torch.special", "torch.testing", "torch.jit", "torch.hub", "torch.profiler",
                   "transformers.generation", "transformers.tokenization_utils_base",
                   "transformers.configuration_utils", "transformers.pipelines", "transformers.training_args",
                   "matplotlib.axes", "matplotlib.colors", "matplotlib.patches", "matplotlib.ticker",
                   "matplotlib.lines", "matplotlib.text", "matplotlib.collections", "matplotlib.axis",
                   "matplotlib.image", "matplotlib.transforms", "matplotlib.legend", "matplotlib.animation",
                   "numpy.linalg", "numpy.random", "numpy.polynomial", "numpy.fft", "numpy.lib", "numpy.testing",
                   "sympy.solvers", "sympy.matrices", "sympy.integrals", "sympy.series", "sympy.core",
                   "sympy.geometry", "sympy.physics", "sympy.stats", "sympy.logic", "sympy.combinatorics",
                   "networkx.algorithms", "networkx.generators", "networkx.drawing", "networkx.classes",
                   "pydantic.fields", "pydantic.main", "rich.table", "rich.progress", "rich.text", "rich.panel",
                   "tokenizers.models", "yaml", "jinja2", "requests", "pytest", "tqdm", "pygments", "optuna",
                   "optuna.samplers", "optuna.trial", "pytorch_lightning", "pytorch_lightning.callbacks",
                   "onnx.helper", "onnxruntime", "sqlalchemy.orm", "dateutil.parser")
PARAGRAPHS = ("first", "all")  # which paragraphs of a docstring: its summary, or every prose one


def module_docstrings(name: str, min_chars: int = 40, max_chars: int = 400, paragraphs: str = "first") -> list[str]:
    """Paragraphs of the public docstrings of module ``name`` and its classes' members: the first of each
    docstring (a summary sentence), or ``paragraphs="all"``: those and every further prose paragraph (parameter
    descriptions, notes; doctest lines and paragraphs mostly of symbols left out), about four times the text."""
    if paragraphs not in PARAGRAPHS:
        raise UserError(f"data docstrings: paragraphs {paragraphs!r}: use first or all")
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return []
    out = []
    with warnings.catch_warnings():  # reading every attribute trips deprecation warnings (torch.TypedStorage)
        warnings.simplefilter("ignore")
        objs = [mod] + [getattr(mod, a, None) for a in dir(mod) if not a.startswith("_")]
        for o in objs:
            members = [getattr(o, a, None) for a in vars(o) if not a.startswith("_")] if inspect.isclass(o) else []
            for f in [o, *members]:
                d = inspect.getdoc(f) if f is not None else None
                if d:
                    paras = d.split("\n\n")
                    for i, para in enumerate(paras[:1] if paragraphs == "first" else paras):
                        para = _HEADER.sub("", " ".join(para.split()))
                        if min_chars <= len(para) <= max_chars and (i == 0 or _prose(para)):
                            out.append(para)
    return list(dict.fromkeys(out))


_HEADER = re.compile(r"^\w[\w ]{0,30} -{3,} ")  # a numpy-style section header: "Parameters ---------- "


def _prose(para: str) -> bool:
    """Not an example session (>>>, ...) nor a table, signature or formula: mostly letters and spaces."""
    return not para.startswith((">>>", "...", "..")) and sum(c.isalpha() or c == " " for c in para) >= 0.8 * len(para)


def labelled_docstrings(modules, paragraphs: str = "first") -> tuple[list[str], list[int], list[str]]:
    """Sentences, the index of the module each came from, and the modules that gave any. A sentence
    found in two modules (re-exported objects) keeps the first."""
    seen, texts, labels, used = set(), [], [], []
    for name in modules:
        got = [s for s in module_docstrings(name, paragraphs=paragraphs) if s not in seen]
        if not got:
            continue
        seen.update(got)
        texts += got
        labels += [len(used)] * len(got)
        used.append(name)
    return texts, labels, used


class TokenizedText(Dataset):
    """Sentences tokenised once, padded to ``max_length``; a sample is ({input_ids, attention_mask}, label).
    Batches are trimmed to their longest sentence when collated (compressor.data.collate)."""

    def __init__(self, texts: list[str], labels: list[int], tok, max_length: int):
        enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.texts = texts

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}, self.labels[i]


def docstrings(tokenizer_path: str | None = None, tokenizer_package: str | None = None,
               train_modules: list[str] | None = None, test_modules: list[str] | None = None,
               extra_train_modules: list[str] | None = None, max_length: int = 128, max_train: int = 3000,
               max_test: int = 400, seed: int = 0, train_paragraphs: str = "first",
               val_modules: list[str] | None = None, max_val: int = 720, library_modules: bool = False) -> dict:
    """Docstrings of ``train_modules`` (+ ``extra_train_modules``, e.g. installed packages such as numpy, +
    LIBRARY_MODULES with ``library_modules``) for training and of ``test_modules`` (disjoint) held out, tokenised
    with the teacher's tokenizer (filled in from a Hugging Face teacher when left out). Modules that are not
    installed give nothing. ``train_paragraphs: all`` trains on every prose paragraph of the training modules'
    docstrings, not only the first (more unlabelled text for distillation); held-out sentences are always first
    paragraphs, so quality figures compare across settings. The validation split is the first paragraphs of
    ``val_modules`` (disjoint from both; ``[]``: none, and the recipe's data.val_fraction of the training sentences
    instead): a sentence from a module the student trains on says little about text from modules it never saw, which
    is what held-out quality measures, so choices made on such a split (the best epoch, the search's candidates)
    favour students that fit the training modules. On MiniLM-L6 a two-layer student beat a three-layer one on random
    training sentences (agreement 0.903 against 0.875) and lost on the held-out modules (0.832 against 0.861);
    carving whole training modules out for validation ranked them right but cost the three-layer student 0.009
    agreement (less varied training text)."""
    from .hf import tokenizer

    train_modules = list(dict.fromkeys([*(train_modules or TRAIN_MODULES), *(extra_train_modules or []),
                                        *(LIBRARY_MODULES if library_modules else ())]))
    test_modules = list(test_modules or HELD_OUT_MODULES)
    # the default validation modules less any the recipe trains on or holds out; modules it names must be apart
    val_modules = ([m for m in VAL_MODULES if m not in train_modules and m not in test_modules]
                   if val_modules is None else list(val_modules))
    for a, b, names in ((train_modules, test_modules, "train_modules and test_modules"),
                        (train_modules, val_modules, "train_modules and val_modules"),
                        (val_modules, test_modules, "val_modules and test_modules")):
        both = set(a) & set(b)
        if both:
            raise UserError(f"data.kwargs: {', '.join(sorted(both))} in both {names}; held-out and validation "
                            "text must come from other modules")
    if train_paragraphs not in PARAGRAPHS:
        raise UserError(f"data.kwargs.train_paragraphs {train_paragraphs!r}: use first (each docstring's summary) or all "
                        "(every prose paragraph)")
    if not 8 <= max_length <= 512:
        raise UserError(f"data.kwargs.max_length {max_length}: use 8 to 512 tokens")
    if not (tokenizer_path or tokenizer_package):
        raise UserError("data docstrings needs a tokenizer: a Hugging Face teacher gives its own, or set "
                        "data.kwargs.tokenizer_path (a model directory) or tokenizer_package")
    tok = tokenizer(tokenizer_path, tokenizer_package)
    splits, meta = {}, {}
    # validation last: a sentence re-exported by a held-out module stays held out, as before validation had modules
    todo = [("train", train_modules, max_train), ("test", test_modules, max_test), ("val", val_modules, max_val)]
    for split, modules, cap in (t for t in todo if t[1]):
        texts, labels, used = labelled_docstrings(modules, train_paragraphs if split == "train" else "first")
        pairs = list(zip(texts, labels))
        random.Random(seed).shuffle(pairs)  # each split its own draw: the held-out one whatever trains
        # a sentence a split drawn before holds (a re-exported docstring) is not drawn again
        held = {t for d in splits.values() for t in d.texts}
        pairs = [(t, y) for t, y in pairs if t not in held][:cap]
        if len(pairs) < 8:
            raise UserError(f"data docstrings: only {len(pairs)} {split} sentences from modules "
                            f"{', '.join(modules)}; name modules with more documentation")
        splits[split] = TokenizedText([t for t, _ in pairs], [y for _, y in pairs], tok, max_length)
        meta[f"{split}_modules"] = used
    if "val" in splits:
        meta["val_apart"] = True  # DataSplits.held_out: score on validation alone
    meta.update(source="docstrings of installed Python modules (train, validation and held-out from different modules)",
                max_length=max_length, dims={"sequence": max_length}, num_classes=len(meta["test_modules"]),
                train_paragraphs=train_paragraphs,
                tokenizer=tokenizer_path or tokenizer_package)
    return {**splits, "meta": meta}
