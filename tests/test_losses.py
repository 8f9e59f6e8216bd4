"""Each loss against numbers computed by hand."""
import math

import pytest
import torch

from common.losses import cross_entropy, dml_loss, kl_divergence


def test_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([0, 1])
    # sample 1: -log(e^2 / (e^2 + 1)); sample 2: -log(1/2)
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.0]])
    log_p = [2 - math.log(math.exp(2) + 1), -math.log(math.exp(2) + 1)]
    # ε = 0.2 over 2 classes: target (0.9, 0.1)
    expected = -(0.9 * log_p[0] + 0.1 * log_p[1])
    assert cross_entropy(logits, torch.tensor([0]), 0.2).item() == pytest.approx(expected, rel=1e-6)


def test_soft_target_cross_entropy():
    logits = torch.tensor([[0.0, 0.0]])
    assert cross_entropy(logits, torch.tensor([[0.3, 0.7]])).item() == pytest.approx(math.log(2), rel=1e-6)


def test_kl_is_batchmean():
    target = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    logits = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    per_sample = [0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), 0.0]
    assert kl_divergence(target, logits).item() == pytest.approx(sum(per_sample) / 2, rel=1e-5)


def test_dml_loss_averages_the_peers():
    logits = torch.log(torch.tensor([[0.25, 0.75]]))
    peer_a = torch.log(torch.tensor([[0.5, 0.5]]))
    peer_b = torch.log(torch.tensor([[0.25, 0.75]]))  # identical to the student: KL 0
    ce, kl = dml_loss(logits, logits, [peer_a, peer_b], torch.tensor([1]))
    kl_a = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert ce.item() == pytest.approx(-math.log(0.75), rel=1e-6)
    assert kl.item() == pytest.approx(kl_a / 2, rel=1e-5)  # 1/(K-1) Σ, K = 3


def test_kl_goes_to_the_mimic_head_only():
    class_logits = torch.randn(4, 5, requires_grad=True)
    mimic_logits = torch.randn(4, 5, requires_grad=True)
    peer = torch.randn(4, 5, requires_grad=True)
    ce, kl = dml_loss(class_logits, mimic_logits, [peer], torch.tensor([0, 1, 2, 3]))
    kl.backward()
    assert class_logits.grad is None and mimic_logits.grad.abs().sum() > 0
    assert peer.grad is None  # the peer is a detached target


def test_no_gradient_into_the_peer():
    student = torch.nn.Linear(3, 4)
    peer = torch.nn.Linear(3, 4)
    x = torch.randn(8, 3)
    ce, kl = dml_loss(student(x), student(x), [peer(x)], torch.randint(0, 4, (8,)))
    (ce + kl).backward()
    assert all(p.grad is None for p in peer.parameters())
    assert all(p.grad.abs().sum() > 0 for p in student.parameters())


def test_soft_distillation_by_hand():
    from common.losses import soft_distillation_loss
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert soft_distillation_loss(student, teacher, 1.0).item() == pytest.approx(kl, rel=1e-5)
    # τ = 2: both distributions softened, then scaled by τ² = 4
    soft_s = torch.softmax(student / 2, -1)[0]
    soft_t = torch.softmax(teacher / 2, -1)[0]
    kl2 = sum(t * math.log(t / s) for t, s in zip(soft_t.tolist(), soft_s.tolist()))
    assert soft_distillation_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl2, rel=1e-5)


def test_hard_distillation_uses_the_teacher_decision():
    from common.losses import hard_distillation_loss
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 5.0], [0.0, 3.0, 1.0]])  # decisions: 2, 1
    expected = (math.log(math.exp(1) + 2) - 0.0 + math.log(math.exp(2) + 2) - 2.0) / 2
    assert hard_distillation_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_by_hand():
    from common.losses import kd_loss
    student = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    teacher = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    labels = torch.tensor([1, 0])
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    # τ = 1: KL(p_t ‖ p_s) summed over classes, averaged over the 2 samples (batchmean)
    kl = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.9 * math.log(0.9 / 0.5)
          + 0.1 * math.log(0.1 / 0.5)) / 2
    loss = lambda *weights: sum(kd_loss(student, teacher, labels, *weights).values()).item()
    assert loss(0.0, 1.0) == pytest.approx(ce, rel=1e-6)  # λ = 0: CE
    assert loss(1.0, 1.0) == pytest.approx(kl, rel=1e-5)
    terms = kd_loss(student, teacher, labels, 0.3, 1.0)
    assert terms["ce"].item() == pytest.approx(0.7 * ce, rel=1e-6)
    assert terms["kd"].item() == pytest.approx(0.3 * kl, rel=1e-5)
    # τ = 3: both softened, the KL term scaled by τ² = 9
    soft_s, soft_t = torch.softmax(student / 3, -1), torch.softmax(teacher / 3, -1)
    kl3 = (soft_t * (soft_t / soft_s).log()).sum(1).mean().item()
    assert loss(0.5, 3.0) == pytest.approx(0.5 * ce + 0.5 * 9 * kl3, rel=1e-5)
    assert kd_loss(student, teacher, labels, 0.5, 3.0)["kd"].item() == pytest.approx(0.5 * 9 * kl3, rel=1e-5)


def test_kd_loss_reaches_the_student_only():
    from common.losses import kd_loss
    student, teacher = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    x = torch.randn(8, 3)
    sum(kd_loss(student(x), teacher(x), torch.randint(0, 4, (8,)), 0.9, 4.0).values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad.abs().sum() > 0 for p in student.parameters())


