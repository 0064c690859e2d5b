# Pure module: imports numpy and qpipe.errors only. No I/O, no sockets, no loop.
"""Dtypes and shapes: normalise them, check items against a queue's spec, pad batches.

A queue's spec is its kind, capacity, component dtypes and shapes (plus
``min_after_dequeue`` and ``seed`` for shuffle queues). Clients use this module
to check and convert an item *before* anything is sent; the host uses it again
on what arrives, because a queue host must not trust its peers.

Conversion rules (stricter than TensorFlow, which casts silently):

* A value already of the component's dtype is taken as is.
* Integers and booleans convert to a wider or equal kind when every value fits
  (``int64 -> int32`` works for ``[1, 2]``, fails for ``[2**40]``);
  integers convert to floats and complex.
* Floats convert to other float widths (``float64 -> float32``) unless a finite
  value would overflow to infinity; floats never convert to integers.
* ``"string"`` components hold ``bytes``; ``str`` is encoded as UTF-8.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgumentError

__all__ = [
    "KINDS",
    "STRING",
    "QueueSpec",
    "dtype_name",
    "normalize_dtype",
    "normalize_shape",
    "pad_stack",
]

STRING = "string"
KINDS = ("fifo", "shuffle", "padding")
MAX_RANK = 32
_OBJECT = np.dtype(object)

Shape = tuple[int | None, ...] | None


def normalize_dtype(name: Any, where: str = "dtype") -> np.dtype:
    """Return the numpy dtype for a dtype name; ``"string"`` maps to ``object``.

    Raises :class:`InvalidArgumentError` for names that are not numeric,
    boolean or ``"string"``.
    """
    if isinstance(name, str) and name in (STRING, "bytes", "str"):
        return _OBJECT
    if isinstance(name, np.dtype) and name == _OBJECT:
        return _OBJECT
    if name is None:
        raise InvalidArgumentError(f"{where}: a dtype is required, got None; use e.g. 'float32' or 'string'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dt = np.dtype(name)
    except Exception:  # numpy raises TypeError, ValueError or warns for odd strings
        raise InvalidArgumentError(
            f"{where}: {name!r} is not a dtype; use a numpy dtype name such as 'float32' or 'string'"
        ) from None
    if dt.kind not in "biufc" or dt.hasobject or dt.fields is not None:
        raise InvalidArgumentError(
            f"{where}: {name!r} is not supported; use a numeric or bool numpy dtype or 'string'"
        )
    return dt


def dtype_name(dt: np.dtype) -> str:
    """The name a spec uses for a dtype: ``"float32"``, ``"string"``."""
    return STRING if dt == _OBJECT else dt.name


def normalize_shape(shape: Any, where: str = "shape") -> Shape:
    """Return a shape as a tuple of ints and ``None`` (unknown dimensions).

    ``None`` means the rank is unknown too. ``-1`` is accepted for an unknown
    dimension, as TensorFlow users write it.
    """
    if shape is None:
        return None
    if isinstance(shape, (int, np.integer)) or isinstance(shape, (str, bytes)):
        raise InvalidArgumentError(f"{where}: expected a list of dimensions, got {shape!r}")
    try:
        dims = list(shape)
    except TypeError:
        raise InvalidArgumentError(f"{where}: expected a list of dimensions, got {shape!r}") from None
    if len(dims) > MAX_RANK:
        raise InvalidArgumentError(f"{where}: rank {len(dims)} exceeds the maximum {MAX_RANK}")
    out: list[int | None] = []
    for i, d in enumerate(dims):
        if d is None or (isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d == -1):
            out.append(None)
        elif isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0:
            out.append(int(d))
        else:
            raise InvalidArgumentError(
                f"{where}[{i}]: expected a dimension >= 0 or None, got {d!r}"
            )
    return tuple(out)


def _shape_str(shape: Shape) -> str:
    if shape is None:
        return "<unknown>"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _compatible(actual: tuple[int, ...], expected: Shape) -> bool:
    if expected is None:
        return True
    if len(actual) != len(expected):
        return False
    return all(e is None or a == e for a, e in zip(actual, expected))


@dataclasses.dataclass(frozen=True)
class QueueSpec:
    """What a queue holds: kind, capacity, and the dtype and shape of each component.

    Build one with :meth:`make`, which checks everything and normalises names;
    two specs are the same queue declaration exactly when they compare equal.
    """

    kind: str
    capacity: int
    dtypes: tuple[str, ...]
    shapes: tuple[Shape, ...] | None
    min_after_dequeue: int = 0
    seed: int | None = None
    names: tuple[str, ...] | None = None

    @classmethod
    def make(
        cls,
        kind: str,
        capacity: int,
        dtypes: Sequence[Any],
        shapes: Sequence[Any] | None = None,
        min_after_dequeue: int = 0,
        seed: int | None = None,
        names: Sequence[str] | None = None,
        queue: str = "?",
    ) -> QueueSpec:
        """Check and normalise a declaration; raise :class:`InvalidArgumentError` naming the queue."""
        where = f"queue {queue!r}"
        if kind not in KINDS:
            raise InvalidArgumentError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if not _is_int(capacity) or capacity < 1:
            raise InvalidArgumentError(f"{where}: capacity must be an integer >= 1, got {capacity!r}")
        if isinstance(dtypes, (str, bytes)) or not isinstance(dtypes, Sequence) or not dtypes:
            raise InvalidArgumentError(
                f"{where}: dtypes must be a non-empty list of dtype names, got {dtypes!r}"
            )
        dts = tuple(
            dtype_name(normalize_dtype(d, f"{where}: dtypes[{i}]")) for i, d in enumerate(dtypes)
        )
        shp: tuple[Shape, ...] | None
        if shapes is None:
            shp = None
        else:
            if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence):
                raise InvalidArgumentError(f"{where}: shapes must be a list of shapes, got {shapes!r}")
            if len(shapes) != len(dts):
                raise InvalidArgumentError(
                    f"{where}: {len(dts)} dtypes but {len(shapes)} shapes; give one shape per component"
                )
            shp = tuple(normalize_shape(s, f"{where}: shapes[{i}]") for i, s in enumerate(shapes))
        if kind == "padding":
            if shp is None or any(s is None for s in shp):
                raise InvalidArgumentError(
                    f"{where}: a padding queue needs a shape of known rank for every component "
                    "(use None for the dimensions to pad)"
                )
        if not _is_int(min_after_dequeue) or min_after_dequeue < 0:
            raise InvalidArgumentError(
                f"{where}: min_after_dequeue must be an integer >= 0, got {min_after_dequeue!r}"
            )
        if kind == "shuffle":
            if min_after_dequeue >= capacity:
                raise InvalidArgumentError(
                    f"{where}: min_after_dequeue ({min_after_dequeue}) must be less than "
                    f"capacity ({capacity})"
                )
        elif min_after_dequeue:
            raise InvalidArgumentError(f"{where}: min_after_dequeue applies to shuffle queues only")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise InvalidArgumentError(f"{where}: seed must be an integer >= 0 or None, got {seed!r}")
        if kind != "shuffle" and seed is not None:
            raise InvalidArgumentError(f"{where}: seed applies to shuffle queues only")
        nms: tuple[str, ...] | None = None
        if names is not None:
            nms = tuple(names)
            if len(nms) != len(dts) or not all(isinstance(n, str) and n for n in nms):
                raise InvalidArgumentError(
                    f"{where}: names must be {len(dts)} non-empty strings, got {names!r}"
                )
            if len(set(nms)) != len(nms):
                raise InvalidArgumentError(f"{where}: names must be distinct, got {names!r}")
        return cls(kind, int(capacity), dts, shp, int(min_after_dequeue),
                   None if seed is None else int(seed), nms)

    # -- wire form ------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-friendly dict; :meth:`from_wire` inverts it."""
        return {
            "kind": self.kind,
            "capacity": self.capacity,
            "dtypes": list(self.dtypes),
            "shapes": None if self.shapes is None else [None if s is None else list(s) for s in self.shapes],
            "min_after_dequeue": self.min_after_dequeue,
            "seed": self.seed,
            "names": None if self.names is None else list(self.names),
        }

    @classmethod
    def from_wire(cls, d: Any, queue: str = "?") -> QueueSpec:
        """Rebuild and re-check a spec from its wire dict."""
        if not isinstance(d, dict):
            raise InvalidArgumentError(f"queue {queue!r}: spec must be a map, got {type(d).__name__}")
        unknown = set(d) - {"kind", "capacity", "dtypes", "shapes", "min_after_dequeue", "seed", "names"}
        if unknown:
            raise InvalidArgumentError(f"queue {queue!r}: unknown spec keys {sorted(map(str, unknown))}")
        return cls.make(
            d.get("kind"), d.get("capacity"), d.get("dtypes"), d.get("shapes"),
            d.get("min_after_dequeue", 0), d.get("seed"), d.get("names"), queue=queue,
        )

    # -- derived ----------------------------------------------------------------------

    @property
    def arity(self) -> int:
        """Number of components in an item."""
        return len(self.dtypes)

    @property
    def np_dtypes(self) -> tuple[np.dtype, ...]:
        return tuple(normalize_dtype(d) for d in self.dtypes)

    def shape(self, i: int) -> Shape:
        """Declared shape of component ``i`` (``None``: unknown rank)."""
        return None if self.shapes is None else self.shapes[i]

    def describe(self) -> str:
        comps = ", ".join(
            f"{d}{_shape_str(self.shape(i))}" for i, d in enumerate(self.dtypes)
        )
        return f"{self.kind}(capacity={self.capacity}; {comps})"


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# -- item checking ----------------------------------------------------------------------


