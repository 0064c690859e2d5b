# Pure module: message <-> frames. Imports msgpack, numpy and qpipe.errors/spec; no sockets.
"""qpipe's wire format: a msgpack header frame, then one raw frame per array.

Every message is a list of ZeroMQ frames::

    frame 0   msgpack map: the header
    frame 1+  one raw buffer per array, in the order of header["arrays"]

A request header names the operation (the method's name), a request id
chosen by the client, the queue and the operation's arguments::

    {"op": "enqueue_many", "id": 17, "queue": "images", "timeout": 2.5,
     "arrays": [["<f4", [32, 28, 28]], ["<i8", [32]]]}

Each entry of ``arrays`` describes its frame: ``[dtype, shape]`` where dtype
is numpy's ``dtype.str`` (explicit byte order), or ``["string", shape,
lengths]`` for a string component, whose frame is the elements' bytes joined
and ``lengths`` their sizes in row-major order. A reply carries the same id::

    {"id": 17, "ok": true, "arrays": [["<f4", [28, 28]], ["<i8", []]]}
    {"id": 17, "error": 4, "message": "queue 'images': dequeue timed out after 2.5 s"}

``error`` is a code from :mod:`qpipe.errors`; the client rebuilds the class.
Numeric frames are sent and received without copying (``np.frombuffer`` over
the ZeroMQ frame); nothing is ever pickled. :func:`decode` checks every
field, the frame count and every frame's length, and enforces the total size
limit, raising :class:`ProtocolError` or :class:`MessageTooLargeError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from .errors import MessageTooLargeError, ProtocolError, QueueError
from .spec import MAX_RANK, STRING

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "MAX_HEADER_SIZE",
    "decode",
    "decode_header",
    "encode",
    "error_header",
    "frames_nbytes",
]

DEFAULT_MAX_MESSAGE_SIZE = 1 << 30
MAX_HEADER_SIZE = 16 << 20
_OBJECT = np.dtype(object)
_DTYPE_CACHE: dict[str, np.dtype] = {}
_packb = msgpack.Packer(use_bin_type=True).pack


def encode(header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[Any]:
    """Return the frames for ``header`` and ``arrays`` (the header gains an ``arrays`` key).

    Numeric arrays are returned as themselves (contiguous), so a ZeroMQ send
    with ``copy=False`` transmits their memory without a copy.
    """
    if not arrays:
        return [_packb(header)]
    metas = []
    frames: list[Any] = [b""]
    for a in arrays:
        if a.dtype == _OBJECT:
            flat = a.reshape(-1)
            metas.append([STRING, list(a.shape), [len(x) for x in flat]])
            frames.append(b"".join(flat))
        else:
            if not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)
            metas.append([a.dtype.str, list(a.shape)])
            frames.append(a if a.ndim else a.reshape(1))
    header["arrays"] = metas
    frames[0] = _packb(header)
    return frames


def error_header(req_id: Any, exc: QueueError) -> dict[str, Any]:
    """The reply header that carries ``exc`` as code plus text."""
    return {"id": req_id, "error": exc.code, "message": str(exc)}


def _nbytes(frame: Any) -> int:
    if isinstance(frame, np.ndarray):
        return frame.nbytes
    try:
        return len(frame)
    except TypeError:
        return memoryview(frame).nbytes


def frames_nbytes(frames: Sequence[Any]) -> int:
    """Total bytes in a message's frames."""
    return sum(_nbytes(f) for f in frames)


def decode_header(frame: Any) -> dict[str, Any]:
    """Unpack and check a header frame; raise :class:`ProtocolError` if it is not a msgpack map."""
    size = _nbytes(frame)
    if size > MAX_HEADER_SIZE:
        raise MessageTooLargeError(
            f"header of {size} bytes exceeds the limit of {MAX_HEADER_SIZE} bytes"
        )
    raw = frame if isinstance(frame, bytes) else memoryview(frame)
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"header frame is not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    return header


def decode(
    frames: Sequence[Any], max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Return ``(header, arrays)`` from a message's frames, checking all of it.

    Numeric arrays are views over the frames (no copy, writable when the
    frame is). Raises :class:`ProtocolError` for a malformed message and
    :class:`MessageTooLargeError` when the frames exceed ``max_message_size``.
    """
    if not frames:
        raise ProtocolError("empty message: expected a header frame")
    if max_message_size is not None:
        total = frames_nbytes(frames)
        if total > max_message_size:
            raise MessageTooLargeError(
                f"message of {total} bytes exceeds the maximum message size of {max_message_size} bytes"
            )
    header = decode_header(frames[0])
    metas = header.get("arrays", [])
    if not isinstance(metas, list):
        raise ProtocolError(f"header 'arrays' must be a list, got {type(metas).__name__}")
    if len(metas) != len(frames) - 1:
        raise ProtocolError(
            f"header describes {len(metas)} arrays but the message has {len(frames) - 1} data frames"
        )
    return header, [_decode_array(m, f, i) for i, (m, f) in enumerate(zip(metas, frames[1:]))]


def _decode_array(meta: Any, frame: Any, i: int) -> np.ndarray:
    if not isinstance(meta, list) or len(meta) not in (2, 3):
        raise ProtocolError(f"arrays[{i}]: expected [dtype, shape] or ['string', shape, lengths]")
    dts, shape = meta[0], meta[1]
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
        type(d) is int and d >= 0 for d in shape
    ):
        raise ProtocolError(f"arrays[{i}]: shape must be a list of at most {MAX_RANK} ints >= 0")
    count = 1
    for d in shape:
        count *= d
    nbytes = _nbytes(frame)
    if dts == STRING:
        lens = meta[2] if len(meta) == 3 else None
        if not isinstance(lens, list) or len(lens) != count or not all(
            type(n) is int and n >= 0 for n in lens
        ):
            raise ProtocolError(f"arrays[{i}]: a string array needs one length >= 0 per element")
        if sum(lens) != nbytes:
            raise ProtocolError(
                f"arrays[{i}]: string lengths add up to {sum(lens)} bytes but the frame has {nbytes}"
            )
        data = bytes(frame) if isinstance(frame, bytes) else memoryview(frame).tobytes()
        out = np.empty(count, dtype=object)
        k = 0
        for j, n in enumerate(lens):
            out[j] = data[k : k + n]
            k += n
        return out.reshape(shape)
    if len(meta) != 2 or not isinstance(dts, str):
        raise ProtocolError(f"arrays[{i}]: dtype must be a string")
    dt = _DTYPE_CACHE.get(dts)
    if dt is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                dt = np.dtype(dts)
        except Exception:  # numpy raises TypeError, ValueError or warns for odd strings
            raise ProtocolError(f"arrays[{i}]: {dts!r} is not a dtype") from None
        if dt.kind not in "biufc" or dt.fields is not None or dt.subdtype is not None:
            raise ProtocolError(f"arrays[{i}]: dtype {dts!r} is not supported")
        if len(_DTYPE_CACHE) < 256:
            _DTYPE_CACHE[dts] = dt
    want = count * dt.itemsize
    if nbytes != want:
        raise ProtocolError(
            f"arrays[{i}]: {dt.name}{shape} needs {want} bytes but the frame has {nbytes}"
        )
    if count == 0:
        return np.empty(shape, dtype=dt)
    return np.frombuffer(frame, dtype=dt).reshape(shape)
