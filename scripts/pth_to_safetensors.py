#!/usr/bin/env python3
"""Convert a legacy (non-zip) torch.save checkpoint of a state dict into safetensors.

Standard library only: no torch needed. The legacy format is a sequence of pickles (magic number,
protocol version, system info, the object itself with persistent ids naming storages, the list of
storage keys) followed by each storage's raw bytes, each preceded by its element count as int64.

usage: pth_to_safetensors.py IN.pth OUT.safetensors
"""
import array
import collections
import json
import pickle
import struct
import sys

MAGIC = 0x1950A86A20F9469CFC6C
DTYPES = {  # storage class -> (safetensors dtype, bytes per element)
    "FloatStorage": ("F32", 4),
    "DoubleStorage": ("F64", 8),
    "HalfStorage": ("F16", 2),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
    "ByteStorage": ("U8", 1),
}


class StorageType:
    def __init__(self, name):
        if name not in DTYPES:
            raise ValueError(f"unsupported storage type {name}")
        self.dtype, self.itemsize = DTYPES[name]


class Storage:
    def __init__(self, stype, key, numel):
        self.stype, self.key, self.numel, self.data = stype, key, numel, None


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def rebuild_tensor(storage, offset, size, stride, *_rest):
    return Tensor(storage, offset, size, stride)


def rebuild_parameter(tensor, *_rest):
    return tensor


class LegacyUnpickler(pickle.Unpickler):
    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "torch" and name.endswith("Storage"):
            return StorageType(name)
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        kind, stype, key, _location, numel, view = pid[0], pid[1], pid[2], pid[3], pid[4], pid[5]
        if kind != "storage" or view is not None:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return self.storages.setdefault(key, Storage(stype, key, numel))


def contiguous_strides(size):
    strides, acc = [], 1
    for dim in reversed(size):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))


ARRAY_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}  # raw element copies, whatever the dtype


def tensor_bytes(t):
    """The tensor's elements in row-major order, gathering permuted (e.g. channels-last) strides."""
    item = t.storage.stype.itemsize
    numel = 1
    for d in t.size:
        numel *= d
    if not t.size or t.stride == contiguous_strides(t.size):
        return t.storage.data[t.offset * item:(t.offset + numel) * item]
    elems = array.array(ARRAY_CODES[item])
    elems.frombytes(t.storage.data)
    index = [t.offset]
    for dim, stride in zip(t.size, t.stride):
        index = [i + k * stride for i in index for k in range(dim)]
    return array.array(ARRAY_CODES[item], (elems[i] for i in index)).tobytes()


def convert(src, dst):
    storages = {}
    with open(src, "rb") as f:
        if pickle.load(f) != MAGIC:
            raise SystemExit(f"{src}: not a legacy torch checkpoint (bad magic number)")
        if pickle.load(f) != 1001:
            raise SystemExit(f"{src}: unsupported legacy protocol version")
        pickle.load(f)  # sys info
        state = LegacyUnpickler(f, storages).load()
        keys = pickle.load(f)
        for key in keys:
            storage = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            nbytes = numel * storage.stype.itemsize
            storage.data = f.read(nbytes)
            if len(storage.data) != nbytes:
                raise SystemExit(f"{src}: truncated storage {key}")
    entries = []
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise SystemExit(f"{src}: entry {name} is not a tensor")
        entries.append((name, t.storage.stype.dtype, list(t.size), tensor_bytes(t)))
    write_safetensors(dst, entries)
    print(f"{dst}: {len(entries)} tensors")


def write_safetensors(dst, entries, metadata=None):
    """Write (name, dtype, shape, raw little-endian bytes) entries as a safetensors file."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, blob in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((8 - len(head) % 8) % 8)
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(head)))
        out.write(head)
        for _, _, _, blob in entries:
            out.write(blob)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    convert(sys.argv[1], sys.argv[2])
