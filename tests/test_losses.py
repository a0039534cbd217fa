"""NT-Xent, MoCo-style memory loss and distillation loss against independent computations."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from simclrv2.losses import (
    contrastive_accuracy,
    distillation_loss,
    l2_normalize,
    moco_contrastive_loss,
    nt_xent,
    soft_targets,
)


# ----------------------------------------------------------------------------- references
def np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def np_logsumexp(v: np.ndarray) -> float:
    m = v.max()
    return float(m + np.log(np.exp(v - m).sum()))


def np_nt_xent(hidden: np.ndarray, temperature: float, normalize: bool) -> float:
    """Textbook SimCLR form: full 2B x 2B similarity, drop the diagonal, positive at i +- B.

    Summed over all 2B anchors and divided by B (= the official "sum of both directions").
    """
    z = np_normalize(hidden) if normalize else hidden
    n = z.shape[0]
    b = n // 2
    sim = z @ z.T / temperature
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        others = np.array([sim[i, k] for k in range(n) if k != i])
        total += -sim[i, pos] + np_logsumexp(others)
    return total / b


def np_moco(q1, q2, k1, k2, queue, temperature) -> float:
    """Per-anchor loop: positive is the other view's key, negatives every other key + queue."""
    q1, q2, k1, k2 = (np_normalize(t) for t in (q1, q2, k1, k2))
    b = q1.shape[0]
    total = 0.0
    for q, k_pos, k_same in ((q1, k2, k1), (q2, k1, k2)):
        for i in range(b):
            cands = [q[i] @ k_pos[j] for j in range(b)]
            cands += [q[i] @ k_same[j] for j in range(b) if j != i]
            cands += [q[i] @ queue[j] for j in range(queue.shape[0])]
            cands = np.array(cands) / temperature
            total += -(q[i] @ k_pos[i]) / temperature + np_logsumexp(cands)
    return total / b


