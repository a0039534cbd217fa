"""Conversion of official SimCLRv2 TF2 checkpoints and SavedModels (``simclrv2.convert``).

* Architecture inference from checkpoint keys: pure, no TensorFlow needed (our own models' key
  maps at many depths/widths/SK settings, and the official R50-1x key lists of the fixtures).
* Fixture B (written by the official code): checkpoint and SavedModel convert to a model whose
  outputs equal TensorFlow's stored ones (README section 5 tolerances).
* Checkpoints in the official object layout at other depths, widths and SK settings, written here
  with plain ``tf.train.Checkpoint`` of nested ``tf.Module``s (the official code is not needed),
  convert back exactly; an extra, a missing variable or a TF1 checkpoint fail clearly.

TensorFlow tests skip when TensorFlow is not installed (``pip install -e '.[tf]'``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import simclrv2
from simclrv2 import cli
from simclrv2.convert import ConversionError, convert_tf_checkpoint, infer_architecture, is_tf_source
from simclrv2.convert.architecture import ArchitectureError
from simclrv2.engine.checkpoint import load_checkpoint
from simclrv2.models import build_simclrv2_model
from simclrv2.models.official_keys import official_key_map, strip_checkpoint_suffix, torch_to_official
from simclrv2.stages.common import load_model

FIXTURE_B = "forward_B_r50_w0.125_sk0_64"
TOL = dict(atol=1e-4, rtol=1e-4)


def _tf_shape(shape, transform: str) -> tuple:
    if transform == "conv":
        o, i, h, w = shape
        return (h, w, i, o)
    return tuple(shape[::-1]) if transform == "dense" else tuple(shape)


def _official_shapes(model) -> dict:
    state = model.state_dict()
    return {key: _tf_shape(tuple(state[name].shape), t) for key, (name, t) in official_key_map(model).items()}


def _same_channels(model_a, model_b) -> bool:
    a, b = model_a.state_dict(), model_b.state_dict()
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


# ----------------------------------------------------------------------------- inference, no TF

INFERENCE_CASES = [
    dict(depth=18, width_multiplier=1.0, sk_ratio=0.0, cifar_stem=True, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=10),
    dict(depth=34, width_multiplier=0.5, sk_ratio=0.0625, cifar_stem=False, num_proj_layers=2, proj_out_dim=64,
         ft_proj_selector=-1, num_classes=5),
    dict(depth=50, width_multiplier=0.3, sk_ratio=0.0, cifar_stem=False, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=None),
    dict(depth=101, width_multiplier=2.0, sk_ratio=0.0625, cifar_stem=False, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=1000),
    dict(depth=152, width_multiplier=3.0, sk_ratio=0.0625, cifar_stem=False, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=1000),
    dict(depth=200, width_multiplier=0.25, sk_ratio=0.5, cifar_stem=True, num_proj_layers=0, proj_out_dim=128,
         ft_proj_selector=0, num_classes=3),
]


@pytest.mark.parametrize("kwargs", INFERENCE_CASES, ids=lambda k: f"r{k['depth']}-w{k['width_multiplier']}-sk{k['sk_ratio']}")
def test_architecture_inferred_from_our_key_maps(kwargs):
    with torch.device("meta"):
        model = build_simclrv2_model(**kwargs)
        arch = infer_architecture(_official_shapes(model))
        rebuilt = build_simclrv2_model(**arch)
    assert _same_channels(model, rebuilt)
    for key in ("depth", "cifar_stem", "num_proj_layers", "num_classes", "ft_proj_selector"):
        assert arch[key] == kwargs[key], key
    assert (arch["sk_ratio"] > 0) == (kwargs["sk_ratio"] > 0)
    if kwargs["width_multiplier"] * 512 == int(kwargs["width_multiplier"] * 512):
        assert arch["width_multiplier"] == kwargs["width_multiplier"]
    if kwargs["num_proj_layers"]:
        assert arch["proj_out_dim"] == kwargs["proj_out_dim"]


def test_non_paper_sk_ratio_is_read_from_the_squeeze_widths():
    with torch.device("meta"):
        model = build_simclrv2_model(depth=50, width_multiplier=1.0, sk_ratio=0.125)
    assert infer_architecture(_official_shapes(model))["sk_ratio"] == 0.125


@pytest.mark.parametrize("config", ["r50_1x_sk0_imagenet", "r50_1x_sk1_imagenet"])
def test_architecture_of_official_full_size_key_lists(reference_dir, config):
    import json

    entry = json.loads((reference_dir / "variable_names_full_size.json").read_text())["configs"][config]
    shapes = {strip_checkpoint_suffix(k): v for k, v in entry["checkpoint_keys_and_shapes"].items()
              if k.startswith("model/") and ".OPTIMIZER_SLOT" not in k}
    arch = infer_architecture(shapes)
    assert arch == {"depth": 50, "width_multiplier": 1.0, "sk_ratio": 0.0625 if "sk1" in config else 0.0,
                    "cifar_stem": False, "num_proj_layers": 3, "proj_out_dim": 128, "ft_proj_selector": 0,
                    "num_classes": entry["num_classes"]}


def test_inference_rejects_what_no_official_model_has():
    with torch.device("meta"):
        shapes = _official_shapes(build_simclrv2_model(depth=50, width_multiplier=0.25, num_classes=10))
    gone = {k: v for k, v in shapes.items() if "/block_groups/2/layers/5/" not in k}
    with pytest.raises(ArchitectureError, match=r"\[3, 4, 5, 3\] match no supported ResNet depth"):
        infer_architecture(gone)
    with pytest.raises(ArchitectureError, match="no variable .*initial_conv_relu_max_pool/0"):
        infer_architecture({k: v for k, v in shapes.items() if "initial_conv" not in k})
    with pytest.raises(ArchitectureError, match="selects a hidden of width 128"):
        infer_architecture(shapes, ft_proj_selector=-1)
    with pytest.raises(ArchitectureError, match="outside the 3-layer projection head"):
        infer_architecture(shapes, ft_proj_selector=4)
    assert infer_architecture(shapes, ft_proj_selector=2)["ft_proj_selector"] == 2


def test_missing_tensorflow_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    (tmp_path / "ckpt-1.index").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ConversionError, match=r"needs TensorFlow: pip install tensorflow-cpu tf-keras"):
        convert_tf_checkpoint(tmp_path / "ckpt-1")


# ----------------------------------------------------------------------------- TensorFlow


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


def _randomised(model):
    """Random weights and BN statistics so that every tensor differs from its initial value."""
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = tensor
        elif name.endswith("running_var"):
            state[name] = torch.rand(tensor.shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(tensor.shape, generator=generator) * 0.2
    model.load_state_dict(state)
    return model.eval()


def _put(root, parts, value, tf) -> None:
    obj = root
    for part in parts[:-1]:
        if not hasattr(obj, part):
            setattr(obj, part, tf.Module())
        obj = getattr(obj, part)
    setattr(obj, parts[-1], value)


def _write_official(tf, model, folder: Path, drop: str | None = None, extra: str | None = None) -> Path:
    """A checkpoint laid out like the official ``run.py`` one: ``model/...`` variables under their
    structural keys, plus ``global_step`` and an optimizer with a momentum-like variable."""
    state = model.state_dict()
    root = tf.Module()
    for key, (name, transform) in official_key_map(model).items():
        if key != drop:
            _put(root, key.split("/")[1:], tf.Variable(torch_to_official(state[name], transform)), tf)
    if extra is not None:
        _put(root, extra.split("/")[1:], tf.Variable(np.zeros((1, 1, 4, 4), np.float32)), tf)
    optimizer = tf.Module()
    optimizer.momentum = tf.Variable(np.zeros(3, np.float32))
    checkpoint = tf.train.Checkpoint(model=root, global_step=tf.Variable(7, dtype=tf.int64), optimizer=optimizer)
    return Path(tf.train.CheckpointManager(checkpoint, str(folder), max_to_keep=1).save(checkpoint_number=7))


TF_CASES = [
    dict(depth=18, width_multiplier=0.25, sk_ratio=0.0625, cifar_stem=False, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=7),
    dict(depth=34, width_multiplier=0.125, sk_ratio=0.0, cifar_stem=True, num_proj_layers=2, proj_out_dim=16,
         ft_proj_selector=-1, num_classes=5),
    dict(depth=50, width_multiplier=0.25, sk_ratio=0.5, cifar_stem=False, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=None),
    dict(depth=101, width_multiplier=0.1, sk_ratio=0.0, cifar_stem=False, num_proj_layers=1, proj_out_dim=32,
         ft_proj_selector=0, num_classes=4),
]


@pytest.mark.parametrize("kwargs", TF_CASES, ids=lambda k: f"r{k['depth']}-w{k['width_multiplier']}-sk{k['sk_ratio']}")
def test_official_layout_checkpoints_convert_exactly(tf, tmp_path, kwargs):
    model = _randomised(build_simclrv2_model(**kwargs))
    prefix = _write_official(tf, model, tmp_path / "ckpt")
    assert prefix.name == "ckpt-7" and is_tf_source(tmp_path / "ckpt") and is_tf_source(prefix)
    converted, record = convert_tf_checkpoint(tmp_path / "ckpt", tmp_path / "converted.pt")
    assert _same_channels(model, converted)
    expected = model.state_dict()
    for name, tensor in converted.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, expected[name]), name
    config = record["model_config"]
    assert {k: config[k] for k in ("depth", "cifar_stem", "num_proj_layers", "num_classes", "ft_proj_selector")} == \
        {k: kwargs[k] for k in ("depth", "cifar_stem", "num_proj_layers", "num_classes", "ft_proj_selector")}
    assert config["sk_ratio"] == kwargs["sk_ratio"]
    assert record["config"]["source_global_step"] == 7 and record["stage"] == "converted"
    x = torch.rand(2, 3, 32, 32)
    loaded = simclrv2.load(tmp_path / "converted.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), model.embed(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_extra_or_missing_variables_fail_clearly(tf, tmp_path):
    model = _randomised(build_simclrv2_model(depth=18, width_multiplier=0.125, num_classes=3))
    extra = "model/resnet_model/block_groups/1/layers/0/se_layer/conv2d/kernel"
    _write_official(tf, model, tmp_path / "extra", extra=extra)
    with pytest.raises(ConversionError, match=rf"1 checkpoint variable\(s\) left over \['{extra}'\], 0 model"):
        convert_tf_checkpoint(tmp_path / "extra")
    gone = "model/resnet_model/block_groups/2/layers/1/conv2d_bn_layers/3/bn/gamma"
    _write_official(tf, model, tmp_path / "missing", drop=gone)
    with pytest.raises(ConversionError, match=rf"0 checkpoint variable\(s\) left over \[\], 1 model variable\(s\) missing \['{gone}'\]"):
        convert_tf_checkpoint(tmp_path / "missing")
    bias = "model/supervised_head/linear_layer/dense/bias"
    _write_official(tf, model, tmp_path / "bias", drop=bias)
    with pytest.raises(ConversionError, match="missing"):
        convert_tf_checkpoint(tmp_path / "bias")


def test_unsupported_inputs_fail_clearly(tf, tmp_path):
    prefix = str(tmp_path / "tf1" / "model.ckpt-5")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=["base_model/conv2d/kernel"], shape_and_slices=[""],
                      tensors=[tf.zeros((7, 7, 3, 64))])
    with pytest.raises(ConversionError, match=r"name-based \(TF1\) checkpoint \(base_model/conv2d/kernel"):
        convert_tf_checkpoint(prefix)
    other = tf.Module()
    other.w = tf.Variable(1.0)
    path = tf.train.Checkpoint(net=other).write(str(tmp_path / "other" / "ckpt"))
    with pytest.raises(ConversionError, match="no 'model' object"):
        convert_tf_checkpoint(path)
    with pytest.raises(ConversionError, match="no 'checkpoint' state file"):
        convert_tf_checkpoint(tmp_path)
    with pytest.raises(ConversionError, match="not a TF checkpoint prefix"):
        convert_tf_checkpoint(tmp_path / "nothing" / "ckpt-1")
    assert cli.main(["convert-tf", str(tmp_path / "nothing"), str(tmp_path / "out.pt")]) == 2


# ----------------------------------------------------------------------------- the official fixture B


@pytest.fixture(scope="module")
def fixture_b(reference_dir):
    folder = reference_dir / FIXTURE_B
    if not (folder / "checkpoint").is_dir():
        pytest.skip(f"{folder}/checkpoint not found")
    io = np.load(folder / "io.npz", allow_pickle=False)
    x = torch.from_numpy(io["input"]).permute(0, 3, 1, 2).contiguous()
    return folder, io, x


@pytest.fixture(scope="module")
def converted_b(tf, fixture_b):
    folder = fixture_b[0]
    return {kind: convert_tf_checkpoint(folder / sub) for kind, sub in
            (("checkpoint", "checkpoint"), ("saved_model", "saved_model/3"))}


@pytest.mark.parametrize("kind", ["checkpoint", "saved_model"])
def test_official_fixture_reproduces_tensorflow_outputs(fixture_b, converted_b, kind):
    _, io, x = fixture_b
    model, record = converted_b[kind]
    assert record["model_config"] == {"depth": 50, "width_multiplier": 0.125, "sk_ratio": 0.0, "cifar_stem": False,
                                      "num_proj_layers": 3, "proj_out_dim": 128, "ft_proj_selector": 0,
                                      "num_classes": 10, "mode": "pretrain"}
    assert not model.training
    with torch.no_grad():
        projection, logits = model(x)
        features = model.embed(x)
        hiddens = model.projection_head.hiddens(features)
        probabilities = model.predict(x)
    np.testing.assert_allclose(features.numpy(), io["encoder_features"], **TOL)
    np.testing.assert_allclose(projection.numpy(), io["proj_head_output"], **TOL)
    np.testing.assert_allclose(logits.numpy(), io["logits_sup"], **TOL)
    for k in (0, 1, 2, -1):
        np.testing.assert_allclose(hiddens[k].numpy(), io[f"proj_hidden_sel{k}"], **TOL)
    tf_logits = io["logits_sup"].astype(np.float64)
    tf_probabilities = np.exp(tf_logits - tf_logits.max(1, keepdims=True))
    tf_probabilities /= tf_probabilities.sum(1, keepdims=True)
    np.testing.assert_allclose(probabilities.numpy(), tf_probabilities, atol=1e-5)


def test_checkpoint_and_saved_model_hold_the_fixture_variables(fixture_b, converted_b):
    import json

    folder = fixture_b[0]
    variables = json.loads((folder / "variables.json").read_text())["variables"]
    arrays = np.load(folder / "variables.npz", allow_pickle=False)
    from_ckpt = converted_b["checkpoint"][0].state_dict()
    from_saved = converted_b["saved_model"][0].state_dict()
    mapping = official_key_map(converted_b["checkpoint"][0])
    assert len(variables) == len(mapping)
    for entry in variables:
        name, transform = mapping[strip_checkpoint_suffix(entry["checkpoint_key"])]
        np.testing.assert_array_equal(torch_to_official(from_ckpt[name], transform), arrays[entry["name"]])
        assert torch.equal(from_ckpt[name], from_saved[name]), name


def test_cli_conversion_is_accepted_by_load_model_and_the_api(tf, fixture_b, tmp_path, capsys):
    folder, io, x = fixture_b
    out = tmp_path / "r50.pt"
    assert cli.main(["convert-tf", str(folder / "checkpoint" / "ckpt-3"), str(out)]) == 0
    assert "R50 width 0.125" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    assert ckpt["stage"] == "converted" and ckpt["image_size"] == 224
    model, _ = load_model(str(out))
    finetune_model, _ = load_model(str(out), num_classes=3)
    assert finetune_model.supervised_head.linear.out_features == 3
    direct = simclrv2.load(folder / "saved_model")
    with torch.no_grad():
        np.testing.assert_allclose(model.eval()(x)[1].numpy(), io["logits_sup"], **TOL)
        np.testing.assert_allclose(direct.embed(x).numpy(), io["encoder_features"], **TOL)
    with torch.no_grad():
        assert math.isclose(float(simclrv2.load(out).predict(x).sum()), 4.0, rel_tol=1e-5)
    assert cli.main(["convert-tf", str(folder / "checkpoint"), str(tmp_path / "bad.pt"),
                     "--ft-proj-selector", "-1"]) == 2
    assert "selects a hidden of width 128" in capsys.readouterr().err