class ItemChecker:
    """Checks and converts items for one queue; built once per queue handle.

    The same checks run on the client (to fail before sending) and on the host
    (to refuse anything a peer sends that does not fit).
    """

    __slots__ = ("spec", "queue", "_dtypes", "_shapes", "_arity")

    def __init__(self, spec: QueueSpec, queue: str) -> None:
        self.spec = spec
        self.queue = queue
        self._dtypes = spec.np_dtypes
        self._shapes = tuple(spec.shape(i) for i in range(spec.arity))
        self._arity = spec.arity

    def _components(self, item: Any, what: str) -> Sequence[Any]:
        if isinstance(item, (tuple, list)):
            if len(item) != self._arity:
                hint = ""
                if self._arity == 1:
                    hint = "; to pass a list as the single component, wrap it: (value,) or use a numpy array"
                raise InvalidArgumentError(
                    f"queue {self.queue!r}: {what} has {len(item)} components, the queue takes "
                    f"{self._arity}{hint}"
                )
            return item
        if isinstance(item, dict):
            names = self.spec.names
            if names is None:
                raise InvalidArgumentError(
                    f"queue {self.queue!r}: {what} is a dict but the queue has no component names"
                )
            if set(item) != set(names):
                raise InvalidArgumentError(
                    f"queue {self.queue!r}: {what} has keys {sorted(item)}, the queue's components "
                    f"are {list(names)}"
                )
            return [item[n] for n in names]
        if self._arity != 1:
            raise InvalidArgumentError(
                f"queue {self.queue!r}: {what} must be a tuple of {self._arity} components, got "
                f"{type(item).__name__}"
            )
        return (item,)

    def check_item(self, item: Any) -> list[np.ndarray]:
        """Return the item's components as contiguous arrays of the queue's dtypes and shapes."""
        comps = self._components(item, "item")
        out = []
        for i, v in enumerate(comps):
            a = self._convert(v, i, "item")
            if not _compatible(a.shape, self._shapes[i]):
                raise InvalidArgumentError(
                    f"queue {self.queue!r}: component {i} has shape {_shape_str(a.shape)}, "
                    f"the queue expects {_shape_str(self._shapes[i])}"
                )
            out.append(a)
        return out

    def check_batch(self, items: Any) -> tuple[list[np.ndarray], int]:
        """Return a batch's components (leading batch dimension) and the batch size."""
        comps = self._components(items, "batch")
        out = []
        n = None
        for i, v in enumerate(comps):
            a = self._convert(v, i, "batch")
            if a.ndim == 0:
                raise InvalidArgumentError(
                    f"queue {self.queue!r}: component {i} of a batch needs a leading batch "
                    "dimension, got a scalar"
                )
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise InvalidArgumentError(
                    f"queue {self.queue!r}: batch components disagree on the batch size: "
                    f"component 0 has {n}, component {i} has {a.shape[0]}"
                )
            if not _compatible(a.shape[1:], self._shapes[i]):
                raise InvalidArgumentError(
                    f"queue {self.queue!r}: component {i} items have shape {_shape_str(a.shape[1:])}, "
                    f"the queue expects {_shape_str(self._shapes[i])}"
                )
            out.append(a)
        return out, int(n or 0)

    def _convert(self, v: Any, i: int, what: str) -> np.ndarray:
        dt = self._dtypes[i]
        if dt is _OBJECT or dt == _OBJECT:
            return _to_strings(v, self.queue, i)
        if type(v) is np.ndarray and v.dtype == dt:
            return v if v.flags.c_contiguous else np.ascontiguousarray(v)
        try:
            a = np.asarray(v)
        except ValueError as e:  # ragged nested lists
            raise InvalidArgumentError(f"queue {self.queue!r}: component {i} of the {what} is not an array: {e}") from None
        if a.dtype != dt:
            a = _cast(a, dt, self.queue, i)
        # NOTE: np.ascontiguousarray would turn 0-d arrays into shape (1,).
        return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _cast(a: np.ndarray, dt: np.dtype, queue: str, i: int) -> np.ndarray:
    src = a.dtype
    where = f"queue {queue!r}: component {i}"
    if src.kind in "OSUV" or src.hasobject:
        raise InvalidArgumentError(
            f"{where} expects {dt.name}, got {('strings' if src.kind in 'SU' else src.name)}"
        )
    if np.can_cast(src, dt, "safe"):
        return a.astype(dt)
    if src.kind in "biu" and dt.kind in "iu":
        if a.size:
            lo, hi = a.min(), a.max()
            info = np.iinfo(dt)
            if lo < info.min or hi > info.max:
                raise InvalidArgumentError(
                    f"{where} expects {dt.name}, and value {hi if hi > info.max else lo} does not fit"
                )
        return a.astype(dt)
    if src.kind in "biu" and dt.kind in "fc":
        return a.astype(dt)
    if src.kind == "f" and dt.kind in "fc":
        with np.errstate(over="ignore", invalid="ignore"):
            out = a.astype(dt)
        if out.size and np.count_nonzero(np.isinf(out)) != np.count_nonzero(np.isinf(a)):
            raise InvalidArgumentError(f"{where} expects {dt.name}, and a value overflows it")
        return out
    if src.kind == "c" and dt.kind == "c":
        return a.astype(dt)
    raise InvalidArgumentError(
        f"{where} expects {dt.name}, got {src.name}; converting would lose information "
        f"(cast it yourself if that is intended)"
    )