def random_hidden(b: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h1 = rng.standard_normal((b, d))
    return np.concatenate([h1, h1 + rng.standard_normal((b, d))]) / math.sqrt(d)


# ----------------------------------------------------------------------------- nt_xent
def test_hand_case_identity_views():
    # z1 = z2 = I (B=2, D=2), tau=1: each row sees positive logit 1, one other ab logit 0,
    # one aa logit 0 (its self-similarity is masked). CE = log(e + 2) - 1 per direction.
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    expected = 2 * (math.log(math.e + 2) - 1)
    loss, logits_ab, labels = nt_xent(hidden, temperature=1.0, normalize=False)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(logits_ab, torch.eye(2))
    assert labels.tolist() == [0, 1]
    # normalisation removes any positive scale
    loss_scaled, _, _ = nt_xent(3.0 * hidden, temperature=1.0, normalize=True)
    assert loss_scaled.item() == pytest.approx(expected, rel=1e-6)


def test_hand_case_swapped_views():
    # z2 swaps the rows: positive logit 0, negative ab logit 1, negative aa logit 0,
    # CE = log(1 + e + 1) per direction; accuracy is 0.
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    loss, logits_ab, labels = nt_xent(hidden, temperature=1.0, normalize=False)
    assert loss.item() == pytest.approx(2 * math.log(math.e + 2), rel=1e-6)
    assert contrastive_accuracy(logits_ab, labels).item() == 0.0
    _, logits_ab, labels = nt_xent(hidden[[0, 1, 3, 2]], temperature=1.0, normalize=False)
    assert contrastive_accuracy(logits_ab, labels).item() == 1.0


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_random_vs_float64_numpy(normalize, temperature):
    h = random_hidden(6, 5, seed=int(temperature * 10) + normalize)
    loss, logits_ab, labels = nt_xent(torch.tensor(h, dtype=torch.float32), temperature, normalize)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(np_nt_xent(h, temperature, normalize), rel=1e-5)
    z = np_normalize(h) if normalize else h
    np.testing.assert_allclose(logits_ab.detach().numpy(), z[:6] @ z[6:].T / temperature,
                               atol=1e-5)
    assert labels.dtype == torch.long and labels.tolist() == list(range(6))


@pytest.mark.parametrize("name", ["nt_xent_B8_D16_norm1_T0.1", "nt_xent_B8_D16_norm1_T0.5",
                                  "nt_xent_B8_D16_norm0_T0.2"])
def test_official_fixture(reference_dir, name):
    ref = np.load(reference_dir / f"{name}.npz", allow_pickle=False)
    meta = json.loads(str(ref["__meta__"]))
    hidden = torch.tensor(ref["hidden"], requires_grad=True)
    loss, logits_ab, labels = nt_xent(hidden, meta["temperature"], meta["hidden_norm"])
    loss.backward()
    np.testing.assert_allclose(loss.item(), float(ref["loss"]), rtol=1e-5)
    np.testing.assert_allclose(logits_ab.detach().numpy(), ref["logits_con"], atol=1e-5)
    np.testing.assert_array_equal(labels.numpy(), ref["labels_con"].argmax(1))
    np.testing.assert_allclose(hidden.grad.numpy(), ref["grad_hidden"], atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(normalize):
    hidden = torch.tensor(random_hidden(3, 4, seed=7), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: nt_xent(h, 0.3, normalize)[0], (hidden,))


def test_float32_under_autocast_and_half_inputs():
    hidden = torch.tensor(random_hidden(4, 8, seed=3), dtype=torch.float32)
    ref, _, _ = nt_xent(hidden, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits_ab, _ = nt_xent(hidden, 0.1)
    assert loss.dtype == torch.float32 and logits_ab.dtype == torch.float32
    assert loss.item() == ref.item()
    loss_bf16, _, _ = nt_xent(hidden.bfloat16(), 0.1)
    assert loss_bf16.dtype == torch.float32
    expected = np_nt_xent(hidden.bfloat16().double().numpy(), 0.1, True)
    assert loss_bf16.item() == pytest.approx(expected, rel=1e-5)


def test_l2_normalize_matches_tf_semantics():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-7, 0.0]])
    out = l2_normalize(x)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.8]))
    assert out[1].tolist() == [0.0, 0.0]
    # sum of squares 1e-14 < eps=1e-12: divided by sqrt(1e-12) = 1e-6, not normalised to 1
    assert out[2, 0].item() == pytest.approx(0.1, rel=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), -1.0)
    with pytest.raises(ValueError, match="2B"):
        nt_xent(torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match="2B"):
        nt_xent(torch.randn(4), 0.1)


# ----------------------------------------------------------------------------- MoCo loss
def test_moco_vs_float64_numpy():
    rng = np.random.default_rng(11)
    b, d, k = 4, 6, 7
    q1, q2, k1, k2 = (rng.standard_normal((b, d)) for _ in range(4))
    queue = np_normalize(rng.standard_normal((k, d)))
    tq = [torch.tensor(t, dtype=torch.float32, requires_grad=True) for t in (q1, q2, k1, k2)]
    tqueue = torch.tensor(queue, dtype=torch.float32, requires_grad=True)
    loss, logits_ab, labels = moco_contrastive_loss(*tq, tqueue, temperature=0.2)
    assert loss.item() == pytest.approx(np_moco(q1, q2, k1, k2, queue, 0.2), rel=1e-5)
    np.testing.assert_allclose(logits_ab.detach().numpy(),
                               np_normalize(q1) @ np_normalize(k2).T / 0.2, atol=1e-5)
    assert labels.tolist() == list(range(b))
    loss.backward()
    assert tq[0].grad is not None and tq[1].grad is not None
    assert tq[2].grad is None and tq[3].grad is None and tqueue.grad is None


