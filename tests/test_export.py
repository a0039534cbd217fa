"""Export to torchvision, safetensors and ONNX (``simclrv2.export``) and the ``export`` command.

The torchvision round trip checks equality with torchvision's own ResNet once its max-pool is the
TF ``SAME`` one, and measures the documented difference of the stock ``MaxPool2d(3, 2, padding=1)``:
nonzero when the stem output is even, none when it is odd.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import simclrv2
from simclrv2 import cli
from simclrv2.engine.checkpoint import save_checkpoint
from simclrv2.export import (
    ExportError,
    export_model,
    export_onnx,
    load_safetensors,
    onnx_max_difference,
    save_safetensors,
    torchvision_resnet,
    torchvision_state_dict,
)
from simclrv2.convert.official_keys import official_state_dict
from simclrv2.models import ModelSpec, build_simclrv2_model

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _random_model(**kwargs):
    """``build_simclrv2_model(**kwargs)`` with LeCun-scaled random weights and random BN statistics,
    so that signals keep their scale (the zero-initialised last gammas would hide errors). Built on
    the meta device first: the truncated-normal init of a 1x ResNet takes seconds on a small CPU."""
    with torch.device("meta"):
        model = build_simclrv2_model(**kwargs)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(2)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * (1 / fan_in) ** 0.5
            if module.bias is not None:
                module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.weight.data = 1 + 0.2 * torch.randn(n, generator=generator)
            if module.bias is not None:
                module.bias.data = 0.1 * torch.randn(n, generator=generator)
            module.running_mean = 0.1 * torch.randn(n, generator=generator)
            module.running_var = 0.5 + torch.rand(n, generator=generator)
            module.num_batches_tracked.zero_()
    return model.eval()


def _tv_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    body = copy.deepcopy(net)
    body.fc = nn.Identity()
    return body(x)


@pytest.fixture(scope="module")
def r50():
    return _random_model(resnet_depth=50, width_multiplier=1.0, ft_proj_selector=0, num_classes=10)


def test_r50_loads_into_stock_torchvision_resnet50(r50):
    state = torchvision_state_dict(r50)
    assert not any(k.startswith("stem.") for k in state) and "conv1.weight" in state and "fc.bias" in state
    net = torchvision.models.resnet50(num_classes=10)
    net.load_state_dict(state, strict=True)
    net.eval()
    same = torchvision_resnet(state, tf_same_pool=True)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, logits = r50(x)
        features = r50.embed(x)
        torch.testing.assert_close(_tv_features(same, x), features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(same(x), logits, atol=1e-5, rtol=1e-5)
        stock_gap = (_tv_features(net, x) - features).abs().max()
        odd = torch.rand(2, 3, 66, 66, generator=torch.Generator().manual_seed(1))  # stem output 33: odd
        torch.testing.assert_close(net(odd), r50(odd)[1], atol=1e-5, rtol=1e-5)
    assert stock_gap > 1e-3  # even stem output: torchvision's symmetric pool padding shifts the windows


def test_max_pool_padding_difference_on_the_official_fixture(reference_dir):
    """Fixture B's weights and inputs (64 px, stem output 32): the stock torchvision pool changes
    the features a lot; at 66 px (stem output 33) it changes nothing."""
    folder = reference_dir / "forward_B_r50_w0.125_sk0_64"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    variables = json.loads((folder / "variables.json").read_text())["variables"]
    arrays = np.load(folder / "variables.npz", allow_pickle=False)
    model = build_simclrv2_model(resnet_depth=50, width_multiplier=0.125, ft_proj_selector=0, num_classes=10)
    model.load_state_dict(official_state_dict(model, {v["checkpoint_key"]: arrays[v["name"]] for v in variables}))
    model.eval()
    stock = copy.deepcopy(model)
    stock.encoder.stem.pool = nn.MaxPool2d(3, 2, padding=1)
    x = torch.from_numpy(np.load(folder / "io.npz")["input"]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        ours, theirs = model.embed(x), stock.embed(x)
        relative = ((ours - theirs).norm(dim=1) / ours.norm(dim=1)).max()
        x66 = nn.functional.interpolate(x, size=(66, 66), mode="bilinear", align_corners=False)
        torch.testing.assert_close(stock.embed(x66), model.embed(x66), rtol=0, atol=0)
    assert relative > 0.05


def test_resnet18_cifar_stem_needs_the_helper(tmp_path):
    model = _random_model(resnet_depth=18, width_multiplier=1.0, cifar_stem=True, ft_proj_selector=1, num_classes=4)
    state = torchvision_state_dict(model)
    assert "fc.weight" not in state  # the head reads head layer 1, not the encoder output
    with pytest.raises(RuntimeError, match="layer1.0.downsample"):
        torchvision.models.resnet18().load_state_dict(state, strict=True)
    net = torchvision_resnet(state)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_tv_features(net, x), model.embed(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(resnet_depth=50, width_multiplier=1.0, sk_ratio=0.0625), "selective-kernel"),
    (dict(resnet_depth=50, width_multiplier=0.5), "width 1x only"),
])
def test_torchvision_export_refuses_what_torchvision_lacks(kwargs, message):
    with torch.device("meta"):
        model = build_simclrv2_model(**kwargs)
    with pytest.raises(ExportError, match=message):
        torchvision_state_dict(model)


def test_safetensors_round_trip_for_a_selective_kernel_model(tmp_path):
    model = _random_model(resnet_depth=50, width_multiplier=0.0625, sk_ratio=0.0625, num_proj_layers=2,
                          proj_out_dim=32, ft_proj_selector=2, num_classes=6)
    model.mode = "finetune"
    path = tmp_path / "m.safetensors"
    save_safetensors(model, path)
    back = load_safetensors(path)
    assert back.spec == model.spec and back.mode == "finetune"
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(simclrv2.load(path).predict(x), model.predict(x), rtol=0, atol=0)


def test_safetensors_of_an_earlier_version_load(tmp_path):
    """Before format 3 the metadata held the builder's arguments of then (``depth``) and the mode."""
    from safetensors.torch import save_file

    model = build_simclrv2_model(resnet_depth=18, width_multiplier=0.125, cifar_stem=True, num_classes=3).eval()
    config = {**asdict(model.spec), "mode": "finetune"}
    config["depth"] = config.pop("resnet_depth")
    save_file(model.state_dict(), tmp_path / "old.safetensors",
              metadata={"simclrv2_model_config": json.dumps(config), "format": "simclrv2"})
    back = load_safetensors(tmp_path / "old.safetensors")
    assert back.spec == ModelSpec(18, 0.125, 0.0, True, 3, 128, 1, 3) and back.mode == "finetune"


