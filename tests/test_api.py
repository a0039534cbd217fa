"""``simclrv2.load`` / ``embed`` / ``predict`` on tiny checkpoints written in the documented format."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import simclrv2
from simclrv2.engine.checkpoint import FORMAT_VERSION, CheckpointError, atomic_save, save_checkpoint
from simclrv2.models import ModelSpec, build_simclrv2_model
from model_checks import randomize_

CONFIG = dict(resnet_depth=18, width_multiplier=0.125, sk_ratio=0.0, cifar_stem=True, num_proj_layers=2, proj_out_dim=16,
              ft_proj_selector=1, num_classes=4)


@pytest.fixture()
def trained():
    """A tiny model with non-trivial BN statistics and head weights."""
    return randomize_(build_simclrv2_model(**CONFIG), seed=3, scale=0.3).eval()


def _state(model, mode="finetune"):
    return {"stage": "finetune", "model": model.state_dict(), "model_spec": CONFIG, "mode": mode,
            "image_size": 32, "classes": ["a", "b", "c", "d"]}


def _expected_probabilities(model, x):
    """Float64 re-computation: encoder features, head layer 0 (Linear, eval BN, ReLU), classifier, softmax."""
    with torch.no_grad():
        h = model.encoder(x).double()
        layer = model.projection_head.layers[0]
        bn = layer.bn
        z = h @ layer.linear.weight.double().t()
        z = (z - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps) * bn.weight.double() \
            + bn.bias.double()
        logits = z.clamp_min(0) @ model.supervised_head.linear.weight.double().t() + model.supervised_head.linear.bias.double()
    return torch.softmax(logits, dim=1)


def test_load_run_folder_and_checkpoint_file(trained, tmp_path):
    save_checkpoint(tmp_path / "run", _state(trained), step=3, keep=2)
    atomic_save({"format_version": FORMAT_VERSION, **_state(trained)}, tmp_path / "model.pt")
    x = torch.rand(5, 3, 32, 32)
    expected = _expected_probabilities(trained, x)
    for source in (tmp_path / "run", str(tmp_path / "model.pt")):
        model = simclrv2.load(source)
        assert not model.training and model.mode == "finetune"
        with torch.no_grad():
            torch.testing.assert_close(model.embed(x), trained.encoder(x), rtol=0, atol=0)
            probabilities = model.predict(x)
        assert probabilities.shape == (5, 4)
        torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(5), rtol=0, atol=1e-6)
        torch.testing.assert_close(probabilities.double(), expected, rtol=0, atol=1e-6)


def test_format_2_checkpoint_loads(trained, tmp_path):
    """Format 2 recorded the architecture as the builder's arguments of then (``depth``) with the mode."""
    format2 = {k: v for k, v in _state(trained).items() if k not in ("model_spec", "mode")}
    config = {**{k: v for k, v in CONFIG.items() if k != "resnet_depth"}, "depth": CONFIG["resnet_depth"],
              "mode": "finetune"}
    atomic_save({"format_version": 2, **format2, "model_config": config}, tmp_path / "old.pt")
    model = simclrv2.load(tmp_path / "old.pt")
    assert model.spec == ModelSpec(**CONFIG) and model.mode == "finetune"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(x), trained.predict(x), rtol=0, atol=0)


def test_predict_equals_softmax_of_the_forward_logits_in_both_modes(trained, tmp_path):
    atomic_save({"format_version": FORMAT_VERSION, **_state(trained, mode="pretrain")}, tmp_path / "p.pt")
    model = simclrv2.load(tmp_path / "p.pt")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        _, logits = model(x)
        torch.testing.assert_close(model.predict(x), F.softmax(logits, dim=1))


def test_predict_and_load_errors(trained, tmp_path):
    no_head = build_simclrv2_model(**{**CONFIG, "num_classes": None})
    with pytest.raises(ValueError, match="no supervised head"):
        no_head.predict(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"float RGB images .* x.float\(\) / 255"):
        trained.predict(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\)"):
        trained.predict(torch.rand(3, 32, 32))
    with pytest.raises(CheckpointError, match="does not exist"):
        simclrv2.load(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a simclrv2 checkpoint"):
        simclrv2.load(tmp_path / "other.pt")
    atomic_save({"format_version": FORMAT_VERSION, **_state(trained)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="only applies to official TF checkpoints"):
        simclrv2.load(tmp_path / "model.pt", ft_proj_selector=0)