def test_moco_reduces_to_nt_xent_without_queue():
    h = torch.tensor(random_hidden(5, 4, seed=2), dtype=torch.float32)
    q1, q2 = h[:5], h[5:]
    expected, _, _ = nt_xent(h, 0.5)
    for queue in (None, torch.zeros(0, 4)):
        loss, _, _ = moco_contrastive_loss(q1, q2, q1, q2, queue, 0.5)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_moco_queue_adds_negatives():
    h = torch.tensor(random_hidden(3, 4, seed=4), dtype=torch.float32)
    q1, q2 = h[:3], h[3:]
    base, _, _ = moco_contrastive_loss(q1, q2, q1, q2, None, 0.5)
    with_queue, _, _ = moco_contrastive_loss(q1, q2, q1, q2, l2_normalize(torch.randn(8, 4)), 0.5)
    assert with_queue.item() > base.item()


def test_moco_bad_inputs():
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match="k2"):
        moco_contrastive_loss(q, q, q, torch.randn(2, 4), None, 0.1)
    with pytest.raises(ValueError, match="queue"):
        moco_contrastive_loss(q, q, q, q, torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        moco_contrastive_loss(q, q, q, q, None, 0.0)


# ----------------------------------------------------------------------------- distillation
def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_distill(student, teacher, tau):
    p_t = np_softmax(teacher / tau)
    log_p_s = np.log(np_softmax(student / tau))
    return float(-(p_t * log_p_s).sum(-1).mean())


def np_ce(student, labels):
    log_p = np.log(np_softmax(student))
    return float(-log_p[np.arange(len(labels)), labels].mean())


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_distillation_vs_float64(tau):
    rng = np.random.default_rng(5)
    s, t = rng.standard_normal((6, 10)) * 3, rng.standard_normal((6, 10)) * 3
    loss = distillation_loss(torch.tensor(s, dtype=torch.float32),
                             torch.tensor(t, dtype=torch.float32), tau)
    assert loss.item() == pytest.approx(np_distill(s, t, tau), rel=1e-5)
    loss_sq = distillation_loss(torch.tensor(s), torch.tensor(t), tau, temperature_squared=True)
    assert loss_sq.item() == pytest.approx(tau ** 2 * np_distill(s, t, tau), rel=1e-10)


def test_distillation_gradient_is_prob_difference():
    # d/ds of -sum p_T log softmax(s/tau), averaged over B: (softmax(s/tau) - p_T) / (tau B)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    tau = 2.0
    distillation_loss(s, t, tau).backward()
    expected = (torch.softmax(s.detach() / tau, -1) - torch.softmax(t.detach() / tau, -1)) / (tau * 4)
    torch.testing.assert_close(s.grad, expected)
    assert t.grad is None


def test_soft_targets_sum_to_one_and_flatten_with_tau():
    t = torch.tensor([[4.0, 1.0, 0.0, -2.0], [0.5, 0.3, 2.0, 1.0]])
    entropies = []
    for tau in (0.25, 1.0, 4.0, 16.0):
        p = soft_targets(t, tau)
        torch.testing.assert_close(p.sum(-1), torch.ones(2))
        entropies.append(-(p * p.log()).sum(-1))
    for lo, hi in zip(entropies, entropies[1:]):
        assert torch.all(hi > lo)
    assert torch.all(entropies[-1] < math.log(4)) and torch.all(entropies[-1] > 0.99 * math.log(4))


def test_distillation_alpha_mixing():
    rng = np.random.default_rng(8)
    s, t = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    tau, alpha = 2.0, 0.3
    loss = distillation_loss(torch.tensor(s), torch.tensor(t), tau,
                             labels=torch.tensor(labels), alpha=alpha)
    expected = (1 - alpha) * np_ce(s, labels) + alpha * np_distill(s, t, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    pure_ce = distillation_loss(torch.tensor(s), torch.tensor(t), tau,
                                labels=torch.tensor(labels), alpha=0.0)
    assert pure_ce.item() == pytest.approx(np_ce(s, labels), rel=1e-10)


def test_distillation_bad_inputs():
    s = torch.randn(3, 4)
    with pytest.raises(ValueError, match="labels are required"):
        distillation_loss(s, s, 1.0, labels=None, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(s, s, 1.0, labels=torch.zeros(3, dtype=torch.long), alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, s, 0.0)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        distillation_loss(s, torch.randn(3, 5), 1.0)
