"""Read TensorFlow tensor bundles, the files of TF checkpoints and of SavedModels' ``variables/``,
without TensorFlow.

A bundle is ``PREFIX.index`` plus data shards ``PREFIX.data-0000K-of-0000N`` (TF's
``core/util/tensor_bundle``):

* the index is an SSTable (LevelDB's table format, uncompressed as TF writes it): data blocks of
  prefix-compressed keys with restart points, an index block of block handles (two varints), and
  a 48-byte footer with the metaindex and index handles and a magic number. Each block is followed
  by a compression byte and the masked crc32c of the block and that byte;
* each key maps to a ``BundleEntryProto`` (dtype, shape, shard, offset, size, masked crc32c of the
  tensor); the empty key holds the ``BundleHeaderProto`` (shard count, endianness, format version);
* a shard holds each tensor's raw little-endian bytes; a string tensor is stored as its varint
  lengths, the masked crc32c of those lengths (as 4-byte integers), then the bytes.

Everything in the files is untrusted: each handle, offset, size, count and varint is checked
against the bytes at hand before anything is allocated or read, every block and tensor checksum is
verified, and any inconsistency raises a one-line ``ConversionError`` naming the file.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

from .checksum import crc32c, unmask
from .errors import ConversionError
from .protowire import Field, WireError, decode, read_varint

FOOTER_SIZE = 48
HANDLES_SIZE = 40  # two block handles of at most 20 bytes each, zero-padded
TABLE_MAGIC = 0xDB4775248B80FB57
BLOCK_TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY = 0, 1
MAX_INDEX_BYTES = 256 << 20
KEY_BYTES_PER_BLOCK_BYTE = 16  # prefix compression saves far less in TF's keys: more means a hostile block
MAX_RANK = 254  # TensorShape::MaxDimensions
READER_VERSION = 1  # kTensorBundleVersion
LITTLE_ENDIAN, BIG_ENDIAN = 0, 1
DT_STRING = 7
SLICE_KEY_PREFIX = b"\x00"  # checkpoint::EncodeTensorNameSlice keys start with OrderedCode's 0
DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 8: "<c8", 9: "<i8", 10: "?", 17: "<u2",
          18: "<c16", 19: "<f2", 22: "<u4", 23: "<u8"}  # tensorflow/core/framework/types.proto

SHAPE = {2: Field("dim", {1: Field("size", "int")}, repeated=True), 3: Field("unknown_rank", "int")}
HEADER = {1: Field("num_shards", "int"), 2: Field("endianness", "int"),
          3: Field("version", {1: Field("producer", "int"), 2: Field("min_consumer", "int")})}
ENTRY = {1: Field("dtype", "int"), 2: Field("shape", SHAPE), 3: Field("shard_id", "int"), 4: Field("offset", "int"),
         5: Field("size", "int"), 6: Field("crc32c", "fixed32"), 7: Field("slices", "bytes", repeated=True)}


def damaged(path: str, problem: str) -> ConversionError:
    return ConversionError(f"{path}: {problem}; the file is damaged or was not written by TensorFlow")


@dataclass(frozen=True)
class Entry:
    """Where and how one tensor is stored (a checked ``BundleEntryProto``; ``crc32c`` unmasked)."""

    dtype: int
    shape: Tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int
    sliced: bool


# ----------------------------------------------------------------------------- SSTable


def _handle(data: memoryview, position: int, limit: int) -> Tuple[Tuple[int, int], int]:
    offset, position = read_varint(data, position, limit)
    size, position = read_varint(data, position, limit)
    return (offset, size), position


def _block(table: memoryview, handle: Tuple[int, int], path: str) -> memoryview:
    """The contents of the block at ``handle``, checksum verified."""
    offset, size = handle
    if offset + size + BLOCK_TRAILER_SIZE > len(table):
        raise damaged(path, f"block at byte {offset} of {size} bytes runs past the end of the table")
    contents = table[offset: offset + size + 1]
    stored = int.from_bytes(table[offset + size + 1: offset + size + BLOCK_TRAILER_SIZE], "little")
    if crc32c(bytes(contents)) != unmask(stored):
        raise damaged(path, f"block at byte {offset} fails its checksum")
    if contents[-1] == SNAPPY:
        raise ConversionError(f"{path} has snappy-compressed blocks (TensorFlow 1.1 wrote them); re-save the "
                              "checkpoint with a newer TensorFlow")
    if contents[-1] != NO_COMPRESSION:
        raise damaged(path, f"block at byte {offset} has unknown compression type {contents[-1]}")
    return contents[:-1]


def _block_entries(block: memoryview, path: str) -> Iterator[Tuple[bytes, memoryview]]:
    """(key, value) of each entry: varints shared, unshared, value size; the unshared key bytes; the
    value. The keys' total length is bounded, so shared prefixes cannot blow up time or memory."""
    if len(block) < 4:
        raise damaged(path, "block is shorter than its restart count")
    restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * restarts
    if restarts < 1 or end < 0:
        raise damaged(path, f"block claims {restarts} restart points")
    position, key, key_bytes = 0, b"", 0
    while position < end:
        shared, position = read_varint(block, position, end)
        unshared, position = read_varint(block, position, end)
        value_size, position = read_varint(block, position, end)
        if shared > len(key) or unshared + value_size > end - position:
            raise damaged(path, f"block entry at byte {position} runs past its key or block")
        key = key[:shared] + bytes(block[position: position + unshared])
        key_bytes += len(key)
        if key_bytes > KEY_BYTES_PER_BLOCK_BYTE * len(block):
            raise damaged(path, f"block keys are implausibly long at {key[:60]!r}")
        position += unshared
        yield key, block[position: position + value_size]
        position += value_size


