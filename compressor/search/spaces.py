"""Search spaces derived from the teacher: which students of the teacher's own family are worth trying.

A genome is a plain dict of gene name -> value (JSON data), so a student is rebuilt from the manifest
alone: ``space.config(genome)`` gives the builder's keyword arguments and ``space.build(genome)`` calls
compressor.models.build_model with them. A Space is plain data too: its genes (name -> ordered choices),
the builder name and the fixed keyword arguments (input channels, classes).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from ..models import MLP, ResNet, build_model


@dataclass
class Space:
    family: str  # "cnn", "transformer", "mlp", "hf-encoder"
    builder: str  # a compressor.models.MODELS name or 'module:function'
    genes: dict[str, list]  # gene -> choices, smallest first
    fixed: dict = field(default_factory=dict)  # builder keyword arguments that are not searched

    def __post_init__(self):
        if not self.genes or any(not c for c in self.genes.values()):
            empty = [g for g, c in self.genes.items() if not c]
            raise UserError(f"search space for {self.family!r} is empty"
                            + (f": gene {empty[0]!r} has no choices" if empty else ": no genes"))

    @property
    def size(self) -> int:
        return math.prod(len(c) for c in self.genes.values())

    def sample(self, rng: random.Random) -> dict:
        return {g: rng.choice(c) for g, c in self.genes.items()}

    def config(self, genome: dict) -> dict:
        """Builder keyword arguments for a genome."""
        return {**self.fixed, **TO_CONFIG[self.family](genome)}

    def build(self, genome: dict, defaults: dict | None = None) -> nn.Module:
        return build_model(self.builder, self.config(genome), defaults, what="search candidate")

    def skeleton(self, genome: dict, defaults: dict | None = None) -> nn.Module:
        """The candidate's shapes without its weights (for cost counts on the meta device): a Hugging
        Face student is built at random init, so nothing is read from the teacher's files."""
        config = self.config(genome)
        if self.family == "hf-encoder":
            config = {**config, "init": "random"}
        return build_model(self.builder, config, defaults, what="search candidate")

    def to_dict(self) -> dict:
        return {"family": self.family, "builder": self.builder, "genes": self.genes, "fixed": self.fixed}


