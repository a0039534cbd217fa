"""Conversion of official SimCLRv2 TF2 checkpoints and SavedModels (``simclrv2.convert``).

* Architecture inference from checkpoint keys: pure, no TensorFlow needed (our own models' key
  maps at many depths/widths/SK settings, and the official R50-1x key lists of the fixtures).
* Fixture B (written by the official code): checkpoint and SavedModel convert to a model whose
  outputs equal TensorFlow's stored ones (README section 5 tolerances).
* Checkpoints in the official object layout at other depths, widths and SK settings, written here
  with plain ``tf.train.Checkpoint`` of nested ``tf.Module``s (the official code is not needed),
  one in several shards, convert back exactly; our reader and ``tf.train.load_checkpoint`` agree
  on every tensor; an extra or missing variable, a TF1 or a sliced checkpoint, a damaged file fail clearly.

Nothing here imports TensorFlow: the checkpoints TensorFlow writes, and what
``tf.train.load_checkpoint`` reads from them, come from one subprocess (skipped when TensorFlow is
not installed: ``pip install -e '.[tf]'``), and the CLI converts fixture B in fresh processes where
``import tensorflow`` fails.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import simclrv2
from simclrv2 import cli
from simclrv2.convert import ConversionError, convert_tf_checkpoint, infer_architecture, is_tf_source
from simclrv2.convert.architecture import ArchitectureError
from simclrv2.convert.tensor_bundle import TensorBundle
from simclrv2.convert.official_keys import official_key_map, strip_checkpoint_suffix, torch_to_official
from simclrv2.engine.checkpoint import load_checkpoint, load_model
from simclrv2.models import build_simclrv2_model

FIXTURE_B = "forward_B_r50_w0.125_sk0_64"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
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
    dict(resnet_depth=18, width_multiplier=1.0, sk_ratio=0.0, cifar_stem=True, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=10),
    dict(resnet_depth=34, width_multiplier=0.5, sk_ratio=0.0625, cifar_stem=False, num_proj_layers=2, proj_out_dim=64,
         ft_proj_selector=-1, num_classes=5),
    dict(resnet_depth=50, width_multiplier=0.3, sk_ratio=0.0, cifar_stem=False, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=None),
    dict(resnet_depth=101, width_multiplier=2.0, sk_ratio=0.0625, cifar_stem=False, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=1000),
    dict(resnet_depth=152, width_multiplier=3.0, sk_ratio=0.0625, cifar_stem=False, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=1000),
    dict(resnet_depth=200, width_multiplier=0.25, sk_ratio=0.5, cifar_stem=True, num_proj_layers=0, proj_out_dim=128,
         ft_proj_selector=0, num_classes=3),
]


@pytest.mark.parametrize("kwargs", INFERENCE_CASES, ids=lambda k: f"r{k['resnet_depth']}-w{k['width_multiplier']}-sk{k['sk_ratio']}")
def test_architecture_inferred_from_our_key_maps(kwargs):
    with torch.device("meta"):
        model = build_simclrv2_model(**kwargs)
        arch = asdict(infer_architecture(_official_shapes(model)))
        rebuilt = build_simclrv2_model(**arch)
    assert _same_channels(model, rebuilt)
    for key in ("resnet_depth", "cifar_stem", "num_proj_layers", "num_classes", "ft_proj_selector"):
        assert arch[key] == kwargs[key], key
    assert (arch["sk_ratio"] > 0) == (kwargs["sk_ratio"] > 0)
    if kwargs["width_multiplier"] * 512 == int(kwargs["width_multiplier"] * 512):
        assert arch["width_multiplier"] == kwargs["width_multiplier"]
    if kwargs["num_proj_layers"]:
        assert arch["proj_out_dim"] == kwargs["proj_out_dim"]


def test_non_paper_sk_ratio_is_read_from_the_squeeze_widths():
    with torch.device("meta"):
        model = build_simclrv2_model(resnet_depth=50, width_multiplier=1.0, sk_ratio=0.125)
    assert infer_architecture(_official_shapes(model)).sk_ratio == 0.125


@pytest.mark.parametrize("config", ["r50_1x_sk0_imagenet", "r50_1x_sk1_imagenet"])
def test_architecture_of_official_full_size_key_lists(reference_dir, config):
    entry = json.loads((reference_dir / "variable_names_full_size.json").read_text())["configs"][config]
    shapes = {strip_checkpoint_suffix(k): v for k, v in entry["checkpoint_keys_and_shapes"].items()
              if k.startswith("model/") and ".OPTIMIZER_SLOT" not in k}
    arch = asdict(infer_architecture(shapes))
    assert arch == {"resnet_depth": 50, "width_multiplier": 1.0, "sk_ratio": 0.0625 if "sk1" in config else 0.0,
                    "cifar_stem": False, "num_proj_layers": 3, "proj_out_dim": 128, "ft_proj_selector": 0,
                    "num_classes": entry["num_classes"]}


def test_inference_rejects_what_no_official_model_has():
    with torch.device("meta"):
        shapes = _official_shapes(build_simclrv2_model(resnet_depth=50, width_multiplier=0.25, num_classes=10))
    gone = {k: v for k, v in shapes.items() if "/block_groups/2/layers/5/" not in k}
    with pytest.raises(ArchitectureError, match=r"\[3, 4, 5, 3\] match no supported ResNet depth"):
        infer_architecture(gone)
    with pytest.raises(ArchitectureError, match="no variable .*initial_conv_relu_max_pool/0"):
        infer_architecture({k: v for k, v in shapes.items() if "initial_conv" not in k})
    with pytest.raises(ArchitectureError, match="selects a hidden of width 128"):
        infer_architecture(shapes, ft_proj_selector=-1)
    with pytest.raises(ArchitectureError, match="outside the 3-layer projection head"):
        infer_architecture(shapes, ft_proj_selector=4)
    assert infer_architecture(shapes, ft_proj_selector=2).ft_proj_selector == 2


# ----------------------------------------------------------------------------- TensorFlow-written checkpoints

# Run in a subprocess: TensorFlow is a test-only dependency, and importing it before torch's
# compiler stack (triton) crashes some machines. The script writes checkpoints in the official
# object layout with plain nested ``tf.Module``s (the official code is not needed) and dumps what
# ``tf.train.load_checkpoint`` reads from every written bundle, and from fixture B's.
TF_WRITER = r"""
import json, os, sys
import numpy as np
import tensorflow as tf


