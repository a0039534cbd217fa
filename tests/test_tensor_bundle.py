"""The TensorFlow tensor-bundle reader (``simclrv2.convert.tensor_bundle``), without TensorFlow.

* crc32c: the standard check value, the numpy fallback against the C one and itself, masking.
* protowire: varints and fields at their edges; malformed messages raise ``WireError``.
* Bundles written here (SSTable, entries, shards, string tensors) read back; hostile lengths,
  offsets, counts and varints under valid checksums raise ``ConversionError``.
* Fixture B (written by TensorFlow): every key, shape and model value is what TensorFlow listed in
  ``variables.json`` / ``variables.npz``; truncations and byte flips of its index and data raise
  ``ConversionError``, and so does garbage in its entries re-sealed with valid checksums.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from simclrv2.convert import ConversionError
from simclrv2.convert.checksum import crc32c, crc32c_numpy, mask, unmask
from simclrv2.convert.protowire import Field, WireError, decode, read_varint
from simclrv2.convert.tensor_bundle import TABLE_MAGIC, TensorBundle, read_table
from simclrv2.convert.tf_checkpoint import OBJECT_GRAPH_KEY, read_official_variables

FIXTURE_B = "forward_B_r50_w0.125_sk0_64"

# ----------------------------------------------------------------------------- writing bundles here


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 fields are 10-byte two's complement varints
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """Varint for ints, length-delimited for bytes."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _entry(dtype=1, dims=(), shard=0, offset=0, size=0, crc=0, slices=False) -> bytes:
    shape = b"".join(_field(2, _field(1, d)) for d in dims)
    proto = _field(1, dtype) + _field(2, shape) + _field(3, shard) + _field(4, offset) + _field(5, size)
    proto += _varint(6 << 3 | 5) + mask(crc).to_bytes(4, "little")
    return proto + (_field(7, b"") if slices else b"")


def _header(shards=1, endianness=0, min_consumer=0) -> bytes:
    return _field(1, shards) + _field(2, endianness) + _field(3, _field(1, 1) + _field(2, min_consumer))


def _block(entries, restarts: int = 1) -> bytes:
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    return body + b"\0\0\0\0" * restarts + restarts.to_bytes(4, "little")


def _sealed(block: bytes, compression: int = 0) -> bytes:
    trailer = bytes([compression])
    return block + trailer + mask(crc32c(block + trailer)).to_bytes(4, "little")


def _table(entries, data_block: bytes | None = None, compression: int = 0) -> bytes:
    """An SSTable as TF writes it: one data block, an empty metaindex block, an index block, the footer."""
    data = _block(sorted(entries)) if data_block is None else data_block
    meta = _block([])
    out = _sealed(data, compression)
    meta_at = len(out)
    out += _sealed(meta)
    index = _block([(b"\xff", _varint(0) + _varint(len(data)))])
    index_at = len(out)
    out += _sealed(index)
    footer = _varint(meta_at) + _varint(len(meta)) + _varint(index_at) + _varint(len(index))
    return out + footer.ljust(40, b"\0") + TABLE_MAGIC.to_bytes(8, "little")


def _strings(values) -> bytes:
    """A string tensor's data: varint lengths, masked crc32c of the lengths as uint32, the bytes."""
    lengths = b"".join(len(v).to_bytes(4, "little") for v in values)
    return b"".join(_varint(len(v)) for v in values) + mask(crc32c(lengths)).to_bytes(4, "little") + b"".join(values)


def _string_crc(values) -> int:
    lengths = b"".join(len(v).to_bytes(4, "little") for v in values)
    checksum = crc32c(lengths)
    return crc32c(mask(checksum).to_bytes(4, "little") + b"".join(values), checksum)


def _write(prefix, tensors, shards: int = 1, header: bytes | None = None) -> None:
    """``tensors``: key -> (dtype, dims, data bytes, shard), or raw entry-proto bytes (data not written)."""
    files = [bytearray() for _ in range(shards)]
    entries = [(b"", _header(shards) if header is None else header)]
    for key, spec in tensors.items():
        if isinstance(spec, bytes):
            entries.append((key.encode(), spec))
            continue
        dtype, dims, data, shard = spec
        crc = _string_crc(data) if dtype == 7 else crc32c(data)
        raw = _strings(data) if dtype == 7 else data
        entries.append((key.encode(), _entry(dtype, dims, shard, len(files[shard]), len(raw), crc)))
        files[shard] += raw
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for shard, data in enumerate(files):
        (prefix.parent / f"{prefix.name}.data-{shard:05d}-of-{shards:05d}").write_bytes(bytes(data))
    (prefix.parent / f"{prefix.name}.index").write_bytes(_table(entries))