def genome_key(genome: dict) -> str:
    """A stable hash: the same genome gives the same key in any process (duplicate detection, caching)."""
    return hashlib.sha256(json.dumps(genome, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------- genome -> config

def _indexed(genome: dict, prefix: str) -> list:
    return [genome[k] for k in sorted((k for k in genome if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))]


def _cnn_config(g: dict) -> dict:
    # Stages past `stages` are dropped, so one space covers shallower students too.
    n = g.get("stages", len(_indexed(g, "width_")))
    out = {"widths": _indexed(g, "width_")[:n], "depths": _indexed(g, "depth_")[:n]}
    if "kernel" in g:
        out["kernel"] = g["kernel"]
    return out


def _mlp_config(g: dict) -> dict:
    return {"hidden": _indexed(g, "width_")[:g["layers"]]}


def _transformer_config(g: dict) -> dict:
    return {k: g[k] for k in ("layers", "hidden", "heads", "ffn", "vocab")}


def _hf_config(g: dict) -> dict:
    # The genes are the transformers config names, so the genome is the hf-encoder builder's config
    # overrides as they stand (plus `init` when the recipe's space makes it a gene).
    return dict(g)


TO_CONFIG = {"cnn": _cnn_config, "mlp": _mlp_config, "transformer": _transformer_config, "hf-encoder": _hf_config}


# ------------------------------------------------------------------------- spaces from a teacher

def _widths(w: int, step: int = 4) -> list[int]:
    """Student widths from 1/8 of the teacher's to the teacher's, multiples of ``step``."""
    out = {max(step, round(w * f / step) * step) for f in (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1)}
    return sorted(out)


def cnn_space(widths, depths, kernel: int = 3, builder: str = "resnet", fixed: dict | None = None) -> Space:
    """Depth per stage 1..teacher's, widths 1/8..1 of the teacher's per stage, kernel 3 or 5."""
    genes = {}
    for i, (w, d) in enumerate(zip(widths, depths)):
        genes[f"width_{i}"] = _widths(int(w))
        genes[f"depth_{i}"] = list(range(1, int(d) + 1))
    genes["kernel"] = sorted({3, 5, int(kernel)})
    return Space("cnn", builder, genes, dict(fixed or {}))


def mlp_space(hidden, builder: str = "mlp", fixed: dict | None = None) -> Space:
    widest = max(hidden)
    genes = {"layers": list(range(1, len(hidden) + 1))}
    for i in range(len(hidden)):
        genes[f"width_{i}"] = _widths(widest, step=8)
    return Space("mlp", builder, genes, dict(fixed or {}))


def transformer_space(layers: int = 12, hidden: int = 768, ffn: int = 3072, vocab: int = 50000,
                      heads=(1, 2, 4, 8), builder: str = "compressor.search.spaces:encoder_classifier",
                      fixed: dict | None = None) -> Space:
    """The Compressor paper's space, capped by the teacher: heads {1, 2, 4, 8}, hidden 16..H step 16,
    FFN 32..F step 32, layers 1..L, vocabulary 1000..V step 1000 (its published 25 and 50 MB models use
    16 heads: pass heads=(1, 2, 4, 8, 16)). Hidden sizes are multiples of 16, so every head count
    divides them."""
    return Space("transformer", builder, {
        "heads": [h for h in heads if h <= max(16, hidden // 16)],
        "hidden": list(range(16, hidden + 1, 16)),
        "ffn": list(range(32, ffn + 1, 32)),
        "layers": list(range(1, layers + 1)),
        "vocab": list(range(1000, vocab + 1, 1000)),
    }, dict(fixed or {}))


def _eighths(full: int, step: int) -> list[int]:
    """1/8, 2/8, ..., 8/8 of ``full`` rounded to multiples of ``step`` (at least ``step``), and ``full``."""
    return sorted({max(step, round(full * k / 8 / step) * step) for k in range(1, 9)} | {full})


def hf_encoder_space(layers: int, hidden: int, heads: int, ffn: int, fixed: dict | None = None) -> Space:
    """Students of a Hugging Face encoder's own class, bounded by the teacher's config: layers 1..L,
    attention heads among the divisors of the teacher's, hidden 1/8..1 of the teacher's in multiples of
    lcm(heads, 8) (so every head count divides every hidden size, and widths stay vector-friendly),
    FFN 1/8..1 of the teacher's in multiples of 8. The genes are the transformers config names, so a
    genome is the hf-encoder builder's config (compressor/hf.py) as it stands."""
    step = math.lcm(heads, 8)
    hiddens = [h for h in _eighths(hidden, step) if h % heads == 0]
    return Space("hf-encoder", "hf-encoder", {
        "num_hidden_layers": list(range(1, layers + 1)),
        "hidden_size": hiddens,
        "num_attention_heads": [d for d in range(1, heads + 1) if heads % d == 0],
        "intermediate_size": _eighths(ffn, 8),
    }, {"init": "teacher", **(fixed or {})})


def detect(teacher: nn.Module, teacher_name: str = "", teacher_kwargs: dict | None = None) -> Space | None:
    """The space of the teacher's family, read from its modules; None when the family is unknown."""
    if isinstance(teacher, ResNet):
        widths = [s[0].conv1.out_channels for s in teacher.stages]
        depths = [len(s) for s in teacher.stages]
        kernel = teacher.stem[0].kernel_size[0]
        return cnn_space(widths, depths, kernel)
    if isinstance(teacher, MLP):
        hidden = [m.out_features for m in teacher.body if isinstance(m, nn.Linear)]
        return mlp_space(hidden or [64])
    from ..hf import SentenceEncoder, config_of

    if isinstance(teacher, SentenceEncoder):
        # hf-encoder: the same class with a smaller config, from the teacher's weights where shapes allow.
        c = config_of(teacher)
        if len(c) == 4:
            return hf_encoder_space(c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
                                    c["intermediate_size"])
    cfg = getattr(teacher, "config", None)
    if cfg is not None and hasattr(cfg, "num_hidden_layers") and hasattr(cfg, "hidden_size"):
        # A Hugging Face BERT-like encoder: the student is the paper's encoder, capped by the teacher.
        return transformer_space(cfg.num_hidden_layers, cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
                                 max(1000, getattr(cfg, "vocab_size", 50000) // 1000 * 1000))
    if isinstance(teacher, EncoderClassifier):
        return transformer_space(teacher.layers, teacher.hidden, teacher.ffn, max(1000, teacher.vocab // 1000 * 1000))
    return None


def from_spec(spec, teacher: nn.Module, teacher_name: str = "") -> Space:
    """The recipe's search space: genes it names override (or, for an unknown teacher, define) the
    detected space. ``spec`` has ``family``, ``builder`` and ``space`` (gene -> choices) attributes."""
    detected = detect(teacher, teacher_name)
    family = getattr(spec, "family", None) or (detected.family if detected else None)
    genes = dict(getattr(spec, "space", None) or {})
    if detected is None and not genes:
        raise UserError(f"search: the teacher's family is unknown ({type(teacher).__name__}); name the genes in "
                        "search.space (and search.family, search.builder) in the recipe")
    if family not in TO_CONFIG:
        raise UserError(f"search.family {family!r}: use one of {', '.join(TO_CONFIG)}")
    base = detected if detected is not None and detected.family == family else None
    builder = getattr(spec, "builder", None) or (base.builder if base else DEFAULT_BUILDER[family])
    merged = {**(base.genes if base else {}), **{k: list(v) for k, v in genes.items()}}
    return Space(family, builder, merged, dict(base.fixed) if base else {})


DEFAULT_BUILDER = {"cnn": "resnet", "mlp": "mlp", "transformer": "compressor.search.spaces:encoder_classifier",
                   "hf-encoder": "hf-encoder"}


def pruned_genome(space: Space, teacher: nn.Module, removed, defaults: dict | None = None) -> tuple[dict | None, str]:
    """The genome of the teacher with ``removed`` units gone, in ``space``; (None, why) when the space
    cannot express it. A ResNet's block removed is one block fewer in its stage; a Transformer layer
    removed is one layer fewer. The built genome must have the pruned teacher's parameter shapes, so
    the teacher's weights fit it (checked, not assumed)."""
    from ..prune import build_pruned

    genome: dict = {}
    if space.family == "cnn" and isinstance(teacher, ResNet):
        depths = [len(s) for s in teacher.stages]
        for p in removed:
            parts = p.split(".")
            if len(parts) != 3 or parts[0] != "stages":
                return None, f"unit {p} is not a block of a stage"
            depths[int(parts[1])] -= 1
        for i, s in enumerate(teacher.stages):
            genome[f"width_{i}"], genome[f"depth_{i}"] = s[0].conv1.out_channels, depths[i]
        genome["kernel"] = teacher.stem[0].kernel_size[0]
        if "stages" in space.genes:
            genome["stages"] = len(depths)
    elif space.family == "transformer" and isinstance(teacher, EncoderClassifier):
        genome = {"layers": teacher.layers - len(removed), "hidden": teacher.hidden,
                  "heads": teacher.encoder.layers[0].self_attn.num_heads, "ffn": teacher.ffn,
                  "vocab": teacher.vocab}
    elif space.family == "hf-encoder":
        from ..hf import config_of

        c = config_of(teacher)
        if len(c) != 4:
            return None, f"a {type(teacher).__name__} teacher has no Hugging Face config"
        genome = {**c, "num_hidden_layers": c["num_hidden_layers"] - len(removed), "init": "teacher"}
    else:
        return None, f"a {type(teacher).__name__} teacher has no genome in the {space.family} space"
    missing = [g for g in space.genes if g not in genome]
    if missing:
        return None, f"the space has genes the pruned teacher does not set ({', '.join(missing)})"
    out = [f"{g}={genome[g]}" for g in space.genes if genome[g] not in space.genes[g]]
    if out:
        return None, f"{', '.join(out)} not among the space's choices"
    genome = {g: genome[g] for g in space.genes}
    shapes = lambda m: sorted(tuple(p.shape) for p in m.state_dict().values())  # noqa: E731
    if shapes(space.build(genome, defaults)) != shapes(build_pruned(teacher, removed)):
        return None, f"the genome {genome} builds a model of other shapes than the pruned teacher"
    return genome, ""


# ------------------------------------------------------------------- a small encoder to build from

class EncoderClassifier(nn.Module):
    """A RoBERTa-layout encoder classifier (token + position embeddings, post-LN blocks, pooled [CLS]),
    the student of the Compressor paper's space. Input: token ids (batch, sequence)."""

    def __init__(self, layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128, vocab: int = 1000,
                 max_len: int = 514, num_classes: int = 2, dropout: float = 0.1):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.layers, self.hidden, self.ffn, self.vocab = layers, hidden, ffn, vocab
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden)
        block = nn.TransformerEncoderLayer(hidden, heads, ffn, dropout, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.pooler = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, num_classes)

    def features(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.encoder(self.norm(self.tok(ids % self.vocab) + self.pos(pos)))

    def forward(self, ids):
        return self.head(self.pooler(self.features(ids)[:, 0]))


def encoder_classifier(layers: int = 2, hidden: int = 64, heads: int = 4, ffn: int = 128, vocab: int = 1000,
                       num_classes: int = 2, max_len: int = 514) -> nn.Module:
    return EncoderClassifier(layers, hidden, heads, ffn, vocab, max_len, num_classes)
