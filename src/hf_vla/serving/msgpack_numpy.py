"""msgpack with numpy arrays, byte-compatible with openpi-client's `msgpack_numpy`.

Wire format (plain msgpack maps, no ext types; marker keys are msgpack *bin*, the dtype is a *str*):

    ndarray      -> {b"__ndarray__": True, b"data": <C-order bytes>, b"dtype": arr.dtype.str, b"shape": [..]}
    numpy scalar -> {b"__npgeneric__": True, b"data": x.item(), b"dtype": x.dtype.str}

Object, void (structured) and complex dtypes are refused both ways: an object array cannot travel as raw bytes,
and decoding one from the wire would read arbitrary memory. Decoded arrays are read-only views of the received
frame (no copy); copy them before writing in place.

`unpackb` checks every array it decodes (dtype, shape against the byte count, an optional size limit) and names
the offending field, e.g. `payload.examples[0].image[1]: ...`, in the ValueError it raises.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

import msgpack
import numpy as np

__all__ = ["packb", "unpackb", "unpack_tree", "decode_arrays", "Packer"]

_ARRAY, _SCALAR = b"__ndarray__", b"__npgeneric__"
_REFUSED_KINDS = {"O": "object", "V": "void/structured", "c": "complex"}
# what `x.item()` gives for a numpy scalar of each dtype kind, i.e. what a scalar's `data` may be
_SCALAR_DATA = {"b": (bool,), "i": (int,), "u": (int,), "f": (int, float), "U": (str,), "S": (bytes,)}
MAX_DEPTH = 64  # observations nest a few levels; a deeper frame is refused before Python's recursion limit
MAX_CONTAINERS = 1 << 20  # maps and lists per frame: a 224×224 image sent as nested lists holds 50,400


def _checked_dtype(spec: Any, field: str) -> np.dtype:
    if not isinstance(spec, str):
        raise ValueError(f"{field}: dtype must be a string, got {type(spec).__name__}")
    try:
        dtype = np.dtype(spec)
    except (TypeError, ValueError, SyntaxError) as error:
        raise ValueError(f"{field}: unknown dtype {reprlib.repr(spec)}") from error
    if dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"{field}: {_REFUSED_KINDS[dtype.kind]} dtype {spec!r} is not supported")
    return dtype


def _encode(obj: Any) -> Any:
    """`default` hook for msgpack: numpy objects to marker maps."""
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"cannot pack {_REFUSED_KINDS[obj.dtype.kind]} dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {_ARRAY: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {_SCALAR: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack object of type {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """Serialises `obj` (dicts, lists, str, bytes, numbers, None, numpy arrays and scalars) to msgpack bytes."""
    return msgpack.packb(obj, default=_encode)


class Packer:
    """Reusable packer with the same output as `packb` (mirrors openpi-client's `Packer().pack(obj)`)."""

    def __init__(self):
        self._packer = msgpack.Packer(default=_encode)

    def pack(self, obj: Any) -> bytes:
        return self._packer.pack(obj)


def _decode_array(node: dict, field: str, max_array_bytes: int | None) -> np.ndarray:
    data, shape = node.get(b"data"), node.get(b"shape")
    dtype = _checked_dtype(node.get(b"dtype"), field)
    if not isinstance(data, bytes):
        raise ValueError(f"{field}: array data must be bytes, got {type(data).__name__}")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"{field}: array shape must be a list of non-negative ints, got {reprlib.repr(shape)}")
    if max_array_bytes is not None and len(data) > max_array_bytes:
        raise ValueError(f"{field}: array of {len(data)} bytes exceeds the limit of {max_array_bytes} bytes")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        raise ValueError(f"{field}: shape {list(shape)} of dtype {dtype.str} needs {expected} bytes, got {len(data)}")
    try:
        return np.ndarray(buffer=data, dtype=dtype, shape=tuple(shape))
    except ValueError as error:  # numpy's own limits: more than 64 dimensions, a shape beyond its index range
        raise ValueError(f"{field}: array shape {reprlib.repr(shape)} is beyond numpy's limits ({error})") from None