def read_table(data: bytes, path: str) -> Dict[bytes, memoryview]:
    """Every (key, value) of an SSTable, keys strictly increasing as the format requires."""
    if len(data) < FOOTER_SIZE:
        raise damaged(path, f"{len(data)} bytes is shorter than an SSTable footer ({FOOTER_SIZE} bytes)")
    footer = memoryview(data)[-FOOTER_SIZE:]
    if int.from_bytes(footer[HANDLES_SIZE:], "little") != TABLE_MAGIC:
        raise damaged(path, "it does not end in the SSTable magic number (truncated?)")
    try:
        metaindex, position = _handle(footer, 0, HANDLES_SIZE)
        index, position = _handle(footer, position, HANDLES_SIZE)
        if any(footer[position:HANDLES_SIZE]):
            raise damaged(path, "the SSTable footer's padding is not zero")
        table = memoryview(data)[:-FOOTER_SIZE]
        _block(table, metaindex, path)  # holds no entries TensorFlow uses; checked all the same
        entries: Dict[bytes, memoryview] = {}
        previous = None
        for _, value in _block_entries(_block(table, index, path), path):
            handle, end = _handle(value, 0, len(value))
            if end != len(value):
                raise damaged(path, "index block entry is not a block handle")
            for key, entry in _block_entries(_block(table, handle, path), path):
                if previous is not None and key <= previous:
                    raise damaged(path, f"keys are out of order at {key[:60]!r}")
                entries[key] = entry
                previous = key
    except WireError as err:
        raise damaged(path, str(err)) from err
    return entries


# ----------------------------------------------------------------------------- bundle


def _read_index(path: str) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > MAX_INDEX_BYTES:
            raise ConversionError(f"{path} is {size} bytes, more than any checkpoint index ({MAX_INDEX_BYTES} "
                                  "bytes); pass the checkpoint's .index file or prefix")
        return Path(path).read_bytes()
    except OSError as err:
        raise ConversionError(f"cannot read {path}: {err.strerror or err}") from err


def _decode(data: memoryview, schema, path: str, what: str) -> dict:
    try:
        return decode(data, schema)
    except WireError as err:
        raise damaged(path, f"{what} is not a valid protobuf message ({err})") from err