@pytest.mark.parametrize("kwargs, size", [
    (dict(resnet_depth=50, width_multiplier=0.0625, sk_ratio=0.0625, num_classes=5), 64),
    (dict(resnet_depth=18, width_multiplier=0.25, cifar_stem=True, ft_proj_selector=1, num_classes=3), 32),
    (dict(resnet_depth=18, width_multiplier=0.25, num_proj_layers=2), 56),
])
def test_onnx_matches_pytorch_in_onnxruntime(tmp_path, kwargs, size):
    pytest.importorskip("onnxruntime")
    model = _random_model(**kwargs)
    path = tmp_path / "m.onnx"
    names = export_onnx(model, path, size)
    assert names == ["features", "projection"] + (["logits"] if kwargs.get("num_classes") else [])
    diffs = onnx_max_difference(model, path, size, batch=3)
    assert set(diffs) == set(names)
    assert max(diffs.values()) < 1e-4, diffs


def test_export_command_on_a_run_folder(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = _random_model(resnet_depth=18, width_multiplier=1.0, cifar_stem=True, ft_proj_selector=0, num_classes=3)
    config = {"model_spec": asdict(model.spec), "mode": "finetune"}
    save_checkpoint(tmp_path / "run", {"stage": "finetune", "model": model.state_dict(), **config,
                                       "image_size": 32}, step=5, keep=1)
    exported = tmp_path / "r18.safetensors"
    assert cli.main(["export", str(tmp_path / "run"), str(exported), "--format", "safetensors"]) == 0
    assert cli.main(["export", str(exported), str(tmp_path / "r18.pt"), "--format", "torchvision"]) == 0
    state = torch.load(tmp_path / "r18.pt", weights_only=True)
    assert state["fc.weight"].shape == (3, 512)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torchvision_resnet(state)(x), model(x)[1], atol=1e-5, rtol=1e-5)
    assert cli.main(["export", str(exported), str(tmp_path / "r18.onnx"), "--format", "onnx"]) == 0
    assert "images (N, 3, 32, 32)" in capsys.readouterr().out
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(model, tmp_path / "x", "keras")
    sk_ckpt = tmp_path / "sk.safetensors"
    save_safetensors(build_simclrv2_model(resnet_depth=18, width_multiplier=0.125, sk_ratio=0.0625), sk_ckpt)
    assert cli.main(["export", str(sk_ckpt), str(tmp_path / "sk.pt"), "--format", "torchvision"]) == 2
    assert "have no torchvision counterpart" in capsys.readouterr().err


