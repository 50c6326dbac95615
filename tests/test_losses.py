"""toolkit.losses against numbers worked out in plain Python (math.exp / math.log), never by
the same torch code, plus the invariances each loss must have."""
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from toolkit.losses import (dist_loss, kd_loss, label_smoothing_ce, lskd_loss,
                            soft_cross_entropy, soften_probs)

# A 2x3 example written out once: student logits, teacher probabilities, labels.
S = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
P = [[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]]
Y = [2, 0]


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- plain-Python reference pieces ----------------------------------------------------
def py_softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def py_log_softmax(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def py_soften(p, T):
    w = [v ** (1.0 / T) for v in p]
    return [v / sum(w) for v in w]


def py_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def py_pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / den


def py_zscore(z):
    m, s = statistics.mean(z), statistics.stdev(z)  # stdev: Bessel-corrected, like torch.std
    return [(v - m) / s for v in z]


def close(a, b, tol=1e-5):
    a = a.item() if isinstance(a, torch.Tensor) else a
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---- soft CE and label smoothing -------------------------------------------------------
def test_soft_cross_entropy_by_hand():
    targets = [[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]]
    expected = -sum(sum(p * lq for p, lq in zip(tr, py_log_softmax(s)))
                    for tr, s in zip(targets, S)) / 2
    # also written out numerically for row 1 (one-hot on class 0): -log softmax(S[1])[0]
    assert close(-py_log_softmax(S[1])[0], math.log(math.exp(0.5) + math.exp(-1) + 1) - 0.5)
    assert close(soft_cross_entropy(t(S), t(targets)), expected)


def test_label_smoothing_by_hand_and_ignores_minus_one():
    eps = 0.1
    lq = py_log_softmax(S[0])
    # target (1 - eps) * onehot(2) + eps / 3; row 1 is unlabelled and ignored
    expected = -((1 - eps) * lq[2] + eps / 3 * sum(lq))
    assert close(label_smoothing_ce(t(S), torch.tensor([2, -1]), eps), expected)
    # smoothing 0: plain CE averaged over both labelled rows
    plain = -(py_log_softmax(S[0])[2] + py_log_softmax(S[1])[0]) / 2
    assert close(label_smoothing_ce(t(S), torch.tensor(Y), 0.0), plain)
    # no labelled row: 0, not NaN
    assert label_smoothing_ce(t(S), torch.tensor([-1, -1]), eps).item() == 0.0


# ---- KD --------------------------------------------------------------------------------
def test_soften_probs_by_hand():
    got = soften_probs(t(P), 2.0)
    for row_got, p in zip(got.tolist(), P):
        for g, e in zip(row_got, py_soften(p, 2.0)):
            assert close(g, e)
    # row 0 at T=2 written out: sqrt(p) / sum sqrt(p)
    z = math.sqrt(0.2) + math.sqrt(0.3) + math.sqrt(0.5)
    assert close(got[0, 0], math.sqrt(0.2) / z)


@pytest.mark.parametrize("T,alpha", [(1.0, 0.0), (2.0, 0.0), (2.0, 0.5), (4.0, 0.3)])
def test_kd_by_hand(T, alpha):
    kl = sum(py_kl(py_soften(p, T), py_softmax([v / T for v in s])) for p, s in zip(P, S)) / 2
    ce = -sum(py_log_softmax(s)[y] for s, y in zip(S, Y)) / 2
    out = kd_loss(t(S), t(P), torch.tensor(Y), T=T, alpha=alpha)
    assert close(out["kd"], T * T * kl)
    assert close(out["ce"], ce)
    assert close(out["loss"], alpha * ce + (1 - alpha) * T * T * kl)


def test_kd_alpha_one_equals_ce():
    s, y = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    p = torch.softmax(torch.randn(5, 4), 1)
    out = kd_loss(s, p, y, T=3.0, alpha=1.0)
    assert torch.allclose(out["loss"], F.cross_entropy(s, y))


@pytest.mark.parametrize("T", [1.0, 2.0, 4.5])
def test_kd_zero_when_student_matches_teacher(T):
    p = torch.softmax(torch.randn(6, 5) * 2, 1)
    student = torch.log(p) + torch.randn(6, 1)  # same distribution, arbitrary per-row shift
    assert abs(kd_loss(student, p, T=T)["loss"].item()) < 1e-5


def test_kd_labels_handling():
    # labels may be None at alpha == 0, not when alpha > 0
    assert torch.isfinite(kd_loss(t(S), t(P))["loss"])
    with pytest.raises(ValueError):
        kd_loss(t(S), t(P), None, alpha=0.5)
    # a -1 row is ignored by CE: CE is that of row 0 alone
    out = kd_loss(t(S), t(P), torch.tensor([2, -1]), T=2.0, alpha=0.5)
    assert close(out["ce"], -py_log_softmax(S[0])[2])
    # all rows unlabelled: CE is 0 (not NaN), the KD term is unaffected
    out = kd_loss(t(S), t(P), torch.tensor([-1, -1]), T=2.0, alpha=0.5)
    assert out["ce"].item() == 0.0 and torch.isfinite(out["loss"])


def test_kd_zero_teacher_probability_is_finite():
    p = t([[0.0, 0.4, 0.6], [1.0, 0.0, 0.0]])
    s = t(S).requires_grad_()
    out = kd_loss(s, p, T=2.0)
    expected = 4 * sum(py_kl(py_soften(pr, 2.0), py_softmax([v / 2 for v in sr]))
                       for pr, sr in zip(p.tolist(), S)) / 2
    assert close(out["loss"], expected)
    out["loss"].backward()
    assert torch.isfinite(s.grad).all()


# ---- DIST ------------------------------------------------------------------------------
@pytest.mark.parametrize("T,beta,gamma", [(1.0, 1.0, 1.0), (2.0, 1.0, 2.0), (4.0, 0.5, 1.0)])
def test_dist_by_hand(T, beta, gamma):
    ys = [py_softmax([v / T for v in s]) for s in S]
    yt = [py_soften(p, T) for p in P]
    inter = 1 - (py_pearson(ys[0], yt[0]) + py_pearson(ys[1], yt[1])) / 2
    cols = range(3)
    intra = 1 - sum(py_pearson([ys[0][j], ys[1][j]], [yt[0][j], yt[1][j]]) for j in cols) / 3
    out = dist_loss(t(S), t(P), T=T, beta=beta, gamma=gamma)
    assert close(out["inter"], inter)
    assert close(out["intra"], intra)
    assert close(out["loss"], T * T * (beta * inter + gamma * intra))


def test_dist_intra_by_hand_written_out():
    # with two samples every per-class column is a 2-vector: Pearson is +1 when student and
    # teacher order the two samples the same way, -1 otherwise.
    ys = [py_softmax(s) for s in S]
    signs = [1 if (ys[0][j] - ys[1][j]) * (P[0][j] - P[1][j]) > 0 else -1 for j in range(3)]
    assert close(dist_loss(t(S), t(P))["intra"], 1 - sum(signs) / 3)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_dist_with_hard_term_by_hand(alpha):
    """alpha * CE(y, s) + (1 - alpha) * DIST, CE written out from plain-Python log-softmax; at
    alpha 0.5 twice the loss is the paper's CE + inter + intra."""
    ce = -(py_log_softmax(S[0])[Y[0]] + py_log_softmax(S[1])[Y[1]]) / 2
    plain = dist_loss(t(S), t(P))
    out = dist_loss(t(S), t(P), labels=torch.tensor(Y), alpha=alpha)
    assert close(out["ce"], ce)
    assert close(out["loss"], alpha * ce + (1 - alpha) * plain["loss"].item())
    if alpha == 0.5:
        assert close(2 * out["loss"], ce + plain["inter"].item() + plain["intra"].item())


# A CutMix/mixup view's hard label is a distribution (B, C): CE = -(1/B) sum_i sum_c y_ic log s_ic.
MIXED = [[0.0, 0.3, 0.7], [1.0, 0.0, 0.0]]
MIXED_CE = -sum(sum(y * l for y, l in zip(MIXED[i], py_log_softmax(S[i]))) for i in range(2)) / 2


def test_dist_hard_term_takes_mixed_label_distributions():
    out = dist_loss(t(S), t(P), labels=t(MIXED), alpha=0.5)
    assert close(out["ce"], MIXED_CE)


def test_kd_hard_term_takes_mixed_label_distributions():
    out = kd_loss(t(S), t(P), t(MIXED), T=2.0, alpha=0.3)
    ce = MIXED_CE
    assert close(out["ce"], ce)
    assert close(out["loss"], 0.3 * ce + 0.7 * kd_loss(t(S), t(P), None, T=2.0)["kd"].item())


def test_dist_hard_term_refusals():
    with pytest.raises(ValueError, match="labels are required"):
        dist_loss(t(S), t(P), alpha=0.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        dist_loss(t(S), t(P), labels=torch.tensor(Y), alpha=1.5)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_dist_zero_when_student_equals_teacher(T):
    p = torch.softmax(torch.randn(8, 5) * 2, 1)
    out = dist_loss(torch.log(p), p, T=T)
    assert abs(out["loss"].item()) < 1e-5


# ---- LS-KD -----------------------------------------------------------------------------
TEACHER_LOGITS = [[2.0, 0.0, -1.0], [0.3, 0.1, 1.7]]


@pytest.mark.parametrize("T", [1.0, 2.0, 3.0])
def test_lskd_by_hand(T):
    kl = 0.0
    for s, z in zip(S, TEACHER_LOGITS):
        p = py_softmax([v / T for v in py_zscore(z)])
        q = py_softmax([v / T for v in py_zscore(s)])
        kl += py_kl(p, q) / 2
    out = lskd_loss(t(S), t(TEACHER_LOGITS), T=T)
    assert close(out["kl"], kl, tol=1e-4)
    assert close(out["loss"], T * T * kl, tol=1e-4)


def test_lskd_invariant_to_teacher_shift_and_scale():
    s, z = torch.randn(4, 6), torch.randn(4, 6) * 3
    base = lskd_loss(s, z, T=2.0)["loss"]
    shifted = lskd_loss(s, z + torch.randn(4, 1) * 10, T=2.0)["loss"]
    scaled = lskd_loss(s, z * 7.5, T=2.0)["loss"]
    log_probs = lskd_loss(s, torch.log_softmax(z, 1), T=2.0)["loss"]  # the ensemble's input form
    for other in (shifted, scaled, log_probs):
        assert torch.allclose(base, other, atol=1e-5)
    # the student side too: standardisation also removes its shift and scale
    assert torch.allclose(base, lskd_loss(3 * s - 2, z, T=2.0)["loss"], atol=1e-5)


def test_lskd_zero_when_same_up_to_affine_and_handles_log_zero():
    z = torch.randn(3, 5)
    assert abs(lskd_loss(2 * z + 1, z, T=2.0)["loss"].item()) < 1e-5
    log_p = torch.log(t([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]]))  # -inf from a zero probability
    assert torch.isfinite(lskd_loss(t(S), log_p)["loss"])


# ---- gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kd", "kd_ce", "dist", "dist_b1", "lskd", "soft_ce", "ls_ce"])
def test_gradients_flow_to_student_only(name):
    n = 1 if name == "dist_b1" else 4
    s = torch.randn(n, 5, requires_grad=True)
    teacher = torch.softmax(torch.randn(n, 5), 1).requires_grad_()
    labels = torch.arange(n) % 5
    loss = {
        "kd": lambda: kd_loss(s, teacher, T=2.0)["loss"],
        "kd_ce": lambda: kd_loss(s, teacher, labels, T=2.0, alpha=0.5)["loss"],
        "dist": lambda: dist_loss(s, teacher, T=2.0)["loss"],
        "dist_b1": lambda: dist_loss(s, teacher)["loss"],
        "lskd": lambda: lskd_loss(s, torch.log(teacher), T=2.0)["loss"],
        "soft_ce": lambda: soft_cross_entropy(s, teacher),
        "ls_ce": lambda: label_smoothing_ce(s, labels, 0.1),
    }[name]()
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert teacher.grad is None  # teachers are targets: detached


def test_kd_closed_form():
    # uniform student vs teacher (1/2, 1/2, 0): soft teacher stays (1/2, 1/2, 0) at any T,
    # so KL = 2 * 1/2 * log((1/2) / (1/3)) = log 1.5 and the loss is T^2 log 1.5.
    for T in (1.0, 2.0):
        out = kd_loss(torch.zeros(1, 3), t([[0.5, 0.5, 0.0]]), T=T)
        assert close(out["loss"], T * T * math.log(1.5))
