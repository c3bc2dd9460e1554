"""Golden values for every loss term: each expected number is computed here in numpy from the paper's
formula (float64), independently of compressor.distill.losses, on small fixed tensors."""
import math

import numpy as np
import pytest
import torch

from compressor.distill import LOSSES, build_loss
from compressor.errors import UserError

rng = np.random.default_rng(0)
S_LOGITS = rng.normal(size=(3, 4))
T_LOGITS = rng.normal(size=(3, 4)) * 2
TARGET = np.array([0, 3, 1])


def tt(a):
    return torch.tensor(a, dtype=torch.float32)


def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def close(got, want, rtol=1e-4, atol=1e-6):
    got = got.detach() if isinstance(got, torch.Tensor) else got
    assert float(got) == pytest.approx(float(want), rel=rtol, abs=atol)


def test_registry_names():
    assert {"kd", "ce", "feature", "feature_norm", "attention_transfer", "rkd", "similarity_preserving",
            "minilm", "taid", "ickd", "cosine"} <= set(LOSSES)


def test_kd_and_ce():
    T = 4.0
    p_t, p_s = softmax(T_LOGITS / T), softmax(S_LOGITS / T)
    want = (p_t * (np.log(p_t) - np.log(p_s))).sum(1).mean() * T * T
    close(build_loss("kd", temperature=T)(student=tt(S_LOGITS), teacher=tt(T_LOGITS)), want)
    ce = -np.log(softmax(S_LOGITS)[np.arange(3), TARGET]).mean()
    close(build_loss("ce")(student=tt(S_LOGITS), target=torch.tensor(TARGET)), ce)


def feats(s, t, sp="a", tp="b"):
    return {"student_features": {sp: tt(s)}, "teacher_features": {tp: tt(t)}}


def test_cosine_for_embeddings():
    # rows: identical (cos 1), orthogonal (cos 0) -> 1 - cos = [0, 1], mean 0.5
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    assert build_loss("cosine")(student=s, teacher=t).item() == pytest.approx(0.5)
    # relation: student Gram (normalised) I, teacher's all ones -> off-diagonals differ by 1: mean 2/4
    assert build_loss("cosine", relation=1.0)(student=s, teacher=t).item() == pytest.approx(0.5 + 0.5)
    with pytest.raises(Exception, match="differ in shape"):
        build_loss("cosine")(student=torch.zeros(2, 3), teacher=torch.zeros(2, 4))


def test_feature_fitnets_uses_its_projection():
    s = rng.normal(size=(2, 3, 4, 4))
    t = rng.normal(size=(2, 5, 2, 2))
    term = build_loss("feature", pairs=[["a", "b"]])
    got = term(**feats(s, t))
    w = term.adapters[0].weight.detach().double().numpy()[:, :, 0, 0]  # 5 x 3 learned 1x1 conv
    pooled = s.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))  # 4x4 -> 2x2 average pooling
    proj = np.einsum("oc,nchw->nohw", w, pooled)
    close(got, ((proj - t) ** 2).mean())
    assert term.adapters[0].weight.requires_grad


def test_feature_interpolates_a_smaller_student_map():
    s = rng.normal(size=(1, 2, 1, 1))
    t = rng.normal(size=(1, 2, 3, 3))
    term = build_loss("feature", pairs=["x"])
    got = term(student_features={"x": tt(s)}, teacher_features={"x": tt(t)})
    w = term.adapters[0].weight.detach().double().numpy()[:, :, 0, 0]
    up = np.broadcast_to(s, (1, 2, 3, 3))  # bilinear upsampling of a 1x1 map is constant
    close(got, ((np.einsum("oc,nchw->nohw", w, up) - t) ** 2).mean())