def _decode_scalar(node: dict, field: str) -> np.generic:
    dtype = _checked_dtype(node.get(b"dtype"), field)
    data = node.get(b"data")
    allowed = _SCALAR_DATA.get(dtype.kind, ())
    if not isinstance(data, allowed) or (isinstance(data, bool) and bool not in allowed):
        expected = " or ".join(t.__name__ for t in allowed) or "nothing"
        raise ValueError(f"{field}: a numpy {dtype} scalar's value must be {expected}, got {type(data).__name__} "
                         f"{reprlib.repr(data)}")
    try:
        return dtype.type(data)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"{field}: cannot read a {dtype} scalar from {reprlib.repr(data)}") from error


def _field(parent: str, key: Any) -> str:
    name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
    return f"{parent}.{name}" if parent else name


def _decode(node: Any, field: str, max_array_bytes: int | None, depth: int = 0) -> Any:
    if isinstance(node, (dict, list)) and depth == MAX_DEPTH:
        raise ValueError(f"{field or '<root>'}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, dict):
        if node.get(_ARRAY) is True:
            return _decode_array(node, field or "<root>", max_array_bytes)
        if node.get(_SCALAR) is True:
            return _decode_scalar(node, field or "<root>")
        return {key: _decode(value, _field(field, key), max_array_bytes, depth + 1) for key, value in node.items()}
    if isinstance(node, list):
        return [_decode(value, f"{field}[{i}]", max_array_bytes, depth + 1) for i, value in enumerate(node)]
    return node


class _ContainerCounter:
    """msgpack's object/list hook: refuses a frame once it has built `MAX_CONTAINERS` maps and lists. A map costs
    Python some 70 bytes for the one byte it takes on the wire, so without a bound a frame of empty maps would take
    gigabytes and seconds of the server's event loop."""

    def __init__(self):
        self.count = 0

    def __call__(self, container):
        self.count += 1
        if self.count > MAX_CONTAINERS:
            raise _TooManyContainers
        return container


class _TooManyContainers(Exception):
    pass


def unpackb(data: bytes, max_array_bytes: int | None = None) -> Any:
    """Inverse of `packb`. Raises ValueError for bytes that are not one well-formed message."""
    return decode_arrays(unpack_tree(data), max_array_bytes)


def unpack_tree(data: bytes) -> Any:
    """The first half of `unpackb`: the frame's msgpack structure, numpy arrays still as their marker maps (so a
    server can read a request's form before an array in it turns out to be bad). Raises ValueError."""
    counter = _ContainerCounter()
    try:
        tree = msgpack.unpackb(data, raw=False, object_hook=counter, list_hook=counter)
    except _TooManyContainers:
        raise ValueError(f"frame: more than {MAX_CONTAINERS} maps and lists; send arrays as msgpack-numpy arrays, "
                         "not nested lists") from None
    except Exception as error:  # msgpack raises several unrelated types for bad input
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise ValueError(f"frame: not a valid msgpack message ({detail})"[:300]) from None
    return tree


def decode_arrays(tree: Any, max_array_bytes: int | None = None) -> Any:
    """The second half of `unpackb`: `unpack_tree`'s output with its arrays and scalars checked and decoded."""
    return _decode(tree, "", max_array_bytes)


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    observation = {
        "images": {camera: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for camera in ("primary", "wrist")},
        "state": rng.normal(size=7).astype(np.float32),
        "prompt": "pick up the red block",
        "step": np.int64(12),
    }
    frame = packb(observation)
    decoded = unpackb(frame)
    sent = [*observation["images"].values(), observation["state"]]
    received = [*decoded["images"].values(), decoded["state"]]
    print(f"frame {len(frame):,} bytes for {sum(a.nbytes for a in sent):,} bytes of array data")
    same = all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(sent, received))
    print(f"decoded: arrays equal with their dtypes {same}, step {decoded['step']!r}, prompt {decoded['prompt']!r}, "
          f"arrays writeable {any(a.flags.writeable for a in received)} (read-only views of the frame)")
    try:
        unpackb(frame, max_array_bytes=100_000)
    except ValueError as error:
        print("unpackb(frame, max_array_bytes=100_000):", error)