def put(root, parts, value):
    for part in parts[:-1]:
        if not hasattr(root, part):
            setattr(root, part, tf.Module())
        root = getattr(root, part)
    setattr(root, parts[-1], value)


class Alternate(tf.train.experimental.ShardingCallback):
    @property
    def description(self):
        return "whole tensors, alternating between two shards"

    def __call__(self, shardable_tensors):
        shards = [{}, {}]
        for i, t in enumerate(shardable_tensors):
            shards[i % 2].setdefault(t.checkpoint_key, {})[t.slice_spec] = t.tensor
        return shards


def official(arrays, folder, sharding):
    # sharding: None (one shard), "alternate" (two shards), or a maximum shard size in bytes
    # (TF's policy, which cuts tensors into slices at shard boundaries)
    root = tf.Module()
    for key, value in np.load(arrays).items():
        put(root, key.split("/")[1:], tf.Variable(value))
    optimizer = tf.Module()
    optimizer.momentum = tf.Variable(np.zeros(3, np.float32))
    checkpoint = tf.train.Checkpoint(model=root, global_step=tf.Variable(7, dtype=tf.int64), optimizer=optimizer)
    options = None
    if sharding is not None:
        policy = Alternate() if sharding == "alternate" else tf.train.experimental.MaxShardSizePolicy(sharding)
        options = tf.train.CheckpointOptions(experimental_sharding_callback=policy)
    manager = tf.train.CheckpointManager(checkpoint, folder, max_to_keep=1)
    return manager.save(checkpoint_number=7, options=options)


def dump(prefix, out):
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    arrays, listing = {}, {}
    for i, (name, shape) in enumerate(sorted(reader.get_variable_to_shape_map().items())):
        value = reader.get_tensor(name)
        arrays[f"t{i}"] = np.frombuffer(value, np.uint8) if dtypes[name] == tf.string else np.asarray(value)
        listing[name] = {"array": f"t{i}", "dtype": dtypes[name].name, "shape": list(shape)}
    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as f:
        json.dump(listing, f)


job = json.load(open(sys.argv[1]))
written = {name: official(**spec) for name, spec in job["official"].items()}
tf.raw_ops.SaveV2(prefix=job["tf1"], tensor_names=["base_model/conv2d/kernel"], shape_and_slices=[""],
                  tensors=[tf.zeros((7, 7, 3, 64))])