# --- Knowledge Transfer Graph edges and gates ---


def test_prob_attract_and_repel_by_hand():
    from common.losses import prob_attract, prob_repel
    source = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    target = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    kl = [0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75),
          0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)]
    assert prob_attract(source, target).tolist() == pytest.approx(kl, rel=1e-5)  # eq. 1, KL(p_s ‖ p_t), per sample
    cosine = [(0.5 * 0.25 + 0.5 * 0.75) / (math.sqrt(0.5) * math.sqrt(0.25 ** 2 + 0.75 ** 2)),
              (0.9 * 0.5 + 0.1 * 0.5) / (math.sqrt(0.82) * math.sqrt(0.5))]
    assert prob_repel(source, target).tolist() == pytest.approx(cosine, rel=1e-5)  # eq. 2


def test_crop_windows_at_the_centre_and_clamped_at_each_border():
    from common.losses import crop_windows
    maps = torch.zeros(5, 16, 16)
    for i, (row, col) in enumerate([(8, 8), (0, 8), (15, 8), (8, 0), (8, 15)]):
        maps[i, row, col] = 1.0
    top, left = crop_windows(maps, 7)
    assert top.tolist() == [5, 0, 9, 5, 5]  # centred at row 8: rows 5..11; clamped to 0..6 and 9..15
    assert left.tolist() == [5, 5, 5, 0, 9]
    top, left = crop_windows(maps, 3)
    assert (top[0].item(), left[0].item()) == (7, 7)


def test_attention_losses_by_hand():
    from common.losses import att_attract, att_repel
    source = torch.zeros(1, 16, 16)
    source[0, 8, 8] = 1.0  # the peak: a 3×3 window at rows/cols 7..9
    target = torch.zeros(1, 16, 16)
    target[0, 7:10, 7:10] = 1.0  # uniform in the window
    target[0, 0, 0] = 5.0  # outside it: not seen
    # normalised crops: source e_centre, target all 1/3; squared error (1 - 1/3)² + 8·(1/3)² = 4/3 over
    # 9 pixels: a mean of 4/27; cosine 1/3
    assert att_attract(source, target, sizes=(3,)).item() == pytest.approx(4 / 27, rel=1e-5)
    assert att_repel(source, target, sizes=(3,)).item() == pytest.approx(1 / 3, rel=1e-5)
    # a 5×5 crop of the same maps: source e_centre, target 1/3 on the inner 3×3: 4/3 over 25 pixels;
    # averaged with the 3×3 crop's 4/27
    assert att_attract(source, target, sizes=(3, 5)).item() == pytest.approx((4 / 27 + 4 / 75) / 2, rel=1e-5)
    # averaged over sizes; the same maps give 0 and 1
    assert att_attract(source, source, sizes=(3, 7)).item() == pytest.approx(0.0, abs=1e-6)
    assert att_repel(target, target, sizes=(3, 7, 11)).item() == pytest.approx(1.0, rel=1e-5)


def test_edge_losses_reach_the_target_only():
    from common.graph import LOSSES
    from common.losses import edge_loss
    for kind in LOSSES:
        source = (torch.randn(4, 5, requires_grad=True), torch.rand(4, 16, 16, requires_grad=True))
        target = (torch.randn(4, 5, requires_grad=True), torch.rand(4, 16, 16, requires_grad=True))
        loss = edge_loss(kind, source, target)
        assert loss.shape == (4,)
        loss.sum().backward()
        assert all(t.grad is None for t in source), kind
        uses_prob, uses_att = not kind.startswith("att"), not kind.startswith("prob")
        assert (target[0].grad is not None) == uses_prob and (target[1].grad is not None) == uses_att, kind


def test_both_is_the_sum_of_prob_and_att():
    from common.losses import edge_loss
    source, target = (torch.randn(3, 4), torch.rand(3, 16, 16)), (torch.randn(3, 4), torch.rand(3, 16, 16))
    for direction in ("attract", "repel"):
        both = edge_loss(f"both_{direction}", source, target)
        parts = edge_loss(f"prob_{direction}", source, target) + edge_loss(f"att_{direction}", source, target)
        assert torch.allclose(both, parts)


def test_gates_by_hand():
    from common.losses import gate
    per_sample = torch.tensor([1.0, 2.0, 3.0, 6.0], requires_grad=True)
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert gate("through", per_sample, 5, 10, correct).item() == 3.0
    assert gate("linear", per_sample, 5, 10, correct).item() == pytest.approx(1.5)  # (k/K)·mean
    assert gate("linear", per_sample, 1, 10, correct).item() == pytest.approx(0.3)
    assert gate("linear", per_sample, 10, 10, correct).item() == pytest.approx(3.0)
    assert gate("correct", per_sample, 5, 10, correct).item() == pytest.approx((1 + 3) / 4)  # ÷ batch size
    cut = gate("cutoff", per_sample, 5, 10, correct)
    assert cut.item() == 0.0 and not cut.requires_grad  # no gradient at all
    gate("correct", per_sample, 5, 10, correct).backward()
    assert per_sample.grad.tolist() == [0.25, 0.0, 0.25, 0.0]  # only samples the source gets right


def test_label_loss_is_ce_on_both_branches():
    from common.losses import label_loss
    logits, attention_logits = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])
    labels = torch.tensor([0])
    assert label_loss(logits, None, labels).item() == pytest.approx(math.log(2))
    assert label_loss(logits, attention_logits, labels).item() == pytest.approx(math.log(2) - math.log(0.75))