# ----------------------------------------------------------------------------- crc32c, protowire


def test_crc32c_matches_the_standard_and_the_fallback():
    assert crc32c(b"123456789") == crc32c_numpy(b"123456789") == 0xE3069283  # the CRC-32C check value
    rng = np.random.default_rng(0)
    for size in (0, 1, 17, 1023, 1024, 4099, 70_001, 1_200_003):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        cut = size // 3
        assert crc32c_numpy(data) == crc32c(data) == crc32c(data[cut:], crc32c(data[:cut])), size
        assert crc32c_numpy(data[cut:], crc32c_numpy(data[:cut])) == crc32c(data)
    for value in (0, 1, 0xFFFFFFFF, 0xE3069283):
        assert unmask(mask(value)) == value and mask(value) != value


def test_protowire_reads_fields_and_rejects_malformed_messages():
    view = memoryview(_varint(300) + _varint(-1))
    assert read_varint(view, 0) == (300, 2) and read_varint(view, 2) == ((1 << 64) - 1, 12)
    schema = {1: Field("n", "int"), 2: Field("s", "string"), 3: Field("sub", {1: Field("x", "int")}, repeated=True),
              6: Field("c", "fixed32")}
    message = _field(1, -5) + _field(9, b"unknown") + _field(2, "é".encode()) + _field(3, _field(1, 4))
    message += _field(3, b"") + _varint(6 << 3 | 5) + (7).to_bytes(4, "little")
    assert decode(message, schema) == {"n": -5, "s": "é", "sub": [{"x": 4}, {"x": 0}], "c": 7}
    assert decode(b"", schema) == {"n": 0, "s": "", "sub": [], "c": 0}
    for bad, match in [(b"\x80", "truncated varint"), (b"\xff" * 11, "longer than 10 bytes"),
                       (b"\xff" * 9 + b"\x7f", "does not fit in 64 bits"), (_field(1, 1)[:1], "truncated varint"),
                       (_varint(2 << 3 | 2) + _varint(5) + b"abc", "claims 5 bytes"), (b"\x0b", "wire type 3"),
                       (_field(2, 5), "wire type 0, expected 2"), (_field(2, b"\xff"), "not UTF-8"),
                       (b"\x00\x01", "field number 0"), (_varint(6 << 3 | 5) + b"\0", "truncated fixed32")]:
        with pytest.raises(WireError, match=match):
            decode(bad, schema)


# ----------------------------------------------------------------------------- bundles written here


def test_bundle_written_here_reads_back(tmp_path):
    weights = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    strings = [b"object graph", b"", bytes(range(256))]
    _write(tmp_path / "ckpt", {
        "a/weights": (1, (2, 3, 4), weights.tobytes(), 1),
        "b/step": (9, (), np.int64(-3).tobytes(), 0),
        "c/names": (7, (3,), strings, 1),
        "d/empty": (1, (0, 5), b"", 0),
    }, shards=2)
    bundle = TensorBundle(tmp_path / "ckpt")
    assert bundle.num_shards == 2 and bundle.keys() == ["a/weights", "b/step", "c/names", "d/empty"]
    assert bundle.shape("a/weights") == (2, 3, 4) and bundle.shape("b/step") == ()
    read = bundle.read("a/weights")
    np.testing.assert_array_equal(read, weights)
    assert read.dtype == np.float32 and read.flags.writeable
    assert bundle.read("b/step").dtype == np.int64 and int(bundle.read("b/step")) == -3
    assert list(bundle.read("c/names")) == strings
    assert bundle.read("d/empty").shape == (0, 5)
    with pytest.raises(ConversionError, match="has no tensor nothing"):
        bundle.read("nothing")


