"""The methods' losses, one home: MoCo v3's InfoNCE with keys gathered from every process, BYOL's 2 − 2·cos,
DINO's cross-entropy between the centred, sharpened teacher softmax and the student's, and the losses of the methods
without a teacher (SimCLR's NT-Xent, Barlow Twins', VICReg's), each over the batch of every process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from lightly.loss import NTXentLoss, VICRegLoss
from torch import Tensor

from sslfg.distributed import rank_and_world


@torch.no_grad()
def gather_keys(k: Tensor) -> Tensor:
    """Concatenates (B, D) from all processes in rank order, (W·B, D); no gradient."""
    _, world = rank_and_world()
    if world == 1:
        return k
    out = [torch.empty_like(k) for _ in range(world)]
    dist.all_gather(out, k.contiguous())
    return torch.cat(out)


def contrastive_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """ctr(q, k) of METHODS §1: cross-entropy of q·Kᵀ/T against the matching key, × 2T.

    q (B, D) carries the gradient; k (B, D) is a target. Row i of this process matches column
    i + B·rank of the gathered keys.
    The logits are float32 with autocast off here: under bf16 autocast `q @ keys.T` would run in bf16
    (8 bits of mantissa on similarities divided by T = 0.2).
    """
    rank, _ = rank_and_world()
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        keys = gather_keys(F.normalize(k.float(), dim=1))
        logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2 * temperature)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """2 − 2·cos(p, z), mean over the batch: ‖p̂ − ẑ‖² of the L2-normalised vectors (B, D) → ().

    Written here rather than with lightly's NegativeCosineSimilarity (−cos) to keep BYOL's form and to
    compute it in float32 with autocast off.
    """
    with torch.autocast(p.device.type, enabled=False):
        return 2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


def dino_cross_entropy(teacher: Tensor, student: Tensor, center: Tensor, teacher_temp: float,
                       student_temp: float) -> Tensor:
    """H(t, s) = −Σ_k softmax((t − c)/τ_t)_k · log softmax(s/τ_s)_k, mean over the batch (B, K) → ().

    Written here rather than with lightly's DINOLoss: its forward also moves the centre, which the local
    term (teacher on the masked view) must use without moving. float32 with autocast off: a softmax over
    65,536 prototypes at τ 0.04 in bf16 would lose the small probabilities.
    """
    with torch.autocast(student.device.type, enabled=False):
        target = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
        return -(target * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1).mean()


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent: for each of the 2N projections, −log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ) with s the cosine
    similarity and j its other view, the 2N others of every process as negatives, mean over the 2N (lightly's
    NTXentLoss, gathered with gradient). float32 with autocast off, as `contrastive_loss`."""
    with torch.autocast(z1.device.type, enabled=False):
        return NTXentLoss(temperature, gather_distributed=True)(z1.float(), z2.float())


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambda_param: float) -> Tensor:
    """Barlow Twins: Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij², with C = z1ᵀz2 / N the cross-correlation of embeddings
    (B, K) already batch-normalised over the batch of every process, summed over the processes (the original's
    all_reduce of C, here with gradient), N the global batch. Not lightly's BarlowTwinsLoss: it normalises over each
    process's batch, so that two processes would not equal one."""
    _, world = rank_and_world()
    with torch.autocast(z1.device.type, enabled=False):
        c = z1.float().T @ z2.float() / (z1.shape[0] * world)
        if world > 1:
            c = dist_fn.all_reduce(c)
        off_diagonal = ~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
        return (c.diagonal() - 1).pow(2).sum() + lambda_param * c[off_diagonal].pow(2).sum()


def vicreg_loss(z1: Tensor, z2: Tensor, sim_coeff: float, std_coeff: float, cov_coeff: float,
                eps: float) -> Tensor:
    """VICReg: λ·MSE(z1, z2) + μ·½(Σ hinge(1 − √(Var z + eps)) / K of each view) + ν·(Σ_{i≠j} Cov(z)_ij² / K of each
    view), the variance and covariance over the embeddings of every process (lightly's VICRegLoss, gathered with
    gradient as the original's FullGatherLayer). float32 with autocast off."""
    with torch.autocast(z1.device.type, enabled=False):
        loss = VICRegLoss(sim_coeff, std_coeff, cov_coeff, gather_distributed=True, eps=eps)
        return loss(z1.float(), z2.float())
