"""Two gloo ranks reproduce the single-process NT-Xent loss and gradients.

Each rank holds half of the batch. The per-rank losses are means over local examples and DDP
averages gradients, so the checks are: mean of the rank losses == single-process loss, and
(rank gradient) / world == the single-process gradient for that rank's rows.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from simclrv2 import distributed as D
from simclrv2.losses import moco_contrastive_loss, nt_xent

WORLD = 2
B_LOCAL = 3
DIM = 5
D_IN = 4
TEMPERATURE = 0.2


def _local_rows(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Rows of ``rank`` from a global two-view (2B, ...) tensor, kept in two-view layout."""
    b_global = x.shape[0] // 2
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    return torch.cat([x[:b_global][sl], x[b_global:][sl]])


def _worker(rank: int, tmpdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank,
                            world_size=WORLD)
    try:
        data = torch.load(os.path.join(tmpdir, "inputs.pt"))
        out = {"is_dist": D.is_dist(), "rank": D.rank(), "world": D.world_size()}

        local = _local_rows(data["hidden"], rank).requires_grad_(True)
        loss, logits_ab, labels = nt_xent(local, TEMPERATURE)
        loss.backward()
        out.update(loss=loss.detach(), logits_ab=logits_ab.detach(), labels=labels,
                   grad=local.grad)

        layer = nn.Linear(D_IN, DIM)
        layer.load_state_dict(data["layer"])
        ddp = nn.parallel.DistributedDataParallel(layer)
        ddp_loss, _, _ = nt_xent(ddp(_local_rows(data["x"], rank)), TEMPERATURE)
        ddp_loss.backward()
        out["ddp_weight_grad"] = layer.weight.grad.clone()

        q = _local_rows(data["q"], rank).requires_grad_(True)
        k = _local_rows(data["k"], rank)
        moco, _, moco_labels = moco_contrastive_loss(q[:B_LOCAL], q[B_LOCAL:], k[:B_LOCAL],
                                                     k[B_LOCAL:], data["queue"], TEMPERATURE)
        moco.backward()
        out.update(moco=moco.detach(), moco_grad=q.grad, moco_labels=moco_labels)

        n = 2 if rank == 0 else 4
        out["variable"] = D.all_gather_variable(torch.arange(2 * n).float().view(n, 2) + 100 * rank)
        out["mean"] = D.all_reduce_mean(torch.tensor([float(rank)]))
        torch.save(out, os.path.join(tmpdir, f"out{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    tmpdir = tmp_path_factory.mktemp("dist")
    gen = torch.Generator().manual_seed(123)
    b = WORLD * B_LOCAL
    data = {
        "hidden": torch.randn(2 * b, DIM, generator=gen),
        "x": torch.randn(2 * b, D_IN, generator=gen),
        "layer": nn.Linear(D_IN, DIM).state_dict(),
        "q": torch.randn(2 * b, DIM, generator=gen),
        "k": torch.randn(2 * b, DIM, generator=gen),
        "queue": nn.functional.normalize(torch.randn(7, DIM, generator=gen), dim=1),
    }
    torch.save(data, tmpdir / "inputs.pt")
    mp.spawn(_worker, args=(str(tmpdir),), nprocs=WORLD, join=True)
    outs = [torch.load(tmpdir / f"out{r}.pt") for r in range(WORLD)]
    return data, outs


def test_ranks_see_a_process_group(two_rank_run):
    _, outs = two_rank_run
    assert [(o["is_dist"], o["rank"], o["world"]) for o in outs] == [(True, 0, 2), (True, 1, 2)]


def test_nt_xent_matches_single_process(two_rank_run):
    data, outs = two_rank_run
    hidden = data["hidden"].clone().requires_grad_(True)
    loss, logits_ab, _ = nt_xent(hidden, TEMPERATURE)
    loss.backward()
    mean_loss = sum(o["loss"] for o in outs) / WORLD
    torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-6, atol=0)
    for r, o in enumerate(outs):
        # DDP divides the summed gradient by the world size
        torch.testing.assert_close(o["grad"] / WORLD, _local_rows(hidden.grad, r),
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(o["logits_ab"],
                                   logits_ab.detach()[r * B_LOCAL:(r + 1) * B_LOCAL])
        assert o["logits_ab"].shape == (B_LOCAL, WORLD * B_LOCAL)
        assert o["labels"].tolist() == [r * B_LOCAL + i for i in range(B_LOCAL)]


def test_ddp_parameter_gradient_matches_single_process(two_rank_run):
    data, outs = two_rank_run
    layer = nn.Linear(D_IN, DIM)
    layer.load_state_dict(data["layer"])
    loss, _, _ = nt_xent(layer(data["x"]), TEMPERATURE)
    loss.backward()
    for o in outs:  # two half-batch sums averaged vs one full sum: float32 rounding of ~1e-7 absolute
        torch.testing.assert_close(o["ddp_weight_grad"], layer.weight.grad, rtol=1e-5, atol=1e-6)


def test_moco_loss_matches_single_process(two_rank_run):
    data, outs = two_rank_run
    q = data["q"].clone().requires_grad_(True)
    b = WORLD * B_LOCAL
    loss, _, _ = moco_contrastive_loss(q[:b], q[b:], data["k"][:b], data["k"][b:],
                                       data["queue"], TEMPERATURE)
    loss.backward()
    torch.testing.assert_close(sum(o["moco"] for o in outs) / WORLD, loss.detach(),
                               rtol=1e-6, atol=0)
    for r, o in enumerate(outs):
        torch.testing.assert_close(o["moco_grad"] / WORLD, _local_rows(q.grad, r),
                                   rtol=1e-5, atol=1e-7)
        assert o["moco_labels"].tolist() == [r * B_LOCAL + i for i in range(B_LOCAL)]


def test_variable_gather_and_mean(two_rank_run):
    _, outs = two_rank_run
    expected = torch.cat([torch.arange(4).float().view(2, 2),
                          torch.arange(8).float().view(4, 2) + 100])
    for o in outs:
        assert o["variable"].shape == (6, 2)
        torch.testing.assert_close(o["variable"], expected)
        assert o["mean"].item() == 0.5


def test_single_process_helpers_are_identities():
    assert not D.is_dist() and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    x = torch.randn(3, 2, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    for fn in (D.all_gather_nograd, D.all_gather_variable, D.all_reduce_mean):
        y = fn(x)
        torch.testing.assert_close(y, x.detach())
        assert not y.requires_grad


def test_init_distributed_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_distributed() == (0, 0, 1)
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="torchrun"):
        D.init_distributed()