def _hostile(name):
    """(tensors, header, key to read, error) for one hostile bundle; checksums are all valid."""
    big = 1 << 60
    cases = {
        "size past the file": ({"t": _entry(1, (big,), size=big * 4)}, None, "t", "past the end of the file"),
        "offset past the file": ({"t": _entry(1, (1,), offset=big, size=4)}, None, "t", "past the end of the file"),
        "size against shape": ({"t": _entry(1, (3,), size=4)}, None, "t", r"needs 12 bytes, its entry says 4"),
        "negative dim": ({"t": _entry(1, (-1,), size=4)}, None, None, "invalid shape"),
        "shard out of range": ({"t": _entry(1, (1,), shard=3, size=4)}, None, None, "shard 3 of 1"),
        "wrong crc": ({"t": _entry(1, (1,), size=4, crc=1)}, None, "t", "fails its crc32c check"),
        "huge string count": ({"t": _entry(7, (big,), size=16)}, None, "t", "cannot fit in 16 bytes"),
        "string length past data": ({"t": _entry(7, (1,), size=5)}, None, "t", "fail their checksum or size"),
        "bad dtype": ({"t": _entry(14, (1,), size=2)}, None, "t", "TensorFlow dtype 14"),
        "sliced": ({"t": _entry(1, (1,), slices=True)}, None, "t", "saved in slices"),
        "garbage entry": ({"t": b"\x0a\xff\xff"}, None, None, "not a valid protobuf message"),
        "no shards": ({}, _header(shards=0), None, "0 data shards"),
        "newer format": ({}, _header(min_consumer=2), None, "reader of version 2"),
        "big-endian": ({}, _header(endianness=1), None, "big-endian machine"),
        "bad header": ({}, b"\x08", None, "bundle header is not a valid protobuf"),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["size past the file", "offset past the file", "size against shape", "negative dim",
                                  "shard out of range", "wrong crc", "huge string count", "string length past data",
                                  "bad dtype", "sliced", "garbage entry", "no shards", "newer format", "big-endian",
                                  "bad header"])
def test_hostile_entries_raise_one_line_errors(tmp_path, name):
    tensors, header, key, match = _hostile(name)
    prefix = tmp_path / "ckpt"
    _write(prefix, tensors, header=header)
    (tmp_path / "ckpt.data-00000-of-00001").write_bytes(bytes(16))
    with pytest.raises(ConversionError, match=match) as caught:
        TensorBundle(prefix).read(key)
    assert "\n" not in str(caught.value)


def _prefix_bomb() -> bytes:
    """A block whose keys each repeat a 900-byte prefix: 5 bytes of block per 901 bytes of key."""
    entries = _varint(0) + _varint(900) + _varint(0) + b"k" * 900
    entries += b"".join(_varint(900) + _varint(1) + _varint(0) + bytes([i]) for i in range(1, 256))
    return entries + b"\0\0\0\0" + (1).to_bytes(4, "little")


@pytest.mark.parametrize("table, match", [
    (lambda: _table([], data_block=b"\x05\x00\x00" + _block([])), "runs past its key or block"),  # shares 5 of 0
    (lambda: _table([], data_block=_block([(b"a", b"")], restarts=1)[:-4] + (1 << 30).to_bytes(4, "little")),
     "restart points"),
    (lambda: _table([(b"", _header())], data_block=_block([(b"", _header()), (b"k", b""), (b"k", b"")])),
     "out of order"),
    (lambda: _table([], data_block=_prefix_bomb()), "implausibly long"),
    (lambda: _table([(b"", _header())], compression=1), "snappy-compressed"),
    (lambda: _table([(b"", _header())], compression=7), "unknown compression type 7"),
    (lambda: _table([(b"k", b"")]), "no bundle header entry"),
    (lambda: _table([(b"", _header())])[:-49] + b"\x01" + _table([(b"", _header())])[-48:], "fails its checksum"),
    (lambda: _table([(b"", _header())])[:-9] + b"\x01" + _table([(b"", _header())])[-8:], "padding is not zero"),
    (lambda: _table([(b"", _header())])[:-48] + _varint(1 << 40).ljust(40, b"\0") + TABLE_MAGIC.to_bytes(8, "little"),
     "runs past the end of the table"),
])
def test_hostile_tables_raise_one_line_errors(tmp_path, table, match):
    (tmp_path / "ckpt.index").write_bytes(table())
    with pytest.raises(ConversionError, match=match):
        TensorBundle(tmp_path / "ckpt")


def _graph(children, tensor: str | None = None) -> bytes:
    """One ``TrackableObject``: children (local name, node id) and a VARIABLE_VALUE attribute."""
    node = b"".join(_field(1, _field(1, n) + _field(2, name.encode())) for name, n in children)
    if tensor is not None:
        node += _field(2, _field(1, b"VARIABLE_VALUE") + _field(3, tensor.encode()))
    return _field(1, node)


@pytest.mark.parametrize("graph, match", [
    (_graph([("model", 7)]), "refers to nodes outside its 1 nodes"),
    (_graph([("model", 1)]) + _graph([("w", 2)]) + _graph([], "model/w/.ATTRIBUTES/VARIABLE_VALUE"),
     "names 1 tensor\\(s\\) the index lacks"),
    (_graph([("model", 1)]) + b"".join(_graph([("a", i + 1), ("b", i + 1)]) for i in range(1, 40))
     + _graph([], "w"), "more than 100000 paths"),  # 2**39 paths through a chain of doubled edges
    (b"\x0a\x05\x0a", "not a valid TrackableObjectGraph"),
    (b"", "object graph is empty"),
])
def test_hostile_object_graphs_raise_one_line_errors(tmp_path, graph, match):
    _write(tmp_path / "ckpt", {OBJECT_GRAPH_KEY: (7, (), [graph], 0)})
    with pytest.raises(ConversionError, match=match):
        read_official_variables(tmp_path / "ckpt")