def test_feature_norm_laptop_diff():
    s1, t1 = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 3, 2, 2))
    s2, t2 = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    term = build_loss("feature_norm", pairs=[["a", "b"], ["c", "d"]])
    got = term(student_features={"a": tt(s1), "c": tt(s2)}, teacher_features={"b": tt(t1), "d": tt(t2)})
    want = 0.0
    for s, t in ((s1, t1), (s2, t2)):
        per_sample = [np.sum((t[i] - s[i]) ** 2) / np.sum(t[i] ** 2) for i in range(2)]
        want += np.mean(per_sample)
    close(got, want)
    assert all(isinstance(a, torch.nn.Identity) for a in term.adapters)  # equal widths: no projection


def test_attention_transfer():
    s = rng.normal(size=(2, 3, 2, 2))
    t = rng.normal(size=(2, 5, 2, 2))  # channel counts may differ
    got = build_loss("attention_transfer", pairs=[["a", "b"]])(**feats(s, t))

    def q(a):
        m = (a ** 2).mean(1).reshape(2, -1)
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    close(got, ((q(s) - q(t)) ** 2).mean())


def huber(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()


def test_rkd_distance_and_angle():
    s, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 5))
    got = build_loss("rkd", distance_weight=25, angle_weight=50)(student=tt(s), teacher=tt(t))

    def dist(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(4)] for i in range(4)])
        return d / d[~np.eye(4, dtype=bool)].mean()

    def ang(e):
        a = np.zeros((4, 4, 4))
        for i in range(4):
            for j in range(4):
                for k in range(4):
                    if i != j and k != j:
                        u, v = e[i] - e[j], e[k] - e[j]
                        a[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return a

    close(got, 25 * huber(dist(s), dist(t)) + 50 * huber(ang(s), ang(t)))


def test_rkd_gradient_is_finite():
    s = torch.randn(5, 3, requires_grad=True)
    build_loss("rkd")(student=s, teacher=torch.randn(5, 3)).backward()
    assert torch.isfinite(s.grad).all()


def test_similarity_preserving():
    s, t = rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(3, 7))
    got = build_loss("similarity_preserving")(student=tt(s.reshape(3, -1)), teacher=tt(t))

    def g(a):
        a = a.reshape(3, -1)
        m = a @ a.T
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    close(got, np.sum((g(s) - g(t)) ** 2) / 9)


def test_ickd_inter_channel_correlation():
    s, t = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 3, 2, 2))
    got = build_loss("ickd", pairs=[["a", "b"]])(**feats(s, t))

    def n(a):
        f = a.reshape(3, 4)
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    close(got, sum(np.sum((n(s[i]) - n(t[i])) ** 2) for i in range(2)) / (2 * 3))


def test_minilm_attention_and_value_relation():
    n, l, heads = 2, 3, 2
    sq, sk, sv = (rng.normal(size=(n, l, 4)) for _ in range(3))   # student: 2 heads of width 2
    tq, tk, tv = (rng.normal(size=(n, l, 6)) for _ in range(3))   # teacher: 2 heads of width 3
    term = build_loss("minilm", pairs=[["s", "t"]], heads=heads)
    got = term(student_features={"s.query": tt(sq), "s.key": tt(sk), "s.value": tt(sv)},
               teacher_features={"t.query": tt(tq), "t.key": tt(tk), "t.value": tt(tv)})

    def rel(a, b):  # per head softmax(a b^T / sqrt(dh))
        dh = a.shape[-1] // heads
        out = np.zeros((n, heads, l, l))
        for h in range(heads):
            ah, bh = a[..., h * dh:(h + 1) * dh], b[..., h * dh:(h + 1) * dh]
            out[:, h] = softmax(np.einsum("nid,njd->nij", ah, bh) / math.sqrt(dh))
        return out

    def kl(p, q):
        return (p * (np.log(p) - np.log(q))).sum(-1).mean()

    close(got, kl(rel(tq, tk), rel(sq, sk)) + kl(rel(tv, tv), rel(sv, sv)))
    assert term.student_paths == ["s.query", "s.key", "s.value"]


