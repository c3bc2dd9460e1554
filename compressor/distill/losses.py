"""Distillation loss terms. Each is an nn.Module called with keyword arguments from one pool:

    student, teacher   logits (batch x classes) of the student and of the frozen teacher
    target             integer labels (batch,)

A term takes the keywords it needs and ignores the rest, so the DistillModule can call every term the
same way and a user's own training loop can call ``KD(temperature=4)(student=s, teacher=t)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class KD(nn.Module):
    """Hinton et al.: T^2 * KL(softmax(t/T) || softmax(s/T)), batch-mean.

    The T^2 factor keeps the gradient scale independent of the temperature.
    """

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = float(temperature)

    def forward(self, *, student: torch.Tensor, teacher: torch.Tensor, **_) -> torch.Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(student / t, dim=-1)
        log_p_t = F.log_softmax(teacher / t, dim=-1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


class CE(nn.Module):
    """Cross-entropy with the ground-truth labels (optionally label-smoothed).

    Label -1 marks an unlabelled sample (few-label data): it is ignored, and a batch without any label
    contributes zero (not the NaN of a mean over nothing), so KD still learns from it.
    """

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, *, student: torch.Tensor, target: torch.Tensor, **_) -> torch.Tensor:
        if not (target != -1).any():
            return student.sum() * 0.0
        return F.cross_entropy(student, target, label_smoothing=self.label_smoothing, ignore_index=-1)


# ------------------------------------------------------------------------------------ feature terms
#
# Feature terms compare intermediate outputs named by module path. They take two more keywords:
#
#     student_features, teacher_features   {module path: tensor}, filled by forward hooks (hooks.capture)
#
# ``pairs`` in the recipe lists [student path, teacher path] (or one path used for both). Where widths
# differ, a learned adapter (1x1 conv, or linear for token/vector features) maps the student's feature to
# the teacher's width. Adapters live inside the term, so they train with the student (DistillModule
# optimizes its terms) and never reach the exported student.

def parse_pairs(pairs, name: str) -> list[tuple[str, str]]:
    out = []
    for p in pairs or []:
        if isinstance(p, str):
            p = (p, p)
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) and s for s in p)):
            raise ValueError(f"loss {name!r}: each pair is [student module path, teacher module path] "
                             f"or one path used for both, got {p!r}")
        out.append((p[0], p[1]))
    return out


def _shape(t) -> str:
    return "x".join(str(d) for d in t.shape)


def match_spatial(s: torch.Tensor, size) -> torch.Tensor:
    """Pool a larger student map down, interpolate a smaller one up, to the teacher's H x W."""
    if tuple(s.shape[2:]) == tuple(size):
        return s
    if s.shape[2] >= size[0] and s.shape[3] >= size[1]:
        return F.adaptive_avg_pool2d(s, size)
    return F.interpolate(s, size=size, mode="bilinear", align_corners=False)


def make_adapter(s: torch.Tensor, t: torch.Tensor, where: str, project: str) -> nn.Module:
    """The learned projection from the student's width to the teacher's (identity when not needed).

    project: "always" (FitNets' regressor), "auto" (only when widths differ), "never" (widths may differ,
    the term does not need them equal). Shapes that no projection can reconcile are a UserError.
    """
    from ..errors import UserError

    bad = (f"layer pair {where}: student output {_shape(s)} and teacher output {_shape(t)} cannot be "
           "adapted")
    if s.shape[0] != t.shape[0] or s.dim() != t.dim() or s.dim() not in (2, 3, 4):
        raise UserError(f"{bad} (a pair needs the same batch and the same kind of feature: "
                        "N x C x H x W maps, N x L x D tokens or N x D vectors); pick matching layers")
    if s.dim() == 3 and s.shape[1] != t.shape[1]:
        raise UserError(f"{bad} (token counts {s.shape[1]} and {t.shape[1]} differ); pick matching layers")
    cs, ct = (s.shape[1], t.shape[1]) if s.dim() == 4 else (s.shape[-1], t.shape[-1])
    if project == "never" or (project == "auto" and cs == ct):
        return nn.Identity()
    if s.dim() == 4:
        return nn.Conv2d(cs, ct, 1, bias=False)
    return nn.Linear(cs, ct, bias=False)


