"""Losses as pure functions of logits. Every KL uses `batchmean`: summed over the
classes, averaged over the samples, which is the KL divergence of the equations
(PyTorch's default 'mean' also divides by the number of classes and silently
shrinks the term)."""
import torch
import torch.nn.functional as F


def cross_entropy(logits, target, label_smoothing=0.0):
    """CE with the true label; `target` is class indices or soft targets (Mixup).

    label_smoothing ε puts ε/C on every class and 1-ε on top (Szegedy et al. 2016).
    """
    logits = logits.float()  # bf16 logits lose too much in log-softmax
    if target.dtype.is_floating_point:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def kl_divergence(target_logits, logits):
    """KL(p_target ‖ p) with p = softmax(logits), `batchmean`. The target is detached:
    it is a fixed distribution, and no gradient flows into the model that made it."""
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), F.log_softmax(target_logits.detach().float(), dim=-1),
                    reduction="batchmean", log_target=True)


def dml_loss(class_logits, mimic_logits, peer_logits, target, label_smoothing=0.0):
    """Deep Mutual Learning (Zhang et al. 2018; seed 000 eq. 1-2) for student k of K:

        L_k = CE(p_k, y) + 1/(K-1) · Σ_{j≠k} KL(p_j ‖ p_k)

    `class_logits` get the CE, `mimic_logits` the KL (the same tensor for a ViT;
    a DeiT's distillation head), `peer_logits` are the K-1 peers' predictions,
    detached. Returns (ce, kl) so both can be logged; the loss is their sum.
    """
    ce = cross_entropy(class_logits, target, label_smoothing)
    kl = sum(kl_divergence(peer, mimic_logits) for peer in peer_logits) / len(peer_logits)
    return ce, kl


def soft_distillation_loss(student_logits, teacher_logits, tau):
    """DeiT's soft distillation term (Hinton et al. 2015): τ²·KL(ψ(Z_t/τ) ‖ ψ(Z_s/τ)),
    `batchmean` (DeiT's code divides by the number of elements instead: a factor
    of the class count smaller). τ² keeps the gradient scale independent of τ."""
    return tau ** 2 * kl_divergence(teacher_logits / tau, student_logits / tau)


def hard_distillation_loss(student_logits, teacher_logits):
    """DeiT's hard-label distillation: CE(ψ(Z_s), y_t) with y_t = argmax Z_t, the
    teacher's decision on the same (augmented) image."""
    return cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


def kd_loss(student_logits, teacher_logits, target, kd_lambda, tau):
    """Knowledge distillation as in TAKD (Mirzadeh et al. 2020; Hinton et al. 2015):

        L = (1-λ)·CE(ψ(Z_s), y) + λ·τ²·KL(ψ(Z_t/τ) ‖ ψ(Z_s/τ))

    with the KL `batchmean` (TAKD's code uses 'mean', a factor of the class count
    smaller) and the teacher detached. λ = 0 is plain CE.
    """
    ce = cross_entropy(student_logits, target)
    return (1 - kd_lambda) * ce + kd_lambda * soft_distillation_loss(student_logits, teacher_logits, tau)