class TensorBundle:
    """The tensors of the bundle at ``prefix``: ``keys()``, ``key in bundle``, ``shape(key)``,
    ``read(key)``. The index is read and checked on opening; data shards are read per tensor."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.index_path = f"{self.prefix}.index"
        table = read_table(_read_index(self.index_path), self.index_path)
        if b"" not in table:
            raise damaged(self.index_path, "it has no bundle header entry")
        header = _decode(table.pop(b""), HEADER, self.index_path, "the bundle header")
        self.num_shards = header["num_shards"]
        if self.num_shards < 1:
            raise damaged(self.index_path, f"the header says {self.num_shards} data shards")
        if header["endianness"] == BIG_ENDIAN:
            raise ConversionError(f"{self.index_path} was written on a big-endian machine; re-save it on a "
                                  "little-endian one")
        if header["endianness"] != LITTLE_ENDIAN:
            raise damaged(self.index_path, f"the header has unknown endianness {header['endianness']}")
        needed = (header["version"] or {}).get("min_consumer", 0)
        if needed > READER_VERSION:
            raise ConversionError(f"{self.index_path} needs a tensor-bundle reader of version {needed}; this one "
                                  f"reads version {READER_VERSION} (the checkpoint is from a newer TensorFlow)")
        self.entries: Dict[str, Entry] = {}
        for key, value in table.items():
            if key.startswith(SLICE_KEY_PREFIX):
                continue  # one slice of a partitioned tensor, reached only through that tensor's entry
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise damaged(self.index_path, f"key {key[:60]!r} is not UTF-8 text") from None
            self.entries[name] = self._entry(name, value)

    def _entry(self, key: str, value: memoryview) -> Entry:
        proto = _decode(value, ENTRY, self.index_path, f"the entry of {key}")
        shape = proto["shape"] or {"dim": [], "unknown_rank": 0}
        dims = tuple(dim["size"] for dim in shape["dim"])
        if shape["unknown_rank"] or len(dims) > MAX_RANK or any(d < 0 for d in dims):
            raise damaged(self.index_path, f"tensor {key} has an invalid shape {dims}")
        if not 0 <= proto["shard_id"] < self.num_shards or proto["offset"] < 0 or proto["size"] < 0:
            raise damaged(self.index_path, f"tensor {key} is placed at shard {proto['shard_id']} of "
                                           f"{self.num_shards}, offset {proto['offset']}, size {proto['size']}")
        return Entry(proto["dtype"], dims, proto["shard_id"], proto["offset"], proto["size"], unmask(proto["crc32c"]),
                     bool(proto["slices"]))

    def keys(self) -> List[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._lookup(key).shape

    def _lookup(self, key: str) -> Entry:
        if key not in self.entries:
            raise ConversionError(f"{self.index_path} has no tensor {key}")
        return self.entries[key]

    def _readable(self, key: str) -> Entry:
        entry = self._lookup(key)
        if entry.sliced:
            raise ConversionError(f"{self.index_path}: tensor {key} is saved in slices (a partitioned variable or a "
                                  "sharding policy), which this reader does not support; re-save it unpartitioned")
        return entry

    def data_path(self, shard: int) -> str:
        return f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}"

    def _bytes(self, key: str, entry: Entry) -> bytes:
        """The tensor's bytes, read after checking that the data file holds them."""
        path = self.data_path(entry.shard)
        try:
            with open(path, "rb") as file:
                file_size = os.fstat(file.fileno()).st_size
                if entry.offset + entry.size > file_size:
                    raise damaged(path, f"tensor {key} lies at bytes {entry.offset}-{entry.offset + entry.size}, "
                                        f"past the end of the file ({file_size} bytes; truncated?)")
                file.seek(entry.offset)
                data = file.read(entry.size)
        except FileNotFoundError:
            raise ConversionError(f"{path} is missing; the checkpoint has {self.num_shards} data file(s), copy "
                                  "them all beside its .index") from None
        except OSError as err:
            raise ConversionError(f"cannot read {path}: {err.strerror or err}") from err
        if len(data) != entry.size:
            raise damaged(path, f"tensor {key} was cut short while reading")
        return data

    def read(self, key: str) -> np.ndarray:
        """The tensor ``key`` as a new array (strings as an object array of ``bytes``), checksum verified."""
        entry = self._readable(key)
        if entry.dtype == DT_STRING:
            return self._strings(key, entry)
        if entry.dtype not in DTYPES:
            raise ConversionError(f"{self.index_path}: tensor {key} has TensorFlow dtype {entry.dtype} "
                                  "(types.proto), which this reader does not support")
        dtype = np.dtype(DTYPES[entry.dtype])
        expected = math.prod(entry.shape) * dtype.itemsize
        if expected != entry.size:
            raise damaged(self.index_path, f"tensor {key} of shape {entry.shape} and dtype {dtype.name} needs "
                                           f"{expected} bytes, its entry says {entry.size}")
        data = self._bytes(key, entry)
        if crc32c(data) != entry.crc32c:
            raise damaged(self.data_path(entry.shard), f"tensor {key} fails its crc32c check")
        return np.frombuffer(data, dtype).reshape(entry.shape).astype(dtype.newbyteorder("="))

    def _strings(self, key: str, entry: Entry) -> np.ndarray:
        """``[varint length] * n, masked crc32c of the lengths (as uint32, uint64 past 4 GiB), bytes``;
        the entry's checksum covers those lengths, the stored length checksum and the bytes."""
        count = math.prod(entry.shape)
        path = self.data_path(entry.shard)
        if entry.size < count + 4:
            raise damaged(self.index_path, f"string tensor {key} of {count} elements cannot fit in {entry.size} bytes")
        data = self._bytes(key, entry)
        view, position, lengths, checksum = memoryview(data), 0, [], 0
        try:
            for _ in range(count):
                length, position = read_varint(view, position, len(view) - 4)
                lengths.append(length)
                checksum = crc32c(struct.pack("<I" if length < 1 << 32 else "<Q", length), checksum)
        except WireError as err:
            raise damaged(path, f"string tensor {key}: {err}") from err
        stored = int.from_bytes(view[position: position + 4], "little")
        if unmask(stored) != checksum or position + 4 + sum(lengths) != len(view):
            raise damaged(path, f"the string lengths of tensor {key} fail their checksum or size")
        if crc32c(data[position:], checksum) != entry.crc32c:
            raise damaged(path, f"string tensor {key} fails its crc32c check")
        strings = np.empty(count, dtype=object)
        start = position + 4
        for index, length in enumerate(lengths):
            strings[index] = data[start: start + length]
            start += length
        return strings.reshape(entry.shape)
