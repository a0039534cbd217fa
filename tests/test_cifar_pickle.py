"""CIFAR batches are read by an unpickler that builds only what they hold, so a crafted batch is
refused with a one-line error and never runs code (issue 20, class 6)."""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from simclrv2.data.datasets import build_dataset
from simclrv2.data.errors import DataError
from simclrv2.data.readers import load_cifar

# Python 2 cPickle opcodes, as in the original cifar-10-python.tar.gz files (pickletools names)
PROTO2, MARK, STOP, TUPLE, TUPLE1, TUPLE3 = b"\x80\x02", b"(", b".", b"t", b"\x85", b"\x87"
EMPTY_DICT, EMPTY_LIST, SETITEMS, APPENDS = b"}", b"]", b"u", b"e"
REDUCE, BUILD, NONE, NEWFALSE = b"R", b"b", b"N", b"\x89"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(data: bytes) -> bytes:
    """A Python 2 ``str``: SHORT_BINSTRING or BINSTRING."""
    return (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data


def _int(value: int) -> bytes:
    return b"K" + bytes([value]) if 0 <= value < 256 else b"J" + struct.pack("<i", value)


def _py2_uint8_array(array: np.ndarray) -> bytes:
    """numpy's pickle of a uint8 array under Python 2: _reconstruct(ndarray, (0,), 'b') then its state
    (version 1, shape, dtype('u1', 0, 1) with its state, not Fortran, the raw bytes)."""
    dtype = (_global("numpy", "dtype") + _str(b"u1") + _int(0) + _int(1) + TUPLE3 + REDUCE
             + MARK + _int(3) + _str(b"|") + NONE + NONE + NONE + _int(-1) + _int(-1) + _int(0) + TUPLE + BUILD)
    shape = MARK + b"".join(_int(d) for d in array.shape) + TUPLE
    return (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray") + _int(0) + TUPLE1
            + _str(b"b") + TUPLE3 + REDUCE
            + MARK + _int(1) + shape + dtype + NEWFALSE + _str(array.tobytes()) + TUPLE + BUILD)


def _py2_batch(data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> bytes:
    """A CIFAR python batch byte for byte as Python 2 wrote it (protocol 2, str keys)."""
    label_list = EMPTY_LIST + MARK + b"".join(_int(v) for v in labels) + APPENDS
    filenames = EMPTY_LIST + MARK + b"".join(_str(f"img_{i}.png".encode()) for i in range(len(labels))) + APPENDS
    return (PROTO2 + EMPTY_DICT + MARK + _str(b"batch_label") + _str(b"training batch 1 of 5")
            + _str(b"data") + _py2_uint8_array(data) + _str(label_key) + label_list
            + _str(b"filenames") + filenames + SETITEMS + STOP)


def _cifar10(root: Path, write) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = rng.integers(0, 256, (3, 3072), dtype=np.uint8), [i % 10, (i + 4) % 10, 9]
        (folder / name).write_bytes(write(data, labels))
        written[name] = (data, labels)
    return written


def _expect(dataset, written, names) -> None:
    images = np.concatenate([written[n][0] for n in names]).reshape(-1, 3, 32, 32)
    assert torch.equal(dataset.images, torch.from_numpy(images))
    assert dataset.labels.tolist() == [v for n in names for v in written[n][1]]


def test_python2_batches_load_as_the_originals_are_written(tmp_path):
    written = _cifar10(tmp_path, _py2_batch)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes(), encoding="bytes")
    assert raw[b"filenames"][2] == b"img_2.png" and raw[b"data"].dtype == np.uint8  # a valid pickle
    _expect(build_dataset("cifar10", tmp_path, "test"), written, ["test_batch"])
    _expect(load_cifar("cifar10", tmp_path, "train"), written, [f"data_batch_{k}" for k in range(1, 6)])


@pytest.mark.parametrize("protocol", [2, 4, 5])  # 4 and 5: the defaults of Python 3.8-3.13 and 3.14
def test_python3_batches_load(tmp_path, protocol):
    def write(data, labels):
        return pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"}, protocol=protocol)
    written = _cifar10(tmp_path, write)
    _expect(build_dataset("cifar10", tmp_path, "test"), written, ["test_batch"])


class _CreatesFile:
    def __init__(self, target: Path, how: str):
        self.target, self.how = target, how

    def __reduce__(self):
        if self.how == "open":
            return open, (str(self.target), "w")
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("how", ["open", "system"])
def test_a_crafted_batch_is_refused_and_runs_nothing(tmp_path, how):
    target = tmp_path / "pwned"
    _cifar10(tmp_path, _py2_batch)
    crafted = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"payload": _CreatesFile(target, how)}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(crafted, protocol=2))
    with pytest.raises(DataError) as caught:
        build_dataset("cifar10", tmp_path, "test")
    message = str(caught.value)
    assert not target.exists()
    assert "\n" not in message and "test_batch" in message and "could run code" in message
    assert (f"{open.__module__}.open" if how == "open" else f"{os.system.__module__}.system") in message


def test_allowed_names_cannot_be_misused(tmp_path):
    """``_codecs.encode`` is allowed for latin-1 bytes only; an array of Python objects is not image data."""
    _cifar10(tmp_path, _py2_batch)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(PROTO2 + _global("_codecs", "encode") + b"X\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13"
                      + b"\x86" + REDUCE + STOP)
    with pytest.raises(DataError, match="encoding 'rot13'"):
        build_dataset("cifar10", tmp_path, "test")
    objects = np.array([None, "x", 3], dtype=object)
    batch.write_bytes(pickle.dumps({b"data": objects, b"labels": [0, 1, 2]}, protocol=2))
    with pytest.raises(DataError, match="'data' is not a uint8 numpy array"):
        build_dataset("cifar10", tmp_path, "test")
    batch.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [b"cat"]}, protocol=2))
    with pytest.raises(DataError, match="'labels' is not a list of integers"):
        build_dataset("cifar10", tmp_path, "test")


def test_the_command_line_reports_a_crafted_batch_in_one_line(tmp_path, capsys):
    from cli_checks import expect_one_line_error

    target = tmp_path / "pwned"
    _cifar10(tmp_path, _py2_batch)
    crafted = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _CreatesFile(target, "system")}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(crafted, protocol=2))
    expect_one_line_error(capsys, ["pretrain", "--dataset", "cifar10", "--data-dir", tmp_path, "--run-dir",
                                   tmp_path / "run", "--train-steps", "1"], "data_batch_3", "could run code")
    assert not target.exists()
