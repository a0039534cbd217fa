"""Export a SimCLRv2 model for use outside this package: torchvision, safetensors or ONNX.

* ``torchvision``: the encoder (width 1x, no selective kernels) as a plain torchvision ResNet state
  dict. Our names equal torchvision's except ``stem.conv1``/``stem.bn1`` -> ``conv1``/``bn1``; a
  supervised head reading the encoder output (``ft_proj_selector`` 0) becomes ``fc``. It loads
  into ``torchvision.models.resnet50(num_classes=...)`` etc. as it is; ``torchvision_resnet``
  also handles what the stock constructors lack (the stride-1 projection shortcut of our
  ResNet-18/34 ``layer1.0``, the CIFAR stem, ResNet-200) and can swap in the TF ``SAME`` max-pool.
  torchvision's ``MaxPool2d(3, 2, padding=1)`` pads one cell on every side where TF ``SAME`` pads
  only bottom/right for even sizes, so torchvision's outputs differ from ours whenever the stem
  output size is even (224 px inputs; a one-pixel shift of the pooling windows, far from
  negligible: see docs/checkpoints.md for measured numbers) and equal ours when it is odd.
* ``safetensors``: the whole model's state dict, with the architecture in the metadata so that
  ``simclrv2.load`` rebuilds it; works for every encoder.
* ``onnx``: a graph from images (N, 3, H, W) in [0, 1] to ``features`` (pooled encoder output),
  ``projection`` and, with a supervised head, ``logits``; the batch is dynamic, H and W are
  fixed at export because the TF ``SAME`` paddings depend on them. Needs the ``export`` extra
  (``pip install 'simclrv2[export]'``: onnx, and onnxruntime for the check of the written graph).
* ``hf``: a folder for the Hugging Face Hub (``simclrv2.hub``): safetensors, ``config.json`` and
  a model card with the run's results.

Every file is written atomically (a temporary file renamed into place; the ``hf`` folder is
written as a temporary sibling folder and renamed), so an export that exists is complete. An
existing output is replaced only with ``force=True`` (``--force``), and a folder only when it is
an earlier ``hf`` export.
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from simclrv2.engine.checkpoint import CheckpointError, atomic_save, atomic_write, read_format2_model_config
from simclrv2.models import ModelSpec, SimCLRv2Model
from simclrv2.models.resnet import MaxPool2dSame

FORMATS = ("torchvision", "safetensors", "onnx", "hf")
SAFETENSORS_SPEC_KEY = "simclrv2_model_spec"
SAFETENSORS_FORMAT2_KEY = "simclrv2_model_config"  # before format 3: spec and mode in one builder-argument dict
ONNX_OPSET = 17
ONNX_MAX_BYTES = 2**31 - 2**24  # one protobuf message holds < 2 GiB; leave room for the graph itself
_TORCHVISION_DEPTHS = {("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
                       ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152,
                       ("bottleneck", (3, 24, 36, 3)): 200}


class ExportError(ValueError):
    """The model cannot be exported in the requested format."""


# ----------------------------------------------------------------------------- torchvision


def torchvision_state_dict(model: SimCLRv2Model) -> Dict[str, torch.Tensor]:
    """The encoder (and a supervised head on the encoder output, as ``fc``) under torchvision names."""
    encoder = model.encoder
    if encoder.sk_ratio > 0:
        raise ExportError("selective-kernel / ResNet-D encoders (sk_ratio > 0) have no torchvision counterpart; "
                          "export with --format safetensors or onnx")
    if encoder.width_multiplier != 1:
        raise ExportError(f"torchvision ResNets have width 1x only, this encoder has width "
                          f"{encoder.width_multiplier:g}; export with --format safetensors or onnx")
    state = {}
    for name, tensor in encoder.state_dict().items():
        if name.startswith("stem."):
            name = name[len("stem."):]
        state[name] = tensor.detach().clone()
    head, selector = model.supervised_head, model.projection_head.ft_proj_selector
    reads_encoder = selector == 0 or (selector == -1 and model.projection_head.num_layers == 0)
    if head is not None and reads_encoder:
        state["fc.weight"] = head.linear.weight.detach().clone()
        state["fc.bias"] = head.linear.bias.detach().clone()
    return state


def _block_counts(state: Mapping[str, torch.Tensor]) -> tuple:
    counts = []
    for g in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{g}.")}
        counts.append(len(blocks))
    return tuple(counts)


def torchvision_resnet(state: Mapping[str, torch.Tensor], tf_same_pool: bool = False) -> nn.Module:
    """A ``torchvision.models.ResNet`` (eval mode) holding a ``torchvision_state_dict``.

    The stock constructors fit R50/101/152 directly; here R18/34 get the 1x1 projection shortcut
    that SimCLRv2 puts on ``layer1.0``, a CIFAR-stem state gets a 3x3 stride-1 ``conv1`` and no
    max-pool, and a state without ``fc`` keeps a fresh 1000-way ``fc``. ``tf_same_pool=True``
    replaces the max-pool by the TF ``SAME`` one, which makes the outputs equal ours.
    """
    from torchvision.models import resnet as tv

    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    counts = _block_counts(state)
    if (kind, counts) not in _TORCHVISION_DEPTHS:
        raise ExportError(f"{kind} blocks per group {list(counts)} match no ResNet depth")
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    net = tv.ResNet(tv.Bottleneck if kind == "bottleneck" else tv.BasicBlock, list(counts), num_classes=num_classes)
    if state["conv1.weight"].shape[-1] == 3:
        net.conv1 = nn.Conv2d(3, state["conv1.weight"].shape[0], 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif tf_same_pool:
        net.maxpool = MaxPool2dSame(3, 2)
    if kind == "basic" and "layer1.0.downsample.0.weight" in state:
        channels = state["layer1.0.downsample.0.weight"].shape[0]
        net.layer1[0].downsample = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not ("fc.weight" not in state and k.startswith("fc."))]
    if missing or unexpected:
        raise ExportError(f"state does not fit torchvision's ResNet: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return net.eval()


# ----------------------------------------------------------------------------- safetensors


def safetensors_bytes(model: SimCLRv2Model, classes: Optional[list] = None) -> bytes:
    """The model's state dict as safetensors, with its spec, mode, image size and class names as
    metadata."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {SAFETENSORS_SPEC_KEY: json.dumps(asdict(model.spec)), "mode": model.mode, "format": "simclrv2"}
    if model.image_size is not None:
        metadata["image_size"] = str(model.image_size)
    if classes:
        metadata["classes"] = json.dumps(list(classes))
    return save(state, metadata=metadata)


