"""Losses as pure functions of logits. Every KL uses `batchmean`: summed over the
classes, averaged over the samples, which is the KL divergence of the equations
(PyTorch's default 'mean' also divides by the number of classes and silently
shrinks the term).

Used by dml.py (CE, dml_loss), deit.py (CE, soft and hard distillation), takd.py (CE,
kd_loss), ktg_ensemble.py (the edges' losses and gates) and bench.py.
"""
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
    smaller) and the teacher detached. λ = 0 is plain CE. Returns L's two terms by
    name, weighted, so that L is their sum: {"ce": (1-λ)·CE, "kd": λ·τ²·KL}.
    """
    ce = cross_entropy(student_logits, target)
    distill = soft_distillation_loss(student_logits, teacher_logits, tau)
    return {"ce": (1 - kd_lambda) * ce, "kd": kd_lambda * distill}


# --- Knowledge Transfer Graph edges (Minami et al. 2020; Okamoto et al., seed 002) ---
# Each loss returns one value per sample, so that a gate can weight or mask them.
# The source is always detached: an edge trains its target only (Fig. 1(c)).


def prob_attract(source_logits, target_logits):
    """Eq. 1: KL(p_s ‖ p_t) = Σ_c p_s^c log(p_s^c / p_t^c), per sample."""
    source = F.log_softmax(source_logits.detach().float(), dim=-1)
    target = F.log_softmax(target_logits.float(), dim=-1)
    return (source.exp() * (source - target)).sum(-1)


def prob_repel(source_logits, target_logits):
    """Eq. 2: the cosine similarity of p_s and p_t, per sample; minimised, it pushes them apart."""
    source = F.softmax(source_logits.detach().float(), dim=-1)
    return F.cosine_similarity(source, F.softmax(target_logits.float(), dim=-1), dim=-1)


def crop_windows(source_map, size):
    """Top-left corners (rows, cols) of the `size`×`size` windows centred on the
    argmax of each source map (B×H×W), shifted inside the map at its borders."""
    height, width = source_map.shape[-2:]
    peak = source_map.flatten(1).argmax(1)
    top = (peak // width - size // 2).clamp(0, height - size)
    left = (peak % width - size // 2).clamp(0, width - size)
    return top, left


def attention_crops(source_map, target_map, sizes):
    """For each crop size, the same window cut from both maps (source detached),
    flattened and L2-normalised: a list of (source B×s², target B×s²)."""
    source_map = source_map.detach().float()
    target_map = target_map.float()
    batch = torch.arange(len(source_map), device=source_map.device)[:, None, None]
    crops = []
    for size in sizes:
        size = min(size, *source_map.shape[-2:])
        top, left = crop_windows(source_map, size)
        offsets = torch.arange(size, device=source_map.device)
        rows, cols = (top[:, None] + offsets)[:, :, None], (left[:, None] + offsets)[:, None, :]
        crops.append(tuple(F.normalize(m[batch, rows, cols].flatten(1), dim=1) for m in (source_map, target_map)))
    return crops


def att_attract(source_map, target_map, sizes=(3, 7, 11)):
    """Eq. 3: the mean squared error of the L2-normalised crops (the mean over the
    crop's pixels, as the seed says: a sum would weigh an 11×11 crop 121× a pixel
    and tilt attention edges against probability edges), averaged over the crop
    sizes, per sample."""
    crops = attention_crops(source_map, target_map, sizes)
    return sum(((s - t) ** 2).mean(1) for s, t in crops) / len(crops)


def att_repel(source_map, target_map, sizes=(3, 7, 11)):
    """Eq. 4: the cosine similarity of the crops, averaged over the crop sizes, per sample."""
    crops = attention_crops(source_map, target_map, sizes)
    return sum((s * t).sum(1) for s, t in crops) / len(crops)


def edge_loss(kind, source, target, sizes=(3, 7, 11)):
    """The per-sample loss of one edge between network nodes; `source` and
    `target` are (logits, attention map) pairs. `both_*` adds the probability
    and attention terms (eq. 6: L_p + L_map)."""
    (source_logits, source_map), (target_logits, target_map) = source, target
    loss = 0
    if kind in ("prob_attract", "both_attract"):
        loss = loss + prob_attract(source_logits, target_logits)
    if kind in ("prob_repel", "both_repel"):
        loss = loss + prob_repel(source_logits, target_logits)
    if kind in ("att_attract", "both_attract"):
        loss = loss + att_attract(source_map, target_map, sizes)
    if kind in ("att_repel", "both_repel"):
        loss = loss + att_repel(source_map, target_map, sizes)
    return loss


def label_loss(logits, attention_logits, target):
    """The label edge: CE per sample; for an ABN, CE on both branches (its own training loss)."""
    loss = F.cross_entropy(logits.float(), target, reduction="none")
    if attention_logits is not None:
        loss = loss + F.cross_entropy(attention_logits.float(), target, reduction="none")
    return loss


def gate(kind, per_sample_loss, step, total_steps, source_correct):
    """Eq. 6's gate G: the edge's per-sample losses to one scalar.

    through: the batch mean; cutoff: 0, with no gradient (the edge is off);
    linear: (k/K)·mean, k the global step (from 1) of K; correct: the loss kept
    where the source predicts the true label, summed and divided by the batch size.
    """
    if kind == "through":
        return per_sample_loss.mean()
    if kind == "cutoff":
        return torch.zeros((), device=per_sample_loss.device)
    if kind == "linear":
        return step / total_steps * per_sample_loss.mean()
    if kind == "correct":
        return (per_sample_loss * source_correct).sum() / len(per_sample_loss)
    raise ValueError(f"unknown gate {kind!r}")