other = tf.Module()
other.w = tf.Variable(1.0)
written.update(tf1=job["tf1"], other=tf.train.Checkpoint(net=other).write(job["other"]))
for name, prefix in {**written, **job["dump_also"]}.items():
    dump(prefix, os.path.join(job["out"], name))
with open(os.path.join(job["out"], "written.json"), "w") as f:
    json.dump(written, f)
"""


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


def _official_arrays(model, drop: str | None = None, extra: str | None = None) -> dict:
    """``{structural key: array}`` of ``model`` in TF layout, as the official ``run.py`` stores it."""
    state = model.state_dict()
    arrays = {key: torch_to_official(state[name], transform)
              for key, (name, transform) in official_key_map(model).items() if key != drop}
    if extra is not None:
        arrays[extra] = np.zeros((1, 1, 4, 4), np.float32)
    return arrays


TF_CASES = [
    dict(resnet_depth=18, width_multiplier=0.25, sk_ratio=0.0625, cifar_stem=False, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=7),
    dict(resnet_depth=34, width_multiplier=0.125, sk_ratio=0.0, cifar_stem=True, num_proj_layers=2, proj_out_dim=16,
         ft_proj_selector=-1, num_classes=5),
    dict(resnet_depth=50, width_multiplier=0.25, sk_ratio=0.5, cifar_stem=False, num_proj_layers=3, proj_out_dim=128,
         ft_proj_selector=0, num_classes=None),
    dict(resnet_depth=101, width_multiplier=0.1, sk_ratio=0.0, cifar_stem=False, num_proj_layers=1, proj_out_dim=32,
         ft_proj_selector=0, num_classes=4),
]
SMALL = dict(resnet_depth=18, width_multiplier=0.125, num_classes=3)
EXTRA = "model/resnet_model/block_groups/1/layers/0/se_layer/conv2d/kernel"
GONE = "model/resnet_model/block_groups/2/layers/1/conv2d_bn_layers/3/bn/gamma"
BIAS = "model/supervised_head/linear_layer/dense/bias"


def _case_id(kwargs) -> str:
    return f"r{kwargs['resnet_depth']}-w{kwargs['width_multiplier']}-sk{kwargs['sk_ratio']}"


@pytest.fixture(scope="module")
def tf_written(tmp_path_factory, request):
    """Checkpoints written by TensorFlow in a subprocess: the official layout of ``TF_CASES``
    (by id), ``SMALL`` with an extra or a missing variable, ``SMALL`` in two shards and in
    slices, a TF1 name-based checkpoint and an object-based one without ``model``; plus TF's reading
    of each (and of fixture B when present). Returns (models, {name: prefix}, dump folder)."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed (pip install -e '.[tf]'); it writes these test checkpoints")
    root = tmp_path_factory.mktemp("tf")
    models = {_case_id(k): _randomised(build_simclrv2_model(**k)) for k in TF_CASES}
    models["small"] = _randomised(build_simclrv2_model(**SMALL))
    arrays = {name: _official_arrays(model) for name, model in models.items()}
    small = models["small"]
    arrays.update(extra=_official_arrays(small, extra=EXTRA), missing=_official_arrays(small, drop=GONE),
                  bias=_official_arrays(small, drop=BIAS))
    jobs = {}
    for name, values in arrays.items():
        np.savez(root / f"{name}.npz", **values)
        jobs[name] = dict(arrays=str(root / f"{name}.npz"), folder=str(root / name), sharding=None)
    jobs["sharded"] = dict(jobs["small"], folder=str(root / "sharded"), sharding="alternate")
    jobs["sliced"] = dict(jobs["small"], folder=str(root / "sliced"),
                          sharding=max(a.nbytes for a in arrays["small"].values()) // 2)
    dump_also = {}
    try:
        fixture = request.getfixturevalue("reference_dir") / FIXTURE_B
        dump_also = {"fixture_checkpoint": str(fixture / "checkpoint" / "ckpt-3"),
                     "fixture_saved_model": str(fixture / "saved_model" / "3" / "variables" / "variables")}
    except pytest.skip.Exception:
        pass
    (root / "dumps").mkdir()
    job = dict(official=jobs, tf1=str(root / "tf1" / "model.ckpt-5"), other=str(root / "other" / "ckpt"),
               dump_also=dump_also, out=str(root / "dumps"))
    (root / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", TF_WRITER, str(root / "job.json")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = {name: Path(p) for name, p in json.loads((root / "dumps" / "written.json").read_text()).items()}
    return models, {**written, **{k: Path(v) for k, v in dump_also.items()}}, root / "dumps"


def test_reader_matches_tensorflow_on_every_tensor(tf_written):
    """Our reader and ``tf.train.load_checkpoint`` agree on the keys, dtypes, shapes and values of
    every tensor of every checkpoint TF wrote, one of them in several shards, and of fixture B's
    checkpoint and SavedModel variables."""
    _, prefixes, dumps = tf_written
    assert TensorBundle(prefixes["sharded"]).num_shards > 1
    for name, prefix in prefixes.items():
        listing = json.loads((dumps / f"{name}.json").read_text())
        values = np.load(dumps / f"{name}.npz", allow_pickle=False)
        bundle = TensorBundle(prefix)
        assert sorted(bundle.keys()) == sorted(listing), name
        for key, entry in listing.items():
            assert list(bundle.shape(key)) == entry["shape"], (name, key)
            if name == "sliced" and key.startswith("model/") and bundle.entries[key].sliced:
                continue
            ours, theirs = bundle.read(key), values[entry["array"]]
            if entry["dtype"] == "string":
                assert ours.shape == () and ours.item() == theirs.tobytes(), (name, key)
            else:
                assert ours.dtype.name == entry["dtype"] == theirs.dtype.name, (name, key)
                np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} {key}")


def _assert_converts_exactly(model, prefix: Path, out: Path) -> dict:
    converted, record = convert_tf_checkpoint(prefix.parent, out)
    assert _same_channels(model, converted)
    expected = model.state_dict()
    for name, tensor in converted.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, expected[name]), name
    assert record["config"]["source_global_step"] == 7 and record["stage"] == "converted"
    return record


