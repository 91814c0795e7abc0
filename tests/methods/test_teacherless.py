"""The methods without a teacher (METHODS §6): SimCLR, Barlow Twins and VICReg against their papers' formulas
written out here, their local branch from the encoder's own attention without gradient, and two gloo processes
giving the loss and gradients of one process on the concatenated batch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from sslfg.config import ConfigError
from sslfg.methods import METHODS, SiameseMethod
from sslfg.methods.local import keep_indices
from sslfg.models.backbone import forward_tokens
from sslfg.pretrain import check_compile
from sslfg.schema import PretrainConfig
from tests.conftest import tiny_method
from tests.methods.references import explicit_cls_attention, reference_drop_tokens_cls, reference_zero_fill

TEACHERLESS = [name for name, cls in METHODS.items() if issubclass(cls, SiameseMethod)]


def nt_xent(z1: Tensor, z2: Tensor, t: float) -> Tensor:
    """SimCLR eq. 1 over the 2N samples: ℓ(i, j) = −log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ), s the cosine similarity, j
    the other view of i; the mean of ℓ over all 2N, with plain loops."""
    z = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    n = len(z) // 2
    total = 0.0
    for i in range(2 * n):
        s = [float(z[i] @ z[k]) / t for k in range(2 * n)]
        total -= s[(i + n) % (2 * n)] - math.log(sum(math.exp(s[k]) for k in range(2 * n) if k != i))
    return torch.tensor(total / (2 * n), dtype=torch.float64)


def barlow_twins(z1: Tensor, z2: Tensor, lam: float) -> Tensor:
    """Barlow Twins eq. 1–2: C_ij = Σ_b za_bi·zb_bj / √(Σ_b za_bi²)·√(Σ_b zb_bj²) of the embeddings standardised
    over the batch (BatchNorm1d: mean 0, biased variance, eps 1e-5); Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij²."""
    za, zb = ((z - z.mean(0)) / (z.var(0, unbiased=False) + 1e-5).sqrt() for z in (z1.double(), z2.double()))
    c = za.T @ zb / za.shape[0]
    d = c.shape[0]
    return sum((1 - c[i, i]) ** 2 for i in range(d)) + lam * sum(c[i, j] ** 2 for i in range(d) for j in range(d)
                                                                   if j != i)


def vicreg(z1: Tensor, z2: Tensor, lam: float = 25.0, mu: float = 25.0, nu: float = 1.0,
           eps: float = 1e-4) -> Tensor:
    """VICReg eq. 1–6: s = mean ‖z1 − z2‖² / d (MSE); v(Z) = 1/d Σ_j max(0, 1 − √(Var(z_j) + ε)) with the unbiased
    variance; c(Z) = 1/d Σ_{i≠j} C(Z)_ij², C(Z) = 1/(n−1) Σ (z − z̄)(z − z̄)ᵀ; ℓ = λ s + μ [v(Z)+v(Z')]/2 + ν
    [c(Z)+c(Z')] (the code's std_loss halves the variance terms)."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    s = ((z1 - z2) ** 2).sum() / (n * d)

    def v(z: Tensor) -> Tensor:
        return sum(max(0.0, 1 - math.sqrt(float(z[:, j].var()) + eps)) for j in range(d)) / d

    def c(z: Tensor) -> Tensor:
        zc = z - z.mean(0)
        cov = zc.T @ zc / (n - 1)
        return sum(cov[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    return lam * s + mu * (v(z1) + v(z2)) / 2 + nu * (c(z1) + c(z2))


FORMULAS = {"simclr": lambda z1, z2: nt_xent(z1, z2, 0.1), "barlowtwins": lambda z1, z2: barlow_twins(z1, z2, 5e-3),
            "vicreg": vicreg}


def projections(model: SiameseMethod, *views: Tensor) -> list[Tensor]:
    """The projector's output of each view, each on its own (the method passes both views through the encoder at
    once; a ViT computes each image alone)."""
    return [model.projector(forward_tokens(model.encoder, x)[:, 0]) for x in views]


def test_the_registry_holds_the_three_methods_without_a_teacher() -> None:
    assert TEACHERLESS == ["simclr", "barlowtwins", "vicreg"]


@pytest.mark.parametrize("name", TEACHERLESS)
def test_loss_is_the_papers_formula(name: str) -> None:
    model = tiny_method(name, **{"method.local.weight": 0.0})
    x1, x2 = torch.randn(2, 6, 3, 16, 16)
    out = model(x1, x2)
    with torch.no_grad():
        z1, z2 = projections(model, x1, x2)
    torch.testing.assert_close(out["loss"].double(), FORMULAS[name](z1, z2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.view_loss(z1, z2).double(), FORMULAS[name](z1, z2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TEACHERLESS)
@pytest.mark.parametrize("view", ["zero_fill", "drop_tokens"])
def test_local_branch_ranks_by_the_encoders_own_attention_without_gradient(name: str, view: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept patches are the top ⌊0.3·16⌋ of the encoder's own attention (the reference's explicit maps, the same
    forward pass), the maps carry no gradient, the masked views go through the encoder and projector with gradient:
    loss_local = ½(ℓ(z1, m2) + ℓ(z2, m1)), loss = global + λ·local."""
    model = tiny_method(name, **{"method.local.weight": 0.7, "method.local.view": view})
    x1, x2 = torch.randn(2, 4, 3, 16, 16)
    seen: list[list[Tensor]] = []
    keep = type(model.local).keep
    monkeypatch.setattr(type(model.local), "keep", lambda self, maps: (seen.append(maps), keep(self, maps))[1])
    out = model(x1, x2)
    assert len(seen) == 1 and all(m.grad_fn is None and not m.requires_grad for m in seen[0])
    x = torch.cat([x1, x2])
    with torch.no_grad():
        kept = keep_indices(explicit_cls_attention(model.encoder, x), 0.30)
        assert torch.equal(model.local.keep(seen[0]), kept) and torch.equal(model.kept_patches(x), kept)
        z1, z2 = projections(model, x1, x2)
        kept_lists = kept.tolist()
        cls = (forward_tokens(model.encoder, reference_zero_fill(x, kept_lists, 4))[:, 0] if view == "zero_fill"
               else reference_drop_tokens_cls(model.encoder, x, kept_lists))
        m = [model.projector(c) for c in cls.chunk(2)]
    f = FORMULAS[name]
    local = (f(z1, m[1]) + f(z2, m[0])) / 2
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss_local"].double(), local, **tol)
    torch.testing.assert_close(out["loss"].double(), f(z1, z2) + 0.7 * local, **tol)
    out["loss_local"].backward()  # the masked views train the encoder and the projector
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", TEACHERLESS)
def test_a_teacher_half_life_is_refused_naming_the_key(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"method.teacher_half_life: {name} has no teacher .* got 5; remove the "
                                          r"key \(or set it to 0\), or use a method with a teacher"):
        tiny_method(name, **{"method.teacher_half_life": 5.0})


@pytest.mark.parametrize("local, loc_every, figures, refused", [
    (1.0, 0, False, "method.local.weight"), (0.0, 1, False, "train.loc_every"), (0.0, 0, True, "train.figure_samples"),
    (0.0, 0, False, None)])
def test_compiling_the_encoder_whose_attention_ranks_patches_is_refused(local: float, loc_every: int, figures: bool,
                                                                        refused: str | None) -> None:
    cfg = PretrainConfig()
    cfg.method.name, cfg.method.local.weight, cfg.train.loc_every, cfg.train.compile = "vicreg", local, loc_every, True
    model = tiny_method("vicreg", **{"method.local.weight": local})
    if refused is None:
        check_compile(cfg, model, figures)
    else:
        with pytest.raises(ConfigError, match=rf"train.compile: vicreg ranks patches by its own encoder's attention "
                                              rf"\({refused}\).*set train.compile=false, or set {refused}=0"):
            check_compile(cfg, model, figures)
    check_compile(cfg, tiny_method("byol", **{"method.local.weight": 1.0}), True)  # the teacher is not compiled


CASES = [(name, local) for name in TEACHERLESS for local in (0.0, 1.0)]


def losses_and_gradients(views: Tensor) -> dict[str, dict[str, list]]:
    """Per case: this process's loss and its gradients averaged over the processes, as DDP averages them."""
    _, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out = {}
    for name, local in CASES:
        model = tiny_method(name, **{"method.local.weight": local})
        loss = model(*views)["loss"]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        if world > 1:
            dist.all_reduce(grads)
            grads /= world
            dist.all_reduce(loss := loss.detach().clone())
            loss /= world
        out[f"{name}-{local}"] = {"loss": loss.item(), "grads": grads.tolist()}
    return out


def worker(rank: int, root: str, views: Tensor) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    half = views.shape[1] // 2
    result = losses_and_gradients(views[:, rank * half : (rank + 1) * half])
    if rank == 0:
        Path(root, "two.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow  # about a minute: two spawned processes build six models; test_distributed runs them end to end
def test_two_gloo_processes_give_the_loss_and_gradients_of_one_on_the_concatenated_batch(tmp_path: Path) -> None:
    """Barlow Twins (C and its batch norm over the global batch), VICReg (variance and covariance over the gathered
    embeddings), SimCLR (negatives of every process), each with and without the local branch: batch 4 on each of two
    gloo processes equals batch 8 on one, loss (mean over the processes) and DDP-averaged gradients (to float32
    rounding: the difference within 1e-4 of the gradient's norm; without gathering, SimCLR's is 0.5 of it)."""
    views = torch.randn(2, 8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mp.spawn(worker, args=(str(tmp_path), views), nprocs=2)
    two = json.loads((tmp_path / "two.json").read_text())
    one = losses_and_gradients(views)
    for case, expected in one.items():
        assert two[case]["loss"] == pytest.approx(expected["loss"], rel=1e-5), case
        grads, reference = torch.tensor(two[case]["grads"]), torch.tensor(expected["grads"])
        assert (grads - reference).norm() <= 1e-4 * reference.norm(), case  # float32 sums in another order