def test_minilm_mask_drops_padding():
    x = rng.normal(size=(1, 3, 4))
    pad = x.copy()
    pad[:, 2] = rng.normal(size=4) * 10  # the padded token differs wildly between the two
    term = build_loss("minilm", pairs=["a"], heads=1)
    f = lambda a: {f"a.{k}": tt(a) for k in ("query", "key", "value")}  # noqa: E731
    mask = torch.tensor([[1, 1, 0]])
    assert float(term(student_features=f(x), teacher_features=f(pad), attention_mask=mask)) == pytest.approx(0, abs=1e-6)
    assert float(term(student_features=f(x), teacher_features=f(pad))) > 1e-3


def test_taid_loss_and_schedule():
    term = build_loss("taid", t_start=0.4, alpha=5e-4, beta=0.99)
    s = torch.tensor(S_LOGITS, dtype=torch.float32, requires_grad=True)
    t = 0.4
    p = softmax((1 - t) * S_LOGITS + t * T_LOGITS)
    want = (p * (np.log(p) - np.log(softmax(S_LOGITS)))).sum(1).mean()
    got = term(student=s, teacher=tt(T_LOGITS))
    close(got, want)
    got.backward()  # the target is stop-gradient: d/dz_s of KL(p || softmax(z_s)) = (softmax(z_s) - p) / B
    np.testing.assert_allclose(s.grad.numpy(), (softmax(S_LOGITS) - p) / 3, rtol=1e-4, atol=1e-6)

    # The adaptive schedule by its formulas, fed losses by hand.
    term = build_loss("taid", t_start=0.4, alpha=0.1, beta=0.9)
    losses = [2.0, 1.5, 1.2, 1.3]
    t, m, prev = 0.4, 0.0, None
    for j in losses:
        term.update(torch.tensor(j))
        if prev is not None:
            m = 0.9 * m + 0.1 * (prev - j) / prev
            t = t + 0.1 * (1 / (1 + math.exp(-m))) * (1 - t)
        prev = j
        close(term.t, t)
    assert int(term.step) == 4 and "t" in term.state_dict()

    # Never below the linear schedule when the run's length is known.
    term = build_loss("taid", t_start=0.4, alpha=1e-6, total_steps=10)
    for j in (1.0, 1.0, 1.0):
        term.update(torch.tensor(j))
    close(term.t, 0.4 + 0.6 * 3 / 10)


def test_taid_only_moves_in_training():
    term = build_loss("taid")
    term.eval()
    for _ in range(3):
        term(student=tt(S_LOGITS), teacher=tt(T_LOGITS))
    assert int(term.step) == 0


def test_bad_pairs_and_params():
    with pytest.raises(ValueError, match="needs pairs"):
        build_loss("feature")
    with pytest.raises(ValueError, match="each pair"):
        build_loss("feature_norm", pairs=[["a", "b", "c"]])
    with pytest.raises(ValueError, match="takes no parameter"):
        build_loss("rkd", distance_wieght=1)


def test_bad_pairs_are_a_recipe_error_with_its_path(tiny_recipe):
    from compressor.recipe import load_recipe

    tiny_recipe["distill"]["losses"] = [{"name": "feature", "pairs": [["stages.0"]]}]
    with pytest.raises(UserError, match=r"distill\.losses\.0.*each pair is \[student module path"):
        load_recipe(tiny_recipe)


def test_unadaptable_shapes_name_the_pair():
    term = build_loss("feature", pairs=[["stages.0", "head"]])
    with pytest.raises(UserError, match="stages.0 -> head.*cannot be adapted"):
        term(student_features={"stages.0": torch.zeros(2, 3, 4, 4)}, teacher_features={"head": torch.zeros(2, 10)})
    term = build_loss("feature", pairs=["layer"])
    with pytest.raises(UserError, match="token counts"):
        term(student_features={"layer": torch.zeros(2, 5, 4)}, teacher_features={"layer": torch.zeros(2, 6, 4)})