@pytest.mark.parametrize("kwargs", TF_CASES, ids=_case_id)
def test_official_layout_checkpoints_convert_exactly(tf_written, tmp_path, kwargs):
    models, prefixes, _ = tf_written
    model, prefix = models[_case_id(kwargs)], prefixes[_case_id(kwargs)]
    assert prefix.name == "ckpt-7" and is_tf_source(prefix.parent) and is_tf_source(prefix)
    record = _assert_converts_exactly(model, prefix, tmp_path / "converted.pt")
    config = {**record["model_spec"], "mode": record["mode"]}
    assert {k: config[k] for k in ("resnet_depth", "cifar_stem", "num_proj_layers", "num_classes", "ft_proj_selector")} == \
        {k: kwargs[k] for k in ("resnet_depth", "cifar_stem", "num_proj_layers", "num_classes", "ft_proj_selector")}
    assert config["sk_ratio"] == kwargs["sk_ratio"]
    x = torch.rand(2, 3, 32, 32)
    loaded = simclrv2.load(tmp_path / "converted.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), model.embed(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_multi_shard_checkpoint_converts_and_sliced_one_is_refused(tf_written, tmp_path):
    models, prefixes, _ = tf_written
    _assert_converts_exactly(models["small"], prefixes["sharded"], tmp_path / "sharded.pt")
    with pytest.raises(ConversionError, match="saved in slices .* re-save it unpartitioned"):
        convert_tf_checkpoint(prefixes["sliced"])


def test_extra_or_missing_variables_fail_clearly(tf_written):
    _, prefixes, _ = tf_written
    with pytest.raises(ConversionError, match=rf"1 checkpoint variable\(s\) left over \['{EXTRA}'\], 0 model"):
        convert_tf_checkpoint(prefixes["extra"].parent)
    with pytest.raises(ConversionError, match=rf"0 checkpoint variable\(s\) left over \[\], 1 model variable\(s\) missing \['{GONE}'\]"):
        convert_tf_checkpoint(prefixes["missing"].parent)
    with pytest.raises(ConversionError, match="missing"):
        convert_tf_checkpoint(prefixes["bias"].parent)


def test_unsupported_inputs_fail_clearly(tf_written, tmp_path):
    _, prefixes, _ = tf_written
    with pytest.raises(ConversionError, match=r"name-based \(TF1\) checkpoint \(base_model/conv2d/kernel"):
        convert_tf_checkpoint(prefixes["tf1"])
    with pytest.raises(ConversionError, match="no 'model' object"):
        convert_tf_checkpoint(prefixes["other"])
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
def converted_b(fixture_b):
    folder = fixture_b[0]
    return {kind: convert_tf_checkpoint(folder / sub) for kind, sub in
            (("checkpoint", "checkpoint"), ("saved_model", "saved_model/3"))}


def _assert_tensorflow_outputs(model, io, x) -> None:
    """README section 5 tolerances against the outputs TensorFlow stored in ``io.npz``."""
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


@pytest.mark.parametrize("kind", ["checkpoint", "saved_model"])
def test_official_fixture_reproduces_tensorflow_outputs(fixture_b, converted_b, kind):
    _, io, x = fixture_b
    model, record = converted_b[kind]
    assert {**record["model_spec"], "mode": record["mode"]} == {"resnet_depth": 50, "width_multiplier": 0.125, "sk_ratio": 0.0, "cifar_stem": False,
                                      "num_proj_layers": 3, "proj_out_dim": 128, "ft_proj_selector": 0,
                                      "num_classes": 10, "mode": "pretrain"}
    _assert_tensorflow_outputs(model, io, x)


def test_checkpoint_and_saved_model_hold_the_fixture_variables(fixture_b, converted_b):
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


def test_damaged_fixture_fails_with_one_line(fixture_b, tmp_path):
    folder = fixture_b[0]
    for source in (folder / "checkpoint").iterdir():
        shutil.copyfile(source, tmp_path / source.name)
    bundle = TensorBundle(tmp_path / "ckpt-3")
    kernel = "model/resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    data = bytearray((tmp_path / "ckpt-3.data-00000-of-00001").read_bytes())
    data[bundle.entries[kernel].offset + 5] ^= 0x40
    (tmp_path / "ckpt-3.data-00000-of-00001").write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="initial_conv_relu_max_pool/0/conv2d/kernel.* fails its crc32c check"):
        convert_tf_checkpoint(tmp_path)
    assert cli.main(["convert-tf", str(tmp_path), str(tmp_path / "out.pt")]) == 2
    assert not (tmp_path / "out.pt").exists()