class _PairTerm(nn.Module):
    """Shared by the feature terms: pairs, their adapters, and the sum of a per-pair loss."""

    project = "never"   # see make_adapter
    spatial = True      # match the student's H x W to the teacher's before the per-pair loss
    needs_pairs = True  # without pairs the term compares logits (terms that allow it set False)

    def __init__(self, pairs=None):
        super().__init__()
        name = type(self).__name__.lower()
        self.pairs = parse_pairs(pairs, name)
        if self.needs_pairs and not self.pairs:
            raise ValueError(f"loss {name!r} needs pairs: [[student module path, teacher module path], ...]")
        self.adapters = nn.ModuleList()

    @property
    def student_paths(self):
        return [s for s, _ in self.pairs]

    @property
    def teacher_paths(self):
        return [t for _, t in self.pairs]

    def build(self, student_features: dict, teacher_features: dict, **_) -> None:
        """Create the adapters from one batch's features; DistillModule calls this before its optimizer exists."""
        if len(self.adapters) == len(self.pairs):
            return
        adapters = []
        for sp, tp in self.pairs:
            s, t = student_features[sp], teacher_features[tp]
            adapters.append(make_adapter(s, t, f"{sp} -> {tp}", self.project).to(s.device))
        self.adapters = nn.ModuleList(adapters)

    def _features(self, student, teacher, student_features, teacher_features):
        if not self.pairs:
            yield student, teacher
            return
        if student_features is None or teacher_features is None:
            raise ValueError(f"{type(self).__name__} compares features: pass student_features= and teacher_features=")
        self.build(student_features, teacher_features)
        for (sp, tp), adapter in zip(self.pairs, self.adapters):
            s, t = student_features[sp], teacher_features[tp]
            if self.spatial and s.dim() == 4:
                s = match_spatial(s, t.shape[2:])
            yield adapter(s), t

    def forward(self, *, student=None, teacher=None, student_features=None, teacher_features=None, **kw):
        terms = [self.pair_loss(s, t, **kw) for s, t in self._features(student, teacher, student_features, teacher_features)]
        return torch.stack(terms).sum()

    def pair_loss(self, s: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        raise NotImplementedError


class Feature(_PairTerm):
    """FitNets hint: mean squared error between the projected student feature and the teacher's.

    The projection (1x1 conv / linear, no bias) is always learned, as FitNets' regressor is.
    """

    project = "always"

    def pair_loss(self, s, t, **_):
        return F.mse_loss(s, t)


class FeatureNorm(_PairTerm):
    """LAPTOP-Diff's normalised feature distillation: per sample ||F_t - F_s||^2 / ||F_t||^2, batch mean.

    Dividing by the teacher feature's own energy keeps deep, large-norm blocks from dominating the sum
    over pairs. A projection is learned only where widths differ (a pruned teacher matches exactly).
    """

    project = "auto"

    def __init__(self, pairs=None, eps: float = 1e-8):
        super().__init__(pairs)
        self.eps = float(eps)

    def pair_loss(self, s, t, **_):
        num = (t - s).flatten(1).pow(2).sum(1)
        den = t.flatten(1).pow(2).sum(1).clamp_min(self.eps)
        return (num / den).mean()


class AttentionTransfer(_PairTerm):
    """Zagoruyko & Komodakis: spatial attention Q = mean_c |A_c|^p, flattened, L2-normalised per sample;
    loss = mean over batch and positions of (Q_s - Q_t)^2 (the reference code's form; the paper's beta
    = 1000 corresponds to weight ~1000 here). Channel counts may differ; H x W are matched by pooling.
    Token features (N x L x D) give one attention value per token (mean over D).
    """

    def __init__(self, pairs=None, p: float = 2.0):
        super().__init__(pairs)
        self.p = float(p)

    def attention(self, x):
        a = x.abs().pow(self.p).mean(1 if x.dim() == 4 else -1)
        return F.normalize(a.flatten(1), dim=1)

    def pair_loss(self, s, t, **_):
        return (self.attention(s) - self.attention(t)).pow(2).mean()


class RKD(_PairTerm):
    """Relational KD (Park et al.): distance term (pairwise distances over their mean, Huber) and angle
    term (cosines of the angles in every triplet, Huber). Without pairs it relates the logits.
    """

    needs_pairs = False

    def __init__(self, pairs=None, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__(pairs)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    @staticmethod
    def distances(e):
        d = torch.cdist(e, e)
        off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
        return d / d[off].mean().clamp_min(1e-12)

    @staticmethod
    def angles(e):
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # diff[j, i] = unit(e_i - e_j)
        return torch.einsum("jid,jkd->jik", diff, diff)  # cos of angle i-j-k, at vertex j

    def pair_loss(self, s, t, **_):
        s, t = s.flatten(1), t.flatten(1).detach()
        loss = s.new_zeros(())
        if self.distance_weight:
            loss = loss + self.distance_weight * F.smooth_l1_loss(self.distances(s), self.distances(t))
        if self.angle_weight:
            loss = loss + self.angle_weight * F.smooth_l1_loss(self.angles(s), self.angles(t))
        return loss


class SimilarityPreserving(_PairTerm):
    """Tung & Mori: batch Gram matrices of the flattened features, rows L2-normalised,
    ||G_s - G_t||_F^2 / B^2. Any widths; without pairs it compares the logits' Gram matrices."""

    needs_pairs = False

    @staticmethod
    def gram(x):
        x = x.flatten(1)
        return F.normalize(x @ x.t(), dim=1)

    def pair_loss(self, s, t, **_):
        b = s.shape[0]
        return (self.gram(s) - self.gram(t)).pow(2).sum() / (b * b)


class ICKD(_PairTerm):
    """Inter-channel correlation (DisWOT's form, as a loss): per sample the C x C Gram F F^T of a
    C x HW feature, rows L2-normalised; sum over the batch of ||N_s - N_t||_F^2 / (B * C). A 1x1 conv
    (or linear) maps the student to the teacher's channel count where they differ."""

    project = "auto"

    @staticmethod
    def correlation(x):
        if x.dim() == 4:
            x = x.flatten(2)               # N x C x HW
        elif x.dim() == 3:
            x = x.transpose(1, 2)          # tokens: N x D x L, channels are the hidden units
        else:
            x = x.unsqueeze(2)             # vectors: N x C x 1
        return F.normalize(x @ x.transpose(1, 2), dim=2)

    def pair_loss(self, s, t, **_):
        b, c = s.shape[0], self.correlation(t).shape[1]
        return (self.correlation(s) - self.correlation(t)).pow(2).sum() / (b * c)


class MiniLM(nn.Module):
    """MiniLM's deep self-attention distillation: KL between teacher and student self-attention
    distributions softmax(Q K^T / sqrt(d)) and value relations softmax(V V^T / sqrt(d)), per head,
    averaged over heads, queries and batch.

    ``pairs`` name attention modules ([student path, teacher path]) whose children ``qkv`` are the
    query, key and value projections (Hugging Face BERT: ``encoder.layer.5.attention.self`` with
    children query/key/value). Hooks on those linears capture Q, K, V whatever attention kernel the
    model runs (SDPA never materialises the probabilities). ``heads`` splits both models' Q/K/V into
    that many heads: the models' own head count reproduces MiniLM; another count gives MiniLMv2's
    relation heads, which lets teacher and student head counts differ. The hidden widths may differ.
    ``attention_mask`` (N x L, 1 = token), if passed, keeps padding out of the keys and the average.
    """

    def __init__(self, pairs=None, heads: int = 12, qkv=("query", "key", "value"), value_weight: float = 1.0):
        super().__init__()
        self.pairs = parse_pairs(pairs, "minilm")
        if not self.pairs:
            raise ValueError("loss 'minilm' needs pairs: [[student attention module, teacher attention module]]")
        if int(heads) < 1 or len(qkv) != 3:
            raise ValueError("loss 'minilm': heads >= 1 and qkv = [query, key, value] child names")
        self.heads, self.qkv, self.value_weight = int(heads), tuple(qkv), float(value_weight)

    @property
    def student_paths(self):
        return [f"{s}.{n}" for s, _ in self.pairs for n in self.qkv]

    @property
    def teacher_paths(self):
        return [f"{t}.{n}" for _, t in self.pairs for n in self.qkv]

    def _split(self, x, where):
        from ..errors import UserError

        if x.dim() != 3 or x.shape[-1] % self.heads:
            raise UserError(f"minilm: {where} gave {_shape(x)}; expected N x L x D with D divisible by "
                            f"heads={self.heads}")
        n, l, d = x.shape
        return x.view(n, l, self.heads, d // self.heads).transpose(1, 2)  # N x H x L x dh

    def _log_relation(self, a, b, mask):
        scores = a @ b.transpose(-1, -2) / math.sqrt(a.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        return F.log_softmax(scores, dim=-1)

    def _kl(self, log_t, log_s, mask):
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # N x H x L (queries)
        if mask is None:
            return kl.mean()
        w = mask[:, None, :].expand_as(kl).float()
        return (kl * w).sum() / w.sum().clamp_min(1)

    def forward(self, *, student_features=None, teacher_features=None, attention_mask=None, **_):
        if student_features is None or teacher_features is None:
            raise ValueError("MiniLM compares attention: pass student_features= and teacher_features=")
        mask = attention_mask.bool() if attention_mask is not None else None
        total = []
        for sp, tp in self.pairs:
            sq, sk, sv = (self._split(student_features[f"{sp}.{n}"], f"{sp}.{n}") for n in self.qkv)
            with torch.no_grad():
                tq, tk, tv = (self._split(teacher_features[f"{tp}.{n}"], f"{tp}.{n}") for n in self.qkv)
                t_att, t_val = self._log_relation(tq, tk, mask), self._log_relation(tv, tv, mask)
            loss = self._kl(t_att, self._log_relation(sq, sk, mask), mask)
            if self.value_weight:
                loss = loss + self.value_weight * self._kl(t_val, self._log_relation(sv, sv, mask), mask)
            total.append(loss)
        return torch.stack(total).sum()


# --------------------------------------------------------------------------------------------- cosine

class Cosine(nn.Module):
    """For embedding outputs (sentence encoders): the batch mean of 1 - cos(student, teacher).

    ``relation`` adds that weight times the mean squared difference between the student's and the
    teacher's pairwise cosine-similarity matrices over the batch: what a retrieval user sees (which
    sentences are close), and what the embedding task's agreement metric ranks.

    A student narrower than the teacher (a searched hf-encoder student may be) gets a learned linear
    projection to the teacher's width for the first term (TinyBERT's W; built by DistillModule before
    its optimizer, trained with the student, never exported); the relation term compares the
    student's own embeddings, since similarity matrices compare any two widths."""

    def __init__(self, relation: float = 0.0):
        super().__init__()
        if relation < 0:
            raise ValueError("loss 'cosine': relation >= 0")
        self.relation = float(relation)
        self.adapter: nn.Module | None = None

    def build(self, student_features=None, teacher_features=None, *, student=None, teacher=None, **_) -> None:
        if self.adapter is not None or student is None or teacher is None:
            return
        if student.dim() == 2 == teacher.dim() and len(student) == len(teacher) and student.shape[1] != teacher.shape[1]:
            self.adapter = nn.Linear(student.shape[1], teacher.shape[1], bias=False).to(student.device)

    def forward(self, *, student, teacher, **_):
        from ..errors import UserError

        direct = student if self.adapter is None else self.adapter(student)
        if direct.shape != teacher.shape:
            raise UserError(f"loss cosine: the student's embedding {_shape(student)} and the teacher's "
                            f"{_shape(teacher)} differ in shape; project with a feature term instead")
        d, t = F.normalize(direct.flatten(1), dim=-1), F.normalize(teacher.flatten(1), dim=-1)
        loss = (1 - (d * t).sum(-1)).mean()
        if self.relation:
            s = F.normalize(student.flatten(1), dim=-1)
            loss = loss + self.relation * (s @ s.T - t @ t.T).pow(2).mean()
        return loss


# ----------------------------------------------------------------------------------------------- TAID

class TAID(nn.Module):
    """Temporally adaptive interpolated distillation (Shing et al., 2025).

    Target p_t = softmax((1 - t) * stopgrad(z_s) + t * z_t); loss KL(p_t || softmax(z_s)), batch mean.
    t starts at t_start and rises to t_end: after each training call with loss J,
        delta = (J_prev - J) / J_prev;  m = beta * m + (1 - beta) * delta;  t += alpha * sigmoid(m) * (1 - t)
    and never below the linear schedule t_start + (t_end - t_start) * step / total_steps when
    total_steps is known (DistillModule sets it from the Trainer). t, m, J_prev and step are buffers, so
    they are saved in checkpoints and a resumed run continues the schedule.
    """

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99,
                 total_steps: int | None = None):
        super().__init__()
        if not 0 <= t_start <= t_end <= 1:
            raise ValueError("taid: need 0 <= t_start <= t_end <= 1")
        self.t_start, self.t_end, self.alpha, self.beta = float(t_start), float(t_end), float(alpha), float(beta)
        self.total_steps = total_steps
        self.register_buffer("t", torch.tensor(float(t_start)))
        self.register_buffer("m", torch.tensor(0.0))
        self.register_buffer("prev_loss", torch.tensor(float("nan")))
        self.register_buffer("step", torch.tensor(0))

    def forward(self, *, student: torch.Tensor, teacher: torch.Tensor, **_) -> torch.Tensor:
        t = self.t.to(student.dtype)
        log_p = F.log_softmax((1 - t) * student.detach() + t * teacher, dim=-1)
        loss = F.kl_div(F.log_softmax(student, dim=-1), log_p, reduction="batchmean", log_target=True)
        if self.training and torch.is_grad_enabled():
            self.update(loss.detach())
        return loss

    @torch.no_grad()
    def update(self, loss: torch.Tensor) -> None:
        """Advance t after a training step whose loss was ``loss``."""
        loss = loss.float()
        if not torch.isfinite(loss):
            return
        if torch.isfinite(self.prev_loss):
            delta = (self.prev_loss - loss) / self.prev_loss.abs().clamp_min(1e-12)
            self.m.mul_(self.beta).add_((1 - self.beta) * delta)
            t = self.t + self.alpha * torch.sigmoid(self.m) * (1 - self.t)
            if self.total_steps:
                floor = self.t_start + (self.t_end - self.t_start) * min(1.0, float(self.step + 1) / self.total_steps)
                t = torch.clamp(t, min=floor)
            self.t.copy_(t.clamp(max=self.t_end))
        self.prev_loss.copy_(loss)
        self.step += 1