def test_onnx_export_defaults_to_the_trained_image_size(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = _random_model(resnet_depth=18, width_multiplier=0.125, cifar_stem=True, num_classes=4)
    config = {"model_spec": asdict(model.spec), "mode": "finetune"}
    save_checkpoint(tmp_path / "run", {"stage": "finetune", "model": model.state_dict(), **config,
                                       "image_size": 28}, step=1, keep=1)
    assert simclrv2.load(tmp_path / "run").image_size == 28
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "m.onnx"), "--format", "onnx"]) == 0
    assert "images (N, 3, 28, 28)" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "m.safetensors"), "--format", "safetensors"]) == 0
    assert load_safetensors(tmp_path / "m.safetensors").image_size == 28  # carried in the metadata
    assert cli.main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "m2.onnx"), "--format", "onnx"]) == 0
    assert "images (N, 3, 28, 28)" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "m3.onnx"), "--format", "onnx",
                     "--image-size", "0"]) == 2
    assert "--image-size must be positive, got 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- atomic writes, --force, extras


def _write_then_fail(*args, **kwargs):
    """A writer that puts some bytes where it was told to write, then fails (a full disk, a kill)."""
    target = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, (str, Path)) or hasattr(a, "write"))
    if hasattr(target, "write"):
        target.write(b"partial")
    else:
        Path(target).write_bytes(b"partial")
    raise OSError("No space left on device")


def _fail(*args, **kwargs):
    raise OSError("No space left on device")


@pytest.fixture(scope="module")
def r18():
    return _random_model(resnet_depth=18, width_multiplier=1.0, cifar_stem=True, num_proj_layers=1, proj_out_dim=8)


@pytest.mark.parametrize("fmt, patch", [
    ("torchvision", [(torch, "save", _write_then_fail)]),
    ("onnx", [(torch.onnx, "export", _write_then_fail)]),
    ("safetensors", [("safetensors.torch", "save_file", _write_then_fail), (os, "fsync", _fail)]),
])
def test_a_failed_export_leaves_no_output_file(tmp_path, monkeypatch, r18, fmt, patch):
    """A write that dies half way leaves nothing under the output's name (formerly a torn file)."""
    if fmt == "onnx":
        pytest.importorskip("onnx")
    for owner, name, replacement in patch:
        monkeypatch.setattr(__import__(owner, fromlist=["_"]) if isinstance(owner, str) else owner, name, replacement)
    with pytest.raises(OSError, match="No space left"):
        export_model(r18, tmp_path / f"m.{fmt}", fmt, image_size=32)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_replace_an_output_without_force(tmp_path, capsys, r18):
    out = tmp_path / "last.pt"
    out.write_bytes(b"a checkpoint")
    with pytest.raises(ExportError, match=f"output {out} already exists; pass --force to replace it"):
        export_model(r18, out, "torchvision")
    assert out.read_bytes() == b"a checkpoint"
    save_safetensors(r18, tmp_path / "m.safetensors")
    assert cli.main(["export", str(tmp_path / "m.safetensors"), str(out), "--format", "torchvision"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"a checkpoint"
    assert cli.main(["export", str(tmp_path / "m.safetensors"), str(out), "--format", "torchvision", "--force"]) == 0
    assert set(torch.load(out, weights_only=True)) == set(torchvision_state_dict(r18))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "m.safetensors"]


def test_onnx_export_without_the_onnx_package_names_the_extra(tmp_path, monkeypatch):
    model = build_simclrv2_model(resnet_depth=18, width_multiplier=0.125, cifar_stem=True).eval()
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    for call in (lambda: export_model(model, tmp_path / "m.onnx", "onnx", 32), lambda: export_onnx(model, tmp_path / "m.onnx", 32)):
        with pytest.raises(ExportError, match=r"^ONNX export needs the onnx package: pip install 'simclrv2\[export\]'$"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_command_without_onnx_in_a_fresh_process(tmp_path):
    """``python -m simclrv2 export --format onnx`` where ``import onnx`` fails: one line, exit 2."""
    model = build_simclrv2_model(resnet_depth=18, width_multiplier=0.125, cifar_stem=True)
    save_safetensors(model, tmp_path / "m.safetensors")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "onnx.py").write_text("raise ImportError(\"No module named 'onnx'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "simclrv2", "export", str(tmp_path / "m.safetensors"),
                           str(tmp_path / "m.onnx"), "--format", "onnx"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == "simclrv2 export: error: ONNX export needs the onnx package: pip install 'simclrv2[export]'\n"
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_export_refuses_models_over_two_gigabytes(tmp_path):
    pytest.importorskip("onnx")
    with torch.device("meta"):
        model = build_simclrv2_model(resnet_depth=152, width_multiplier=3.0, sk_ratio=0.0625)
    with pytest.raises(ExportError, match=r"3.2 GiB of weights exceed what one ONNX file holds \(2 GiB\)"):
        export_onnx(model, tmp_path / "big.onnx", 224)
    assert list(tmp_path.iterdir()) == []