def save_safetensors(model: SimCLRv2Model, path: str | Path, classes: Optional[list] = None) -> None:
    """``safetensors_bytes`` written atomically to ``path``."""
    data = safetensors_bytes(model, classes)
    atomic_write(Path(path), lambda handle: handle.write(data))


def model_from_spec(spec: ModelSpec, mode: str, state: Mapping[str, torch.Tensor], image_size: Optional[int],
                    source: str) -> SimCLRv2Model:
    """The model ``spec`` describes, in ``mode``, holding ``state``."""
    try:
        with torch.device("meta"):  # no random init: every tensor comes from the file
            model = SimCLRv2Model.from_spec(spec)
        model.load_state_dict(state, strict=True, assign=True)
        model.mode = mode
        model.image_size = None if image_size is None else int(image_size)
    except (TypeError, ValueError, RuntimeError) as err:
        detail = next((line.strip() for line in str(err).splitlines() if line.strip()), repr(err))
        raise CheckpointError(f"{source} does not fit its recorded architecture: {detail}") from None
    return model


def read_spec(spec: Any, mode: Any, format2_config: Any, source: str) -> tuple[ModelSpec, str]:
    """(spec, mode) an export records; exports before format 3 hold format 2's ``model_config``."""
    try:
        if spec is None:
            return read_format2_model_config(format2_config)
        return ModelSpec(**spec), mode or "pretrain"
    except (TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{source} records an architecture this simclrv2 cannot read ({err!r})") from None


def read_safetensors(path: str | Path) -> tuple[SimCLRv2Model, Optional[list]]:
    """(model, class names or None) of a file written by ``save_safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if SAFETENSORS_SPEC_KEY not in metadata and SAFETENSORS_FORMAT2_KEY not in metadata:
        raise ExportError(f"{path} has no {SAFETENSORS_SPEC_KEY} metadata; it was not written by simclrv2 export")
    spec, mode = read_spec(json.loads(metadata.get(SAFETENSORS_SPEC_KEY, "null")), metadata.get("mode"),
                           json.loads(metadata.get(SAFETENSORS_FORMAT2_KEY, "null")), str(path))
    model = model_from_spec(spec, mode, load_file(str(path)), metadata.get("image_size"), str(path))
    return model, json.loads(metadata["classes"]) if "classes" in metadata else None


def load_safetensors(path: str | Path) -> SimCLRv2Model:
    """Rebuild a model written by ``save_safetensors``."""
    return read_safetensors(path)[0]


# ----------------------------------------------------------------------------- ONNX


class InferenceOutputs(nn.Module):
    """``images -> (features, projection[, logits])`` in eval semantics, the graph exported to ONNX."""

    def __init__(self, model: SimCLRv2Model) -> None:
        super().__init__()
        self.model = model

    @property
    def output_names(self) -> List[str]:
        return ["features", "projection"] + ([] if self.model.supervised_head is None else ["logits"])

    def forward(self, images: torch.Tensor) -> tuple:
        features = self.model.encoder(images)
        hiddens = self.model.projection_head.hiddens(features)
        outputs = (features, hiddens[-1])
        if self.model.supervised_head is not None:
            selected = hiddens[self.model.projection_head.ft_proj_selector]
            outputs += (self.model.supervised_head(selected),)
        return outputs


def require_onnx() -> None:
    """Fail in one line, naming the extra, where the ``onnx`` package (which the exporter needs) is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'simclrv2[export]'") from None


def export_onnx(model: SimCLRv2Model, path: str | Path, image_size: int, opset: int = ONNX_OPSET) -> List[str]:
    """Write (atomically) the ONNX graph of ``InferenceOutputs`` for ``image_size`` x ``image_size``
    inputs and a dynamic batch (TorchScript-based exporter); returns the output names."""
    require_onnx()
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size > ONNX_MAX_BYTES:
        raise ExportError(f"the model's {size / 2**30:.1f} GiB of weights exceed what one ONNX file holds (2 GiB); "
                          "export with --format safetensors")
    wrapper = InferenceOutputs(model).eval()
    names = wrapper.output_names
    example = torch.rand(2, 3, image_size, image_size)

    def write(handle) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), handle, dynamo=False, input_names=["images"], output_names=names,
                              dynamic_axes={n: {0: "batch"} for n in ["images", *names]}, opset_version=opset)
    atomic_write(Path(path), write)
    return names


