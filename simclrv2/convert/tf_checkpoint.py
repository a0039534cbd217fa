"""Read the model variables of an official SimCLRv2 TF2 checkpoint or SavedModel by structural key.

The official ``run.py`` writes ``tf.train.Checkpoint(model=..., global_step=..., optimizer=...)``
checkpoints and ``run.save`` writes SavedModels. Both store a ``_CHECKPOINTABLE_OBJECT_GRAPH``: the
tree of tracked objects (``model -> resnet_model -> block_groups -> 0 -> layers -> ...``) with the
variables at its leaves. A checkpoint names each tensor by its first path in that graph
(``model/resnet_model/...``); a SavedModel names it by the first path Keras offers
(``model/resnet_model/variables/17``), but its object graph still holds the structural edges.
So both are read the same way: walk the object graph from ``model``, skipping Keras'
bookkeeping edges (``variables``, ``keras_api``, ...), and key every variable by its structural
path, the key ``simclrv2.convert.official_keys`` uses. No TF model is built, and TensorFlow is not
needed: ``tensor_bundle`` reads the files and ``protowire`` the object graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .errors import ConversionError
from .protowire import Field, WireError, decode
from .tensor_bundle import TensorBundle

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
VARIABLE_ATTRIBUTE = "VARIABLE_VALUE"
MODEL_EDGE = "model"
BOOKKEEPING_EDGES = frozenset({
    "variables", "trainable_variables", "non_trainable_variables", "trainable_weights", "non_trainable_weights",
    "regularization_losses", "keras_api", "signatures", "trainable_variables_list", "__call__",
    "call_and_return_all_conditional_losses", "call_and_return_conditional_losses",
})
MAX_PATHS = 100_000  # an official R152-3x checkpoint has a few thousand
MAX_DEPTH = 64  # official keys nest about 12 objects deep
MAX_STATE_FILE_BYTES = 1 << 20
GLOBAL_STEP_KEY = "global_step/.ATTRIBUTES/VARIABLE_VALUE"
OBJECT_GRAPH = {1: Field("nodes", {  # tensorflow/core/protobuf/trackable_object_graph.proto
    1: Field("children", {1: Field("node_id", "int"), 2: Field("local_name", "string")}, repeated=True),
    2: Field("attributes", {1: Field("name", "string"), 3: Field("checkpoint_key", "string")}, repeated=True),
}, repeated=True)}


@dataclass(frozen=True)
class Node:
    """One object of the checkpoint's object graph: its named children and its variable's tensor name."""

    children: Tuple[Tuple[str, int], ...]
    tensor: str | None = None


@dataclass
class OfficialVariables:
    """Model variables of an official checkpoint.

    ``keys`` maps each structural key (no ``/.ATTRIBUTES/VARIABLE_VALUE``) to its node; ``names``
    gives every model variable node a display name (its first structural key, else its tensor name).
    """

    source: str
    kind: str
    prefix: str
    keys: Dict[str, int]
    names: Dict[int, str]
    tensors: Dict[int, str]
    shapes: Dict[str, Tuple[int, ...]]
    global_step: int | None
    bundle: TensorBundle = field(repr=False)

    def read(self, key: str) -> np.ndarray:
        """The array of the variable at structural ``key``."""
        return self.bundle.read(self.tensors[self.keys[key]])


def _state_file_prefix(folder: Path) -> Path:
    """Newest checkpoint named by a ``checkpoint`` state file; also works for copied folders whose
    state file records absolute paths from another machine."""
    state = folder / "checkpoint"
    if state.stat().st_size > MAX_STATE_FILE_BYTES:
        raise ConversionError(f"{state} is too large for a checkpoint state file; pass the checkpoint prefix instead")
    for line in state.read_bytes().decode("utf-8", errors="replace").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model_checkpoint_path":
            recorded = Path(value.strip().strip('"'))
            for candidate in (recorded, folder / recorded, folder / recorded.name):
                if Path(f"{candidate}.index").exists():
                    return candidate
            raise ConversionError(f"{folder}/checkpoint names {recorded}, but no {recorded.name}.index is in {folder}")
    raise ConversionError(f"{folder}/checkpoint has no model_checkpoint_path line; pass the checkpoint prefix instead")


def resolve_source(path: str | Path) -> Tuple[Path, str]:
    """(checkpoint prefix, ``"checkpoint"`` or ``"saved_model"``) for a checkpoint prefix (or its
    ``.index``/``.data-*`` file), a folder with a ``checkpoint`` state file, a SavedModel folder, or a
    folder of numbered SavedModels (``run.save`` writes ``saved_model/<step>/``; the newest is used)."""
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return path / "variables" / "variables", "saved_model"
        if (path / "checkpoint").is_file():
            return _state_file_prefix(path), "checkpoint"
        numbered = sorted((int(d.name), d) for d in path.iterdir() if d.name.isdecimal() and (d / "saved_model.pb").is_file())
        if numbered:
            return numbered[-1][1] / "variables" / "variables", "saved_model"
        raise ConversionError(f"{path} holds no 'checkpoint' state file, saved_model.pb or numbered SavedModel folder; "
                              "pass a checkpoint prefix such as DIR/ckpt-1000")
    text = str(path)
    for suffix in (".index", ".data-00000-of-00001"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    if ".data-" in Path(text).name:
        text = text[: text.rindex(".data-")]
    if not Path(f"{text}.index").is_file():
        raise ConversionError(f"{path} is not a TF checkpoint prefix (no {text}.index), a checkpoint folder or a "
                              "SavedModel folder")
    return Path(text), "checkpoint"


def parse_object_graph(serialized: bytes, source: str) -> List[Node]:
    """The object graph as plain ``Node``s (TF's ``TrackableObjectGraph`` proto); every child
    must name a node of the graph."""
    try:
        protos = decode(serialized, OBJECT_GRAPH)["nodes"]
    except WireError as err:
        raise ConversionError(f"{source}: the object graph is not a valid TrackableObjectGraph ({err})") from err
    nodes = []
    for proto in protos:
        children = tuple((c["local_name"], c["node_id"]) for c in proto["children"])
        if any(not 0 <= node < len(protos) for _, node in children):
            raise ConversionError(f"{source}: the object graph refers to nodes outside its {len(protos)} nodes")
        tensor = next((a["checkpoint_key"] for a in proto["attributes"] if a["name"] == VARIABLE_ATTRIBUTE), None)
        nodes.append(Node(children, tensor))
    if not nodes:
        raise ConversionError(f"{source}: the object graph is empty")
    return nodes


def _child(nodes: Sequence[Node], node: int, name: str) -> int | None:
    return next((child for local, child in nodes[node].children if local == name), None)


def structural_keys(nodes: Sequence[Node]) -> Dict[str, int]:
    """``{structural key: variable node}`` for every path from the root's ``model`` child to a
    variable that avoids Keras' bookkeeping edges (cycles are not followed). Paths are counted as
    they are found, so a hostile graph (one with exponentially many paths) fails fast."""
    model = _child(nodes, 0, MODEL_EDGE)
    if model is None:
        return {}
    found: Dict[str, int] = {}
    stack: List[Tuple[int, str, frozenset]] = [(model, MODEL_EDGE, frozenset({0, model}))]
    paths = 1
    while stack:
        node, path, on_path = stack.pop()
        if nodes[node].tensor is not None:
            found[path] = node
        for name, child in nodes[node].children:
            if name not in BOOKKEEPING_EDGES and child not in on_path:
                paths += 1
                if paths > MAX_PATHS or len(on_path) > MAX_DEPTH:
                    raise ConversionError(f"the checkpoint's object graph has more than {MAX_PATHS} paths or nests "
                                          f"deeper than {MAX_DEPTH} objects; not a SimCLRv2 model")
                stack.append((child, f"{path}/{name}", on_path | {child}))
    return found


def model_variable_nodes(nodes: Sequence[Node]) -> List[int]:
    """Every variable node reachable from the root's ``model`` child by any edge except
    ``keras_api`` (Keras metadata); optimizer slots and ``global_step`` are not among them."""
    model = _child(nodes, 0, MODEL_EDGE)
    if model is None:
        return []
    seen, stack = {model}, [model]
    while stack:
        for name, child in nodes[stack.pop()].children:
            if name != "keras_api" and child not in seen:
                seen.add(child)
                stack.append(child)
    return sorted(n for n in seen if nodes[n].tensor is not None)


def _global_step(bundle: TensorBundle) -> int | None:
    if GLOBAL_STEP_KEY not in bundle:
        return None
    step = bundle.read(GLOBAL_STEP_KEY)
    return int(step) if step.shape == () and step.dtype.kind in "iu" else None


def read_official_variables(path: str | Path) -> OfficialVariables:
    """The model variables of an official TF2 checkpoint or SavedModel, keyed structurally."""
    prefix, kind = resolve_source(path)
    bundle = TensorBundle(prefix)
    if OBJECT_GRAPH_KEY not in bundle:
        sample = ", ".join(sorted(bundle.keys())[:3])
        raise ConversionError(f"{prefix} is a name-based (TF1) checkpoint ({sample}, ...); only object-based TF2 "
                              "checkpoints and SavedModels of the official tf2/ code are supported")
    graph = bundle.read(OBJECT_GRAPH_KEY)
    if graph.shape != ():
        raise ConversionError(f"{prefix}: {OBJECT_GRAPH_KEY} is not a single serialized object graph")
    nodes = parse_object_graph(graph.item(), str(prefix))
    keys = structural_keys(nodes)
    variable_nodes = model_variable_nodes(nodes)
    if not variable_nodes:
        raise ConversionError(f"{prefix} has no 'model' object with variables; is it a SimCLRv2 checkpoint "
                              "(tf.train.Checkpoint(model=...)) or SavedModel?")
    absent = sorted(nodes[n].tensor for n in variable_nodes if nodes[n].tensor not in bundle)
    if absent:
        raise ConversionError(f"{prefix}: the object graph names {len(absent)} tensor(s) the index lacks, e.g. "
                              f"{absent[0]}; the checkpoint is damaged")
    first_key: Dict[int, str] = {}
    for key, node in sorted(keys.items()):
        first_key.setdefault(node, key)
    names = {n: first_key.get(n, nodes[n].tensor or str(n)) for n in variable_nodes}
    tensors = {n: nodes[n].tensor for n in variable_nodes}
    keys = {k: n for k, n in keys.items() if n in tensors}
    return OfficialVariables(
        source=str(path), kind=kind, prefix=str(prefix), keys=keys, names=names, tensors=tensors,
        shapes={k: bundle.shape(tensors[n]) for k, n in keys.items()},
        global_step=_global_step(bundle), bundle=bundle,
    )