def test_cli_conversion_is_accepted_by_load_model_and_the_api(fixture_b, tmp_path, capsys):
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


# A package that shadows TensorFlow: importing it records the attempt and fails. sitecustomize
# records, when the process ends, which TensorFlow modules it holds.
BLOCKED_TENSORFLOW = """
import os
open(os.environ["TF_IMPORT_MARKER"], "w").close()
raise ImportError("TensorFlow is blocked in this test")
"""
MODULES_AT_EXIT = """
import atexit, os, sys
atexit.register(lambda: open(os.environ["TF_MODULES_AT_EXIT"], "w").write(
    " ".join(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras"))))
"""


@pytest.mark.parametrize("kind, source", [("checkpoint", "checkpoint/ckpt-3"), ("saved_model", "saved_model")])
def test_cli_converts_in_a_fresh_process_without_tensorflow(fixture_b, tmp_path, kind, source):
    """``python -m simclrv2 convert-tf`` in a new process where ``import tensorflow`` fails: no
    import is attempted, none is held at exit, and the result gives TensorFlow's outputs. A fresh
    process also catches import-order crashes (TensorFlow before triton segfaults on some CPUs)
    that a pytest process, with torch's compiler stack already imported, would hide."""
    folder, io, x = fixture_b
    shadow = tmp_path / "shadow"
    (shadow / "tensorflow").mkdir(parents=True)
    (shadow / "tensorflow" / "__init__.py").write_text(BLOCKED_TENSORFLOW)
    (shadow / "sitecustomize.py").write_text(MODULES_AT_EXIT)
    marker, at_exit, out = tmp_path / "tf-import-attempted", tmp_path / "tf-modules-at-exit", tmp_path / "b.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(PROJECT_ROOT)]),
           "TF_IMPORT_MARKER": str(marker), "TF_MODULES_AT_EXIT": str(at_exit)}
    done = subprocess.run([sys.executable, "-m", "simclrv2", "convert-tf", str(folder / source), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"converted {kind}" in done.stdout
    assert not marker.exists(), "convert-tf tried to import tensorflow"
    assert at_exit.read_text() == ""
    _assert_tensorflow_outputs(simclrv2.load(out), io, x)