def onnx_max_difference(model: SimCLRv2Model, path: str | Path, image_size: int, batch: int = 3) -> Dict[str, float]:
    """Largest |onnxruntime - PyTorch| per output on random images (a batch size unlike the export's)."""
    import onnxruntime

    wrapper = InferenceOutputs(model).eval()
    images = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = wrapper(images)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})
    return {name: float((torch.from_numpy(g) - e).abs().max()) for name, g, e in zip(wrapper.output_names, got, expected)}


# ----------------------------------------------------------------------------- one entry point


def check_output(out: Path, fmt: str, force: bool) -> None:
    """Refuse an output that exists unless ``force``; never replace a folder other than an ``hf`` export."""
    from simclrv2.hub import is_export_folder, recover_folder

    if fmt == "hf":
        recover_folder(out)
    if fmt != "hf" and out.is_dir():
        raise ExportError(f"output {out} is a folder; name the file to write")
    if fmt == "hf" and out.exists() and not out.is_dir():
        raise ExportError(f"output {out} is a file; --format hf writes a folder")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if fmt == "hf" and not is_export_folder(out):
        raise ExportError(f"output {out} is a folder that simclrv2 export did not write; choose a new folder")
    if not force:
        raise ExportError(f"output {out} already exists; pass --force to replace it, or choose another path")


def export_model(model: SimCLRv2Model, out: str | Path, fmt: str, image_size: int = 224, force: bool = False,
                 classes: Optional[list] = None, run_dir: Optional[Path] = None) -> List[str]:
    """Write ``model`` to ``out`` in ``fmt`` (one of ``FORMATS``); returns lines describing the result.
    ``classes`` (the class names) go into the safetensors metadata and the ``hf`` config, ``run_dir``'s
    results into the ``hf`` model card."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_output(out, fmt, force)
    if fmt == "onnx":
        require_onnx()
        if image_size <= 0:
            raise ExportError(f"--image-size must be positive, got {image_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()  # exports are made on the CPU; the caller's model stays put
    model = model.eval()
    if fmt == "torchvision":
        state = torchvision_state_dict(model)
        atomic_save(state, out)
        depth = model.encoder.depth
        lines = [f"wrote a torchvision resnet{depth} state dict ({len(state)} tensors) to {out}",
                 "inputs are RGB in [0, 1] without mean/std normalisation; torchvision's max-pool pads differently "
                 "from TF SAME (see simclrv2.export.torchvision_resnet(..., tf_same_pool=True))"]
        if "fc.weight" not in state:
            lines.append("no fc: load with strict=False (the supervised head, if any, does not read the encoder output)")
        if depth in (18, 34) or model.encoder.cifar_stem:
            lines.append("layer1.0.downsample or the CIFAR stem need simclrv2.export.torchvision_resnet(state) "
                         "instead of the stock constructor")
        return lines
    if fmt == "safetensors":
        save_safetensors(model, out, classes)
        return [f"wrote {out} (load with simclrv2.load or safetensors.torch.load_file)"]
    if fmt == "hf":
        from simclrv2.hub import write_folder

        return write_folder(model, out, classes, run_dir)
    names = export_onnx(model, out, image_size)
    lines = [f"wrote {out}: images (N, 3, {image_size}, {image_size}) in [0, 1] -> {', '.join(names)}"]
    try:
        diffs = onnx_max_difference(model, out, image_size)
    except ImportError:
        return lines + ["onnxruntime is not installed, so the graph was not checked (pip install 'simclrv2[export]')"]
    lines.append("onnxruntime check, max |diff| vs PyTorch: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return lines