# ----------------------------------------------------------------------------- fixture B, written by TensorFlow


@pytest.fixture
def fixture_b(reference_dir, tmp_path):
    """A writable copy of fixture B's checkpoint files and TensorFlow's list of its keys and shapes."""
    folder = reference_dir / FIXTURE_B
    if not (folder / "checkpoint").is_dir():
        pytest.skip(f"{folder}/checkpoint not found")
    for source in (folder / "checkpoint").iterdir():
        shutil.copyfile(source, tmp_path / source.name)
    return tmp_path / "ckpt-3", folder


def test_fixture_keys_shapes_and_values_are_tensorflows(fixture_b):
    prefix, folder = fixture_b
    listed = json.loads((folder / "variables.json").read_text())
    bundle = TensorBundle(prefix)
    assert {k: list(bundle.shape(k)) for k in bundle.keys()} == listed["checkpoint_keys_and_shapes"]
    arrays = np.load(folder / "variables.npz", allow_pickle=False)
    for variable in listed["variables"]:
        value = bundle.read(variable["checkpoint_key"])
        assert value.dtype == arrays[variable["name"]].dtype
        np.testing.assert_array_equal(value, arrays[variable["name"]])
    assert int(bundle.read("global_step/.ATTRIBUTES/VARIABLE_VALUE")) == 3
    assert len(TensorBundle(folder / "saved_model" / "3" / "variables" / "variables").keys()) > len(listed["variables"])


def _tensors_at(bundle: TensorBundle, start: int, stop: int):
    return [k for k, e in bundle.entries.items() if e.offset < stop and start < e.offset + e.size]


def test_truncated_or_flipped_fixture_files_raise(fixture_b):
    prefix, _ = fixture_b
    index_path, data_path = prefix.with_name("ckpt-3.index"), prefix.with_name("ckpt-3.data-00000-of-00001")
    index, data = index_path.read_bytes(), data_path.read_bytes()
    bundle = TensorBundle(prefix)
    rng = np.random.default_rng(0)
    index_cuts = [0, 1, 47, len(index) // 2, len(index) - 1]
    footer = [len(index) - 48 + i for i in (0, 2, 30, 45)]  # a handle, padding, the magic number
    index_flips = sorted(rng.choice(len(index) - 48, 8, replace=False).tolist()) + footer
    for changed in [index[:n] for n in index_cuts] + [_flipped(index, at, rng) for at in index_flips]:
        index_path.write_bytes(changed)
        with pytest.raises(ConversionError, match="damaged or was not written by TensorFlow"):
            TensorBundle(prefix)
    index_path.write_bytes(index)
    for at in [len(data) - 1, *rng.choice(len(data), 6, replace=False).tolist()]:
        data_path.write_bytes(_flipped(data, at, rng))
        for key in _tensors_at(bundle, at, at + 1):
            with pytest.raises(ConversionError, match="fails its crc32c check"):
                bundle.read(key)
        data_path.write_bytes(data[:at])
        for key in _tensors_at(bundle, at, len(data)):
            with pytest.raises(ConversionError, match="past the end of the file"):
                bundle.read(key)


def _flipped(data: bytes, at: int, rng) -> bytes:
    changed = bytearray(data)
    changed[at] ^= int(rng.integers(1, 256))
    return bytes(changed)


def test_garbage_in_fixture_entries_under_valid_checksums_raises_only_conversion_errors(fixture_b):
    """Entries re-sealed after random byte changes: the protobuf and bounds checks, not the
    block checksums, must catch them (or the entry still describes a readable tensor)."""
    prefix, _ = fixture_b
    index_path = prefix.with_name("ckpt-3.index")
    entries = read_table(index_path.read_bytes(), str(index_path))
    rng = np.random.default_rng(1)
    keys = sorted(entries)
    for _ in range(24):
        key = keys[int(rng.integers(1, len(keys)))]
        value = bytearray(entries[key])
        value[int(rng.integers(len(value)))] = int(rng.integers(256))
        index_path.write_bytes(_table([*((k, bytes(v)) for k, v in entries.items() if k != key), (key, bytes(value))]))
        try:
            TensorBundle(prefix).read(key.decode())
        except ConversionError as err:
            assert "\n" not in str(err)
