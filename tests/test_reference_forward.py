"""Our models against outputs of the official TF2 code (``shared/reference``, README sections 4-5).

Fixture A: R18-1x with the SK flag (so ResNet-D shortcuts, incl. the stride-1 SAME average pool),
CIFAR stem, 32 px. Fixture B: R50 layout at width 0.125, standard stem with the SAME max-pool, 64 px.
Weights are loaded through the official object-based checkpoint keys (``official_keys``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch

from simclrv2.models import build_resnet, build_simclrv2_model
from simclrv2.convert.official_keys import (
    CHECKPOINT_SUFFIX,
    is_model_variable_key,
    official_key_map,
    official_state_dict,
    official_to_torch,
    strip_checkpoint_suffix,
    torch_to_official,
)

FIXTURES = {
    "A": ("forward_A_r18_w1_sk0.0625_cifar32", dict(resnet_depth=18, width_multiplier=1.0, sk_ratio=0.0625, cifar_stem=True)),
    "B": ("forward_B_r50_w0.125_sk0_64", dict(resnet_depth=50, width_multiplier=0.125, sk_ratio=0.0, cifar_stem=False)),
}
HEAD = dict(num_proj_layers=3, proj_out_dim=128, ft_proj_selector=0, num_classes=10)
TRAIN_ATOL = {"A": 5e-4, "B": 1e-2}  # README: train-mode outputs are poorly conditioned in float32


def _fixture(reference_dir: Path, which: str):
    tag, cfg = FIXTURES[which]
    folder = reference_dir / tag
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    variables = json.loads((folder / "variables.json").read_text())
    arrays = np.load(folder / "variables.npz", allow_pickle=False)
    io = np.load(folder / "io.npz", allow_pickle=False)
    return cfg, variables, arrays, io


def _loaded_model(reference_dir: Path, which: str):
    cfg, variables, arrays, io = _fixture(reference_dir, which)
    model = build_simclrv2_model(**cfg, **HEAD)
    by_key = {v["checkpoint_key"]: arrays[v["name"]] for v in variables["variables"]}
    model.load_state_dict(official_state_dict(model, by_key), strict=True)
    x = torch.from_numpy(io["input"]).permute(0, 3, 1, 2).contiguous()
    return model, variables, arrays, io, x


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return (t.permute(0, 2, 3, 1) if t.ndim == 4 else t).detach().numpy()


@pytest.mark.parametrize("which", ["A", "B"])
def test_key_map_covers_fixture_checkpoint_exactly(reference_dir, which):
    cfg, variables, _, _ = _fixture(reference_dir, which)
    model = build_simclrv2_model(**cfg, **HEAD)
    mapping = official_key_map(model)
    ckpt = {
        strip_checkpoint_suffix(k): shape
        for k, shape in variables["checkpoint_keys_and_shapes"].items()
        if is_model_variable_key(k)
    }
    assert set(ckpt) == set(mapping)
    state = model.state_dict()
    for key, (name, transform) in mapping.items():
        fake = np.zeros(ckpt[key], dtype=np.float32)
        assert tuple(official_to_torch(fake, transform).shape) == tuple(state[name].shape), key
    mapped = {name for name, _ in mapping.values()}
    assert mapped == {n for n in state if not n.endswith("num_batches_tracked")}


@pytest.mark.parametrize("which", ["A", "B"])
def test_eval_outputs_match_official(reference_dir, which):
    model, _, _, io, x = _loaded_model(reference_dir, which)
    model.eval()
    with torch.no_grad():
        projection, logits = model(x)
        features = model.embed(x)
        hiddens = model.projection_head.hiddens(features)
        inter = model.encoder.forward_intermediates(x)
    tol = dict(atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(features.numpy(), io["encoder_features"], **tol)
    np.testing.assert_allclose(projection.numpy(), io["proj_head_output"], **tol)
    np.testing.assert_allclose(logits.numpy(), io["logits_sup"], **tol)
    for k in (0, 1, 2, 3, -1):
        model.projection_head.ft_proj_selector = k
        with torch.no_grad():
            selected = model.projection_head(features)[1]
            partial = model.projection_head.hidden_at(features, k)
        np.testing.assert_allclose(selected.numpy(), io[f"proj_hidden_sel{k}"], **tol)
        np.testing.assert_allclose(partial.numpy(), io[f"proj_hidden_sel{k}"], **tol)
        np.testing.assert_allclose(hiddens[k].numpy(), io[f"proj_hidden_sel{k}"], **tol)
    for name, tensor in inter.items():
        atol = 5e-4 if name.startswith("block_group") else 1e-4
        np.testing.assert_allclose(_nhwc(tensor), io[f"salient/{name}"], atol=atol, rtol=1e-4, err_msg=name)


def _torch_shape(shape, transform: str) -> Tuple[int, ...]:
    """PyTorch shape of an official variable: HWIO -> OIHW, (in, out) -> (out, in)."""
    if transform == "conv":
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(shape[::-1]) if transform == "dense" else tuple(shape)


def _bn_counts(model: torch.nn.Module) -> Tuple[Dict[str, int], list]:
    """Elements per channel that each BN normalised over in the last forward."""
    counts: Dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            def hook(mod, inputs, name=name):
                counts[name] = inputs[0].numel() // inputs[0].shape[1]
            hooks.append(module.register_forward_pre_hook(hook))
    return counts, hooks


@pytest.mark.parametrize("which", ["A", "B"])
def test_train_mode_outputs_match_official(reference_dir, which):
    model, _, _, io, x = _loaded_model(reference_dir, which)
    model.train()
    with torch.no_grad():
        projection, logits = model(x)
        features = model.embed(x)
    atol = TRAIN_ATOL[which]
    np.testing.assert_allclose(projection.numpy(), io["train_mode/proj_head_output"], atol=atol, rtol=1e-3)
    np.testing.assert_allclose(logits.numpy(), io["train_mode/logits_sup"], atol=atol, rtol=1e-3)
    np.testing.assert_allclose(features.numpy(), io["train_mode/encoder_features"], atol=atol, rtol=1e-3)


@pytest.mark.parametrize("which", ["A", "B"])
def test_moving_statistics_after_one_training_step(reference_dir, which):
    """Momentum 0.1 (TF decay 0.9); PyTorch's running_var uses the unbiased batch variance, so
    the TF (biased) update is rescaled by n/(n-1) before comparing."""
    model, variables, arrays, io, x = _loaded_model(reference_dir, which)
    mapping = official_key_map(model)
    model.train()
    counts, hooks = _bn_counts(model)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    state = model.state_dict()
    name_to_key = {v["name"]: strip_checkpoint_suffix(v["checkpoint_key"]) for v in variables["variables"]}
    checked = 0
    for entry in io.files:
        if not entry.startswith("train_mode/moving_after/"):
            continue
        tf_name = entry[len("train_mode/moving_after/"):]
        torch_name, _ = mapping[name_to_key[tf_name]]
        before = arrays[tf_name].astype(np.float64)
        after = io[entry].astype(np.float64)
        if tf_name.endswith("moving_variance:0"):
            n = counts[torch_name.rsplit(".", 1)[0]]
            after = 0.9 * before + (after - 0.9 * before) * n / (n - 1)
        atol = 1e-5 if which == "A" else 2e-4
        np.testing.assert_allclose(state[torch_name].numpy(), after, atol=atol, rtol=1e-4, err_msg=tf_name)
        checked += 1
    assert checked == 2 * sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("config", ["r50_1x_sk0_imagenet", "r50_1x_sk1_imagenet"])
def test_key_map_covers_full_size_r50(reference_dir, config):
    """Every official R50-1x (SK off / on) checkpoint key maps to exactly one of our tensors with the
    right shape, and every tensor of ours (bar num_batches_tracked) is mapped."""
    names = json.loads((reference_dir / "variable_names_full_size.json").read_text())
    configs = names["configs"]
    if config not in configs:
        pytest.skip(f"{config} not in variable_names_full_size.json ({sorted(configs)})")
    entry = configs[config]
    sk_ratio = 0.0625 if "sk1" in config else 0.0
    with torch.device("meta"):
        model = build_simclrv2_model(
            resnet_depth=50, width_multiplier=1.0, sk_ratio=sk_ratio, cifar_stem=False, num_proj_layers=3,
            proj_out_dim=128, ft_proj_selector=0, num_classes=entry["num_classes"],
        )
    ckpt = {
        strip_checkpoint_suffix(k): shape
        for k, shape in entry["checkpoint_keys_and_shapes"].items()
        if is_model_variable_key(k)
    }
    assert len(ckpt) == len(entry["variables"])
    mapping = official_key_map(model)
    assert set(mapping) == set(ckpt)
    state = model.state_dict()
    targets = [name for name, _ in mapping.values()]
    assert len(targets) == len(set(targets))
    assert set(targets) == {n for n in state if not n.endswith("num_batches_tracked")}
    for key, (name, transform) in mapping.items():
        assert tuple(state[name].shape) == _torch_shape(ckpt[key], transform), (key, name)


def test_layout_transforms_round_trip():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 5, 2, 7)).astype(np.float32)  # H, W, I, O
    conv = official_to_torch(kernel, "conv")
    assert conv.shape == (7, 2, 3, 5)
    assert conv[6, 1, 2, 4] == kernel[2, 4, 1, 6]
    dense = rng.standard_normal((4, 9)).astype(np.float32)  # in, out
    assert official_to_torch(dense, "dense")[8, 3] == dense[3, 8]
    for array, transform in ((kernel, "conv"), (dense, "dense"), (dense[0], "none")):
        np.testing.assert_array_equal(torch_to_official(official_to_torch(array, transform), transform), array)
    with pytest.raises(ValueError, match="unknown transform"):
        official_to_torch(dense, "hwio")


def test_state_dict_from_official_reports_missing_and_bad_shapes():
    model = build_resnet(18, 0.125, cifar_stem=True)
    mapping = official_key_map(model)
    assert all(k.startswith("model/resnet_model/") for k in mapping)
    arrays = {
        key + CHECKPOINT_SUFFIX: torch_to_official(model.state_dict()[name], transform)
        for key, (name, transform) in mapping.items()
    }
    arrays["global_step" + CHECKPOINT_SUFFIX] = np.array(3)
    arrays[next(iter(mapping)) + "/.OPTIMIZER_SLOT/optimizer/Momentum" + CHECKPOINT_SUFFIX] = np.zeros(1)
    state = official_state_dict(model, arrays)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0)
    conv_key = "model/resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel"
    with pytest.raises(ValueError, match="does not fit"):
        official_state_dict(model, {**arrays, conv_key + CHECKPOINT_SUFFIX: np.zeros((3, 3, 3, 9), np.float32)})
    del arrays[conv_key + CHECKPOINT_SUFFIX]
    with pytest.raises(KeyError, match="without a key"):
        official_state_dict(model, arrays)
