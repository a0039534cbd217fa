"""Models by name: ``create_model``, ``list_models`` and ``hubconf.py`` through ``torch.hub.load``."""
from __future__ import annotations

import importlib.util
import itertools
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import simclrv2
from simclrv2.config import PRESETS, ConfigError
from simclrv2.engine.checkpoint import CheckpointError, save_checkpoint
from simclrv2.export import save_safetensors
from simclrv2.models import count_parameters
from model_checks import assert_official_counts, bn_stats

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = [f"r{d}_{w}x_sk{sk}" for d, w, sk in itertools.product((50, 101, 152), (1, 2, 3), (0, 1))]


def test_official_names_and_the_package_presets_are_listed():
    names = simclrv2.list_models()
    assert set(OFFICIAL) <= set(names) and len(OFFICIAL) == 18
    assert simclrv2.list_models("r152_*_sk1") == ["r152_1x_sk1", "r152_2x_sk1", "r152_3x_sk1"]
    embedded = simclrv2.create_model("r18_0p25x_sk0_cifar")
    preset = PRESETS["embedded"]["pretrain"]["model"]
    assert {**asdict(embedded.spec), "mode": embedded.mode} == {
        "resnet_depth": preset["resnet_depth"], "width_multiplier": preset["width_multiplier"], "sk_ratio": preset["sk_ratio"],
        "cifar_stem": preset["cifar_stem"], "num_proj_layers": 3, "proj_out_dim": 128, "ft_proj_selector": 1,
        "num_classes": 10, "mode": "pretrain"}
    assert embedded.image_size == 28
    with torch.device("meta"):
        cifar = simclrv2.create_model("r50_1x_sk0_cifar")
    assert (cifar.encoder.depth, cifar.encoder.width_multiplier, cifar.encoder.cifar_stem) == (50, 1.0, True)


def test_official_names_have_the_official_parameter_counts(reference_dir):
    """Each official name builds the network whose counts the official TF code reports (param_counts.json)."""
    path = reference_dir / "param_counts.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = {(r["depth"], r["width"], r["sk_ratio"] > 0): r for r in json.loads(path.read_text())["rows"]}
    for name in OFFICIAL:
        depth, width, sk = int(name[1:name.index("_")]), int(name.split("_")[1][0]), name.endswith("sk1")
        row = rows[(depth, width, sk)]
        with torch.device("meta"):
            model = simclrv2.create_model(name)
        assert model.encoder.sk_ratio == row["sk_ratio"], name
        assert_official_counts(model, row, name)


def test_paper_table1_sizes_without_the_fixtures():
    """Paper Table 1 (millions, encoder parameters with BN statistics) from the names alone."""
    table1 = {"r50_1x_sk0": 24, "r50_1x_sk1": 35, "r101_2x_sk1": 257, "r152_2x_sk0": 233, "r152_3x_sk1": 795}
    for name, millions in table1.items():
        with torch.device("meta"):
            encoder = simclrv2.create_model(name).encoder
        assert round((count_parameters(encoder) + bn_stats(encoder)) / 1e6) == millions, name


def test_unknown_names_and_options_fail_in_one_line():
    with pytest.raises(ConfigError, match=r"unknown model 'r50_1x_sk2'; close names: r50_1x_sk\d") as err:
        simclrv2.create_model("r50_1x_sk2")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) widht_multiplier; choose from resnet_depth"):
        simclrv2.create_model("r50_1x_sk0", widht_multiplier=2)


def test_overrides_change_a_fresh_model():
    model = simclrv2.create_model("r18_0p25x_sk0_cifar", num_classes=None, proj_out_dim=32)
    assert model.supervised_head is None and model.projection_head.out_dim == 32 and model.training


def _tiny_run(tmp_path: Path, **overrides) -> tuple[Path, torch.nn.Module]:
    model = simclrv2.create_model("r18_0p25x_sk0_cifar", **overrides)
    save_checkpoint(tmp_path / "run", {"stage": "pretrain", "model": model.state_dict(), "model_spec": asdict(model.spec),
                                       "mode": model.mode, "image_size": 28}, step=1, keep=1)
    return tmp_path / "run", model.eval()


def test_pretrained_weights_must_hold_the_named_model(tmp_path):
    run, trained = _tiny_run(tmp_path)
    x = torch.rand(2, 3, 28, 28)
    for source in (run, tmp_path / "m.safetensors"):
        if source.suffix:
            save_safetensors(trained, source)
        model = simclrv2.create_model("r18_0p25x_sk0_cifar", pretrained=str(source), num_classes=10)
        assert not model.training
        with torch.no_grad():
            torch.testing.assert_close(model.embed(x), trained.embed(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"holds a r18_0p25x_sk0_cifar model, not r50_1x_sk0: resnet_depth 18 "
                                              r"\(wanted 50\), width_multiplier 0.25 \(wanted 1.0\)"):
        simclrv2.create_model("r50_1x_sk0", pretrained=str(run))
    with pytest.raises(CheckpointError, match=r"not r18_0p25x_sk0_cifar: num_classes 10 \(wanted 5\)"):
        simclrv2.create_model("r18_0p25x_sk0_cifar", pretrained=str(run), num_classes=5)
    with pytest.raises(CheckpointError, match="does not exist"):
        simclrv2.create_model("r18_0p25x_sk0_cifar", pretrained=str(tmp_path / "missing.pt"))


def test_torch_hub_load_from_a_local_checkout(tmp_path):
    run, trained = _tiny_run(tmp_path)
    spec = importlib.util.spec_from_file_location("hubconf", PROJECT_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")}  # torch.hub.list's rule
    assert entries == set(simclrv2.list_models())
    assert "ResNet-50 1x with selective kernels" in hubconf.r50_1x_sk1.__doc__
    model = torch.hub.load(str(PROJECT_ROOT), "r18_0p25x_sk0_cifar", source="local", pretrained=str(run))
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), trained.embed(x), rtol=0, atol=0)
    fresh = torch.hub.load(str(PROJECT_ROOT), "r18_0p25x_sk0_cifar", source="local", num_classes=3)
    assert fresh.supervised_head.linear.out_features == 3
    with pytest.raises(CheckpointError, match="not r50_1x_sk1"):
        torch.hub.load(str(PROJECT_ROOT), "r50_1x_sk1", source="local", pretrained=str(run))
