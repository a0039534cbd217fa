"""LARS against the official optimizer's recorded steps and against hand-computed steps."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from simclrv2.optim import LARS, lars_param_groups, supervised_head_l2


def test_official_fixture_three_steps(reference_dir):
    ref = np.load(reference_dir / "lars_wd1e-4_lr0.3.npz", allow_pickle=False)
    meta = json.loads(str(ref["__meta__"]))
    cfg = meta["optimizer_config"]
    names = list(meta["variables"])
    params, groups = [], []
    for name in names:
        flags = meta["variables"][name]
        p = nn.Parameter(torch.tensor(ref[f"{name}/init"]))
        params.append(p)
        groups.append({
            "params": [p],
            "weight_decay": cfg["weight_decay"] if flags["use_weight_decay (official _use_weight_decay)"] else 0.0,
            "lars_adaptation": flags["do_layer_adaptation (official _do_layer_adaptation)"],
        })
    assert not any(g["lars_adaptation"] for g, n in zip(groups, names) if "head_supervised" in n)
    opt = LARS(groups, lr=cfg["learning_rate"], momentum=cfg["momentum"], eta=cfg["eeta"])
    for k in (1, 2, 3):
        for name, p in zip(names, params):
            p.grad = torch.tensor(ref[f"{name}/grad_{k}"])
        opt.step()
        for name, p in zip(names, params):
            np.testing.assert_allclose(p.detach().numpy(), ref[f"{name}/value_{k}"], atol=1e-6,
                                       err_msg=f"{name} value after step {k}")
            np.testing.assert_allclose(opt.state[p]["momentum_buffer"].numpy(),
                                       ref[f"{name}/momentum_{k}"], atol=1e-6,
                                       err_msg=f"{name} momentum after step {k}")


def test_two_steps_by_hand():
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.001)
    # step 1: g' = g + 0.1 w = [0.9, 1.2] (norm 1.5); trust = 0.001 * 5 / 1.5 = 1/300
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    opt.step()
    v1 = [0.5 / 300 * 0.9, 0.5 / 300 * 1.2]  # [0.0015, 0.002]
    w1 = [3.0 - v1[0], 4.0 - v1[1]]          # [2.9985, 3.998]
    assert w.tolist() == pytest.approx(w1, abs=1e-12)
    assert opt.state[w]["momentum_buffer"].tolist() == pytest.approx(v1, abs=1e-12)
    # step 2 with the same raw gradient: v2 = 0.9 v1 + lr * trust2 * g2'
    w.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    opt.step()
    g2 = [0.6 + 0.1 * w1[0], 0.8 + 0.1 * w1[1]]
    trust2 = 0.001 * math.hypot(*w1) / math.hypot(*g2)
    v2 = [0.9 * v1[i] + 0.5 * trust2 * g2[i] for i in range(2)]
    assert w.tolist() == pytest.approx([w1[0] - v2[0], w1[1] - v2[1]], abs=1e-12)


def test_excluded_group_is_plain_momentum_sgd():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars_adaptation": False}],
               lr=0.1, momentum=0.9, weight_decay=0.5)
    for _ in range(2):
        w.grad = torch.tensor([1.0, 1.0])
        opt.step()
    # v1 = 0.1 g, v2 = 0.9 * 0.1 g + 0.1 g = 0.19 g; w = w0 - 0.1 - 0.19
    assert w.tolist() == pytest.approx([1.0 - 0.29, -2.0 - 0.29], abs=1e-6)


def test_zero_norms_give_trust_one():
    w = nn.Parameter(torch.zeros(3))
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.1)
    w.grad = torch.tensor([1.0, 2.0, -2.0])
    opt.step()  # ||w|| = 0 -> trust 1; decay adds 0.1 * 0
    assert w.tolist() == pytest.approx([-0.1, -0.2, 0.2], abs=1e-7)
    u = nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = LARS([u], lr=0.1, momentum=0.9)
    u.grad = torch.zeros(2)
    opt.step()  # ||g|| = 0 -> trust 1 and no movement (no NaN)
    assert u.tolist() == [1.0, 1.0]


def test_skips_params_without_grad_and_validates():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = LARS([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert b.tolist() == [1.0, 1.0] and b not in opt.state
    with pytest.raises(ValueError, match="lr"):
        LARS([a], lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        LARS([a], lr=0.1, momentum=1.0)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.proj_bn = nn.BatchNorm1d(4, affine=True)
        self.supervised_head = nn.Linear(4, 2)


def test_lars_param_groups_split():
    model = _Toy()
    model.proj_bn.bias.requires_grad_(False)
    groups = lars_param_groups(model, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    ids = {id(p): n for n, p in model.named_parameters()}
    decay = sorted(ids[id(p)] for p in by_name["decay_adapt"]["params"])
    excluded = sorted(ids[id(p)] for p in by_name["excluded"]["params"])
    assert decay == ["conv.weight", "proj.weight"]
    assert excluded == ["bn.bias", "bn.weight", "proj.bias", "proj_bn.weight",
                        "supervised_head.bias", "supervised_head.weight"]
    assert by_name["decay_adapt"]["weight_decay"] == 1e-4 and by_name["decay_adapt"]["lars_adaptation"]
    assert by_name["excluded"]["weight_decay"] == 0.0 and not by_name["excluded"]["lars_adaptation"]
    # prefixes match a dotted component path anywhere (e.g. under a wrapper)
    wrapper = nn.Module()
    wrapper.module = model
    wrapped = lars_param_groups(wrapper, 1e-4, exclude_prefixes=("module.supervised_head",))
    assert sum(len(g["params"]) for g in wrapped if not g["lars_adaptation"]) == 6


def test_supervised_head_l2():
    model = _Toy()
    with torch.no_grad():
        model.supervised_head.weight.copy_(torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]))
        model.supervised_head.bias.fill_(10.0)
    # wd * (1 + 4 + 9) / 2, bias ignored
    assert supervised_head_l2(model, 0.1).item() == pytest.approx(0.7)
    assert supervised_head_l2(nn.Linear(2, 2), 0.1).item() == 0.0


def test_exclude_by_name_matches_parameter_groups():
    """``LARS(model.named_parameters(), exclude=[...])`` equals the explicit two-group set-up."""
    torch.manual_seed(3)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    by_name = LARS(a.named_parameters(), lr=0.5, weight_decay=0.1, exclude=[r"^1\.", r"bias"])
    decayed = [b[0].weight, b[2].weight]
    excluded = [b[0].bias, b[1].weight, b[1].bias, b[2].bias]
    by_group = LARS([{"params": decayed}, {"params": excluded, "weight_decay": 0.0, "lars_adaptation": False}],
                    lr=0.5, weight_decay=0.1)
    x = torch.randn(8, 5)
    for model, opt in ((a, by_name), (b, by_group)):
        for _ in range(2):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    with pytest.raises(ValueError, match="named_parameters"):
        LARS(a.parameters(), lr=0.1, exclude=["bias"])