def _to_strings(v: Any, queue: str, i: int) -> np.ndarray:
    if isinstance(v, np.ndarray) and v.dtype == _OBJECT:
        a = v
    elif isinstance(v, (bytes, str)):
        a = np.empty((), dtype=object)
        a[()] = v
    else:
        a = np.asarray(v, dtype=object)
    flat = a.reshape(-1)
    out = np.empty(a.shape, dtype=object)
    oflat = out.reshape(-1)
    for k, x in enumerate(flat):
        if isinstance(x, bytes):
            oflat[k] = x
        elif isinstance(x, str):
            oflat[k] = x.encode("utf-8")
        elif isinstance(x, (bytearray, memoryview, np.bytes_)):
            oflat[k] = bytes(x)
        else:
            raise InvalidArgumentError(
                f"queue {queue!r}: component {i} holds strings, got a {type(x).__name__} element"
            )
    return out


# -- padding ----------------------------------------------------------------------------


def pad_stack(parts: Sequence[np.ndarray], declared: Shape) -> np.ndarray:
    """Concatenate batches along axis 0, zero-padding every unknown dimension to the largest size.

    ``parts`` are arrays with a leading batch dimension; ``declared`` is the
    component's shape (``None`` entries are padded). Strings pad with ``b""``.
    """
    if len(parts) == 1 and declared is not None and None not in declared:
        return parts[0]
    rank = parts[0].ndim - 1
    target = [max(p.shape[d + 1] for p in parts) for d in range(rank)]
    if all(list(p.shape[1:]) == target for p in parts):
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    n = sum(p.shape[0] for p in parts)
    dt = parts[0].dtype
    out = np.empty((n, *target), dtype=dt)
    out[...] = b"" if dt == _OBJECT else 0
    k = 0
    for p in parts:
        idx = (slice(k, k + p.shape[0]),) + tuple(slice(0, s) for s in p.shape[1:])
        out[idx] = p
        k += p.shape[0]
    return out


def batch_nbytes(arrays: Sequence[np.ndarray]) -> int:
    """Bytes an item or batch takes on the wire (strings: their lengths)."""
    total = 0
    for a in arrays:
        if a.dtype == _OBJECT:
            total += sum(len(x) for x in a.reshape(-1))
        else:
            total += a.nbytes
    return total

