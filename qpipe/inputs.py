# Leaf module: imports only numpy and the standard library, never another qpipe module.
"""Record decoders for input pipelines: CSV, fixed-length binary records, .npy, file names.

A reader node turns files into queue items. This module does the part that needs no
queue: it lists and shuffles the files, and decodes each file into items, where an
item is a tuple of numpy arrays ("components", such as a feature vector and a label).

Every decoder offers the same three ways to read a file:

- ``read_records(path)`` yields one item at a time, each component without a batch
  dimension; feed these to ``enqueue``.
- ``read_batches(path, batch_size)`` yields items stacked along a new leading axis,
  ``batch_size`` at a time (the last batch may be shorter); feed these to
  ``enqueue_many``. This is the fast path: it does no Python work per item.
- ``read_all(path)`` returns the whole file as one batch, e.g. a validation set.

The decoders are `CsvDecoder`, `FixedLengthRecordDecoder` and `NpyDecoder`. Their
`dtypes` and `shapes` describe one item, ready for declaring the queue that receives
them. A file that does not fit its decoder raises `DecodeError`, whose one-sentence
message names the file, and for CSV the 1-based line and the column::

    data/train-0.csv:17: column 'pixel3': could not parse 'abc' as int64

The handwritten-digits CSV shards in ``topologies/data/digits`` read like this::

    columns = {f"pixel{i}": "float32" for i in range(64)} | {"label": "int64"}
    decoder = CsvDecoder(columns, components=[slice("pixel0", "pixel63"), "label"])
    for path in filename_epochs("topologies/data/digits/train-*.csv", num_epochs=2, seed=1):
        for features, labels in decoder.read_batches(path, 32):
            ...  # features: float32 (32, 64); labels: int64 (32,)

`filename_epochs` yields file names epoch after epoch in a new seeded order each
epoch; `list_files` expands glob patterns; `shard_files` splits files among replicas.

The decoders hold only their configuration and, for CSV, the count of skipped rows,
so one decoder may be shared by several reader threads.
"""

from __future__ import annotations

import csv
import glob
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np

__all__ = [
    "CsvDecoder",
    "DecodeError",
    "FixedLengthRecordDecoder",
    "NpyDecoder",
    "filename_epochs",
    "list_files",
    "shard_files",
]

PathLike: TypeAlias = str | os.PathLike[str]
Item: TypeAlias = tuple[np.ndarray, ...]
ColumnSelector: TypeAlias = str | Sequence[str] | slice

# Rows (or records) decoded at once; bounds memory and amortises the numpy calls per block.
_BLOCK_ROWS = 1024
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


class DecodeError(ValueError):
    """Raised when a data file does not fit its decoder.

    The message is one sentence naming the file, and where they apply the 1-based
    line and the column, e.g. ``data/train-0.csv:17: column 'pixel3': could not
    parse 'abc' as int64``, or ``data/cifar-0.bin: 30733 bytes do not fit
    header_bytes=0 + N * record_bytes=3073 + footer_bytes=0, since 3 bytes are left
    over after 10 records``.

    Attributes
    ----------
    path : str
        The file.
    line : int or None
        The 1-based line where the bad CSV row starts, if the error concerns one.
    column : str or None
        The CSV column, if the error concerns one field.
    """

    def __init__(self, message: str, *, path: PathLike, line: int | None = None, column: str | None = None) -> None:
        super().__init__(message)
        self.path = os.fspath(path)
        self.line = line
        self.column = column


class _Decoder:
    """Shared reading logic; a subclass supplies `_blocks`, `dtypes` and `shapes`."""

    @property
    def dtypes(self) -> tuple[np.dtype, ...] | None:
        """The dtype of each component of an item, or None where not known until a file is read."""
        raise NotImplementedError

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...] | None:
        """The shape of each component of one item (no batch axis), or None where not known."""
        raise NotImplementedError

    def _blocks(self, path: PathLike, block_rows: int | None) -> Iterator[Item]:
        """Yield the file's items in blocks of at most ``block_rows`` (None: exactly one block)."""
        raise NotImplementedError

    def read_records(self, path: PathLike) -> Iterator[Item]:
        """Yield the items of one file, one at a time.

        Parameters
        ----------
        path : str or os.PathLike
            The file to read.

        Yields
        ------
        tuple of numpy.ndarray
            One array per component, without a batch axis (a scalar component is a
            0-d array). The arrays are views into a block of decoded rows.

        Raises
        ------
        DecodeError
            While iterating, when the file does not fit the decoder. The items before
            the bad one have been yielded.
        OSError
            While iterating, when the file cannot be opened or read.
        """
        for block in self._blocks(path, _BLOCK_ROWS):
            for index in range(len(block[0])):
                yield tuple(array[index, ...] for array in block)

    def read_batches(self, path: PathLike, batch_size: int) -> Iterator[Item]:
        """Yield the items of one file stacked in batches of ``batch_size``.

        Parameters
        ----------
        path : str or os.PathLike
            The file to read.
        batch_size : int
            Items per batch, at least 1. The last batch holds the rest and may be
            shorter; no item is dropped.

        Yields
        ------
        tuple of numpy.ndarray
            One C-contiguous array per component, with a leading batch axis.

        Raises
        ------
        TypeError, ValueError
            At once, if ``batch_size`` is not a positive int.
        DecodeError
            While iterating, when the file does not fit the decoder. The full batches
            before the bad item have been yielded; the batch holding it is not.
        OSError
            While iterating, when the file cannot be opened or read.
        """
        _check_count("batch_size", batch_size)
        return _rebatch(self._blocks(path, max(batch_size, _BLOCK_ROWS)), batch_size)

    def read_all(self, path: PathLike) -> Item:
        """Read a whole file as one batch.

        Parameters
        ----------
        path : str or os.PathLike
            The file to read.

        Returns
        -------
        tuple of numpy.ndarray
            One array per component, with a leading axis as long as the file has
            items (possibly 0).

        Raises
        ------
        DecodeError
            When the file does not fit the decoder.
        OSError
            When the file cannot be opened or read.
        """
        return _merge(list(self._blocks(path, None)))


def _rebatch(blocks: Iterable[Item], batch_size: int) -> Iterator[Item]:
    """Cut a stream of variable-length blocks into batches of exactly ``batch_size``, then the rest."""
    pending: list[Item] = []
    count = 0
    for block in blocks:
        if len(block[0]) == 0:
            continue
        pending.append(block)
        count += len(block[0])
        while count >= batch_size:
            merged = _merge(pending)
            yield tuple(np.ascontiguousarray(array[:batch_size]) for array in merged)
            count -= batch_size
            pending = [tuple(array[batch_size:] for array in merged)] if count else []
    if count:
        yield tuple(np.ascontiguousarray(array) for array in _merge(pending))


def _merge(blocks: list[Item]) -> Item:
    if len(blocks) == 1:
        return blocks[0]
    return tuple(np.concatenate(parts) for parts in zip(*blocks, strict=True))


def _check_count(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {value}")


# --------------------------------------------------------------------------- CSV


@dataclass(frozen=True)
class _Column:
    name: str
    dtype: np.dtype
    dtype_name: str  # as the user knows it: "int64", "float32", "bool", "string"
    default: Any  # None: the field is required


@dataclass(frozen=True)
class _Group:
    """Declared columns decoded together: a component, or a column in no component."""

    columns: tuple[_Column, ...]
    vector: bool  # False: one scalar column, returned without the column axis
    returned: bool  # False: decoded only to check it

    @property
    def dtype(self) -> np.dtype:
        return self.columns[0].dtype


class _FieldError(Exception):
    """A field failed to parse; ``reason`` completes "column 'x': ..."."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CsvDecoder(_Decoder):
    """Decodes CSV files into items of typed numpy arrays.

    Each declared column has a dtype and, optionally, a default for empty or missing
    fields. Columns are grouped into components: a single column gives a scalar
    component, several columns a vector component of their shared dtype. A row that
    does not parse raises `DecodeError` naming the file, line and column, or, with
    ``on_error="skip"``, is skipped and counted in `skipped`.

    Parameters
    ----------
    columns : mapping or sequence of (name, dtype) pairs
        The columns to decode, in order. A dtype is a numpy bool, integer or float
        type (``"int64"``, ``np.float32``, ...) or ``"string"``. With a header, columns
        are found by name, so their order in the file does not matter and undeclared
        file columns are ignored; without one, the file's columns are exactly these.
    defaults : mapping of str to value, optional
        The value for a column whose field is empty (or only whitespace, for a
        non-string column) or missing because the row ends early. A column without
        a default must have a value in every row; give a string column the default
        ``""`` to allow empty strings.
    components : sequence of selectors, optional
        How columns are grouped into an item. A selector is a column name (scalar
        component), a list of names (vector component), or ``slice("a", "b")``, the
        declared columns from ``a`` to ``b`` inclusive (vector component). The
        default makes each declared column a scalar component. A declared column in
        no component is still checked, then dropped.
    header : bool
        Whether the first line of each file names the columns.
    delimiter : str
        The field separator, one character.
    on_error : {"raise", "skip"}
        What a bad row does: raise `DecodeError`, or be skipped, counted in
        `skipped`, and described in `skip_messages` (the first ``max_messages``).
        Errors in the header, the encoding or the CSV quoting always raise.
    max_messages : int
        How many skip messages to keep.

    Raises
    ------
    ValueError
        If a column, dtype, default or selector is invalid; the message names it.
    TypeError
        If a selector is neither a name, a list of names nor a slice of names.

    Notes
    -----
    Fields are parsed with Python's ``int`` and ``float`` syntax (surrounding
    whitespace allowed); a bool is ``true``, ``false``, ``1`` or ``0`` in any case. A
    value outside its dtype's range is an error, never wrapped or rounded to
    infinity. A float field in an integer column is an error, not truncated.
    Completely blank lines carry no record and are passed over.

    Examples
    --------
    >>> columns = {f"pixel{i}": "float32" for i in range(64)} | {"label": "int64"}
    >>> decoder = CsvDecoder(columns, components=[slice("pixel0", "pixel63"), "label"])
    >>> decoder.dtypes, decoder.shapes
    ((dtype('float32'), dtype('int64')), ((64,), ()))
    """

    def __init__(
        self,
        columns: Mapping[str, Any] | Sequence[tuple[str, Any]],
        *,
        defaults: Mapping[str, Any] | None = None,
        components: Sequence[ColumnSelector] | None = None,
        header: bool = True,
        delimiter: str = ",",
        on_error: Literal["raise", "skip"] = "raise",
        max_messages: int = 10,
    ) -> None:
        pairs = list(columns.items()) if isinstance(columns, Mapping) else [tuple(pair) for pair in columns]
        if not pairs:
            raise ValueError("CsvDecoder needs at least one column")
        names = [name for name, _ in pairs]
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"column names must be non-empty strings, not {name!r}")
            if names.count(name) > 1:
                raise ValueError(f"column {name!r} is declared {names.count(name)} times")
        defaults = dict(defaults or {})
        unknown = [name for name in defaults if name not in names]
        if unknown:
            raise ValueError(f"defaults name {unknown[0]!r}, which is not a declared column")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        if not isinstance(delimiter, str) or len(delimiter) != 1:
            raise ValueError(f"delimiter must be one character, not {delimiter!r}")
        _check_count("max_messages", max_messages, minimum=0)

        self._columns = tuple(_make_column(name, dtype, defaults.get(name)) for name, dtype in pairs)
        self._groups = _make_groups(self._columns, components)
        self._header = header
        self._delimiter = delimiter
        self._on_error = on_error
        self._max_messages = max_messages
        self._stats_lock = threading.Lock()
        self._skipped = 0
        self._skip_messages: list[str] = []

    @property
    def column_names(self) -> tuple[str, ...]:
        """The declared column names, in declaration order."""
        return tuple(column.name for column in self._columns)

    @property
    def dtypes(self) -> tuple[np.dtype, ...]:
        """The dtype of each component (``numpy.str_`` for string columns)."""
        return tuple(group.dtype for group in self._groups if group.returned)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shape of each component of one item: ``()`` or ``(number of columns,)``."""
        return tuple((len(group.columns),) if group.vector else () for group in self._groups if group.returned)

    @property
    def skipped(self) -> int:
        """How many bad rows ``on_error="skip"`` has skipped so far, over all files read."""
        with self._stats_lock:
            return self._skipped

    @property
    def skip_messages(self) -> tuple[str, ...]:
        """The `DecodeError` messages of the first ``max_messages`` skipped rows."""
        with self._stats_lock:
            return tuple(self._skip_messages)

    def _blocks(self, path: PathLike, block_rows: int | None) -> Iterator[Item]:
        path = os.fspath(path)
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file, delimiter=self._delimiter, strict=True)
            try:
                width, positions = self._read_header(path, reader)
                while True:
                    rows = _read_rows(reader, block_rows)
                    if rows or block_rows is None:
                        yield from self._decode(path, rows, width, positions)
                    if block_rows is None or len(rows) < block_rows:
                        return
            except csv.Error as exc:
                line = reader.line_num
                raise DecodeError(f"{path}:{line}: malformed CSV: {exc}", path=path, line=line) from None
            except UnicodeDecodeError:
                raise _utf8_error(path) from None

    def _read_header(self, path: str, reader: Any) -> tuple[int, dict[str, int]]:
        """Return the number of fields per row and each declared column's field index."""
        if not self._header:
            return len(self._columns), {column.name: index for index, column in enumerate(self._columns)}
        header = next(reader, None)
        if header is None:
            raise DecodeError(f"{path}: the file is empty, but a header line was expected (header=True)", path=path)
        line = reader.line_num
        fields = [field.strip() for field in header]
        positions: dict[str, int] = {}
        for index, name in enumerate(fields):
            if name in positions and any(column.name == name for column in self._columns):
                raise DecodeError(
                    f"{path}:{line}: the header names column {name!r} twice "
                    f"(fields {positions[name] + 1} and {index + 1})",
                    path=path,
                    line=line,
                    column=name,
                )
            positions.setdefault(name, index)
        missing = [column.name for column in self._columns if column.name not in positions]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DecodeError(
                f"{path}:{line}: the header lacks declared column {missing[0]!r}{more}; "
                f"its {len(fields)} columns are {_preview(fields)}",
                path=path,
                line=line,
                column=missing[0],
            )
        return len(fields), {column.name: positions[column.name] for column in self._columns}

    def _decode(
        self, path: str, rows: list[tuple[int, list[str]]], width: int, positions: dict[str, int]
    ) -> Iterator[Item]:
        """Yield the decoded block of ``rows``, less bad rows (skip) or up to the first bad one (raise)."""
        # errors: row index -> (field index, column, message); the lowest field index wins, -1 for the row.
        errors: dict[int, tuple[int, str | None, str]] = {}
        padded = []
        for index, (line, fields) in enumerate(rows):
            if len(fields) > width:
                expected = f"{width} as in the header" if self._header else f"{width}"
                errors[index] = (-1, None, f"{path}:{line}: found {len(fields)} fields, expected {expected}")
                fields = fields[:width]
            elif len(fields) < width:
                fields = fields + [""] * (width - len(fields))
            padded.append(fields)
        table = np.array(padded, dtype=np.str_) if padded else np.empty((0, width), dtype=np.str_)

        values = []
        for group in self._groups:
            group_positions = [positions[column.name] for column in group.columns]
            array, group_errors = _parse_group(table[:, group_positions], group)
            for row, column_index, reason in group_errors:
                position = group_positions[column_index]
                if row not in errors or position < errors[row][0]:
                    name = group.columns[column_index].name
                    errors[row] = (position, name, f"{path}:{rows[row][0]}: column {name!r}: {reason}")
            if group.returned:
                values.append(array)

        if not errors:
            yield tuple(values)
            return
        if self._on_error == "raise":
            first = min(errors)
            if first:
                yield tuple(array[:first] for array in values)
            _, column, message = errors[first]
            raise DecodeError(message, path=path, line=rows[first][0], column=column)
        with self._stats_lock:
            self._skipped += len(errors)
            room = max(self._max_messages - len(self._skip_messages), 0)
            self._skip_messages.extend(errors[row][2] for row in sorted(errors)[:room])
        keep = np.ones(len(rows), dtype=bool)
        keep[list(errors)] = False
        yield tuple(array[keep] for array in values)


def _utf8_error(path: str) -> DecodeError:
    """Find the first line of ``path`` that is not valid UTF-8 and describe it."""
    # NOTE: a text-mode file decodes ahead in 8 KiB chunks, so the reader's line count at
    # the failure can be short of the bad line; rescan the bytes to name the right one.
    with open(path, "rb") as file:
        for line, raw in enumerate(file, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                message = f"{path}:{line}: byte {exc.start + 1} of the line is not valid UTF-8 ({exc.reason})"
                return DecodeError(message, path=path, line=line)
    return DecodeError(f"{path}: the file is not valid UTF-8", path=path)


def _read_rows(reader: Any, limit: int | None) -> list[tuple[int, list[str]]]:
    """Read up to ``limit`` non-blank rows, each with the 1-based line it starts on."""
    rows = []
    while limit is None or len(rows) < limit:
        line = reader.line_num + 1
        fields = next(reader, None)
        if fields is None:
            break
        if fields:
            rows.append((line, fields))
    return rows


def _make_column(name: str, dtype: Any, default: Any) -> _Column:
    if isinstance(dtype, str) and dtype == "string":
        resolved = np.dtype(np.str_)
    else:
        try:
            resolved = np.dtype(dtype)
        except TypeError:
            raise ValueError(
                f"column {name!r}: {dtype!r} is not a dtype; use a numpy type name such as 'float32', or 'string'"
            ) from None
        if resolved.kind == "U":
            resolved = np.dtype(np.str_)
        elif resolved.kind not in "biuf":
            raise ValueError(
                f"column {name!r}: dtype {resolved} is not supported; use bool, an integer or float type, or 'string'"
            )
    dtype_name = "string" if resolved.kind == "U" else resolved.name
    column = _Column(name, resolved, dtype_name, None)
    if default is None:
        return column
    if resolved.kind == "U":
        if not isinstance(default, str):
            raise ValueError(f"column {name!r}: the default for a string column must be a str, not {default!r}")
        return _Column(name, resolved, dtype_name, np.str_(default))
    if str(default).strip() == "":
        raise ValueError(f"column {name!r}: the default {default!r} is empty")
    try:
        parsed = _parse_field(str(default), column)
    except _FieldError as exc:
        raise ValueError(
            f"column {name!r}: the default {default!r} is not a valid {dtype_name}: {exc.reason}"
        ) from None
    return _Column(name, resolved, dtype_name, parsed)


def _make_groups(columns: tuple[_Column, ...], selectors: Sequence[ColumnSelector] | None) -> tuple[_Group, ...]:
    by_name = {column.name: index for index, column in enumerate(columns)}
    if selectors is None:
        return tuple(_Group((column,), vector=False, returned=True) for column in columns)
    if isinstance(selectors, str | slice):
        raise TypeError(f"components must be a list of selectors, not a single {type(selectors).__name__}")
    if not selectors:
        raise ValueError("components must name at least one component")

    def lookup(name: Any, index: int) -> int:
        if not isinstance(name, str):
            raise TypeError(f"component {index}: column names must be strings, not {name!r}")
        if name not in by_name:
            raise ValueError(
                f"component {index}: {name!r} is not a declared column; declared are {_preview(list(by_name))}"
            )
        return by_name[name]

    groups = []
    for index, selector in enumerate(selectors):
        if isinstance(selector, str):
            groups.append(_Group((columns[lookup(selector, index)],), vector=False, returned=True))
            continue
        if isinstance(selector, slice):
            if selector.step is not None or not isinstance(selector.start, str) or not isinstance(selector.stop, str):
                raise TypeError(
                    f"component {index}: a slice selector takes two column names and no step, "
                    "like slice('pixel0', 'pixel63')"
                )
            first, last = lookup(selector.start, index), lookup(selector.stop, index)
            if first > last:
                raise ValueError(
                    f"component {index}: column {selector.start!r} is declared after {selector.stop!r}; "
                    "swap the slice ends"
                )
            chosen = columns[first : last + 1]
        elif isinstance(selector, Sequence):
            if not selector:
                raise ValueError(f"component {index} selects no columns")
            chosen = tuple(columns[lookup(name, index)] for name in selector)
        else:
            raise TypeError(
                f"component {index}: expected a column name, a list of names or slice('a', 'b'), not {selector!r}"
            )
        mixed = next((column for column in chosen if column.dtype != chosen[0].dtype), None)
        if mixed is not None:
            raise ValueError(
                f"component {index} mixes dtypes: {mixed.name!r} is {mixed.dtype_name} "
                f"but {chosen[0].name!r} is {chosen[0].dtype_name}"
            )
        groups.append(_Group(tuple(chosen), vector=True, returned=True))
    used = {column.name for group in groups for column in group.columns}
    groups.extend(_Group((column,), vector=False, returned=False) for column in columns if column.name not in used)
    return tuple(groups)


def _preview(names: Sequence[str], limit: int = 6) -> str:
    quoted = [repr(name) for name in names]
    if len(quoted) > limit:
        quoted = quoted[: limit - 1] + ["...", quoted[-1]]
    return ", ".join(quoted)


def _parse_group(text: np.ndarray, group: _Group) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """Parse a (rows, columns) block of fields; return the values and [(row, column index, reason)]."""
    if not (text == "").any():
        try:
            values = _parse_array(text, group.dtype)
        except (ValueError, OverflowError):
            pass  # find the bad fields one column at a time below
        else:
            return (values if group.vector else values[:, 0]), []
    errors = []
    parsed = []
    for index, column in enumerate(group.columns):
        values, column_errors = _parse_column(text[:, index], column)
        parsed.append(values)
        errors.extend((row, index, reason) for row, reason in column_errors.items())
    return (np.stack(parsed, axis=1) if group.vector else parsed[0]), errors


def _parse_column(text: np.ndarray, column: _Column) -> tuple[np.ndarray, dict[int, str]]:
    """Parse one column's fields, with defaults for empty ones; return values and {row: reason}."""
    empty = text == ""
    if not empty.any():
        try:
            return _parse_array(text, column.dtype), {}
        except (ValueError, OverflowError):
            pass
    placeholder = np.zeros((), column.dtype)[()]
    values = []
    errors = {}
    for row, field in enumerate(text.tolist()):
        try:
            values.append(_parse_field(field, column))
        except _FieldError as exc:
            errors[row] = exc.reason
            values.append(placeholder)
    return np.array(values, dtype=column.dtype), errors


def _parse_field(field: str, column: _Column) -> Any:
    """Parse one field the way `_parse_array` would, or raise `_FieldError` saying why not."""
    if column.dtype.kind != "U":
        field = field.strip()
    if field == "":
        if column.default is None:
            raise _FieldError("the field is empty and the column has no default")
        return column.default
    try:
        return _parse_array(np.array([field], dtype=np.str_), column.dtype)[0]
    except ValueError:
        raise _FieldError(f"could not parse {field!r} as {column.dtype_name}") from None
    except OverflowError:
        if column.dtype.kind == "f":
            bound = f"magnitudes up to {np.finfo(column.dtype).max:.4g}"
        else:
            info = np.iinfo(column.dtype)
            bound = f"{info.min} to {info.max}"
        raise _FieldError(f"{field} is out of range for {column.dtype_name} ({bound})") from None


def _parse_array(text: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Parse an array of strings into ``dtype``.

    Raises ValueError for a field that does not parse and OverflowError for a value
    outside the dtype's range. Empty fields are the caller's business.
    """
    kind = dtype.kind
    if kind == "U":
        return text
    if kind == "b":
        lowered = np.char.lower(np.char.strip(text))
        true = (lowered == "true") | (lowered == "1")
        if not (true | (lowered == "false") | (lowered == "0")).all():
            raise ValueError("not a bool")
        return true
    if kind == "u" and dtype.itemsize == 8:
        # NOTE: int64 cannot hold the top half of uint64, so parse with Python ints.
        numbers = [int(field) for field in text.ravel().tolist()]
        if any(number < 0 or number > np.iinfo(np.uint64).max for number in numbers):
            raise OverflowError("out of range for uint64")
        return np.array(numbers, dtype=np.uint64).reshape(text.shape)
    if kind in "iu":
        # NOTE: parse wide and check the range ourselves; a narrowing cast would wrap silently.
        wide = text.astype(np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise OverflowError(f"out of range for {dtype}")
        return wide.astype(dtype)
    if dtype.itemsize > 8:
        return text.astype(dtype)
    wide = text.astype(np.float64)
    if dtype == np.float64:
        return wide
    with np.errstate(over="ignore"):
        narrow = wide.astype(dtype)
    if (np.isinf(narrow) & np.isfinite(wide)).any():
        raise OverflowError(f"out of range for {dtype}")
    return narrow


# --------------------------------------------------------------------------- binary


class FixedLengthRecordDecoder(_Decoder):
    """Decodes files of fixed-length binary records, like TensorFlow's FixedLengthRecordReader.

    A file is ``header_bytes``, then N records of ``record_bytes`` each, then
    ``footer_bytes``. Each record holds one or more components, each an array of a
    given dtype and shape at a byte offset within the record. The file is memory
    mapped; values are copied out in native byte order.

    Parameters
    ----------
    record_bytes : int
        The size of one record.
    components : sequence of (dtype, shape) or (dtype, shape, offset)
        One entry per component of an item. ``shape`` is ``()`` for a scalar. Without
        an offset, a component starts where the previous one ends (the first at 0).
        A dtype may give a byte order, such as ``">u2"`` for big-endian.
    header_bytes, footer_bytes : int
        Bytes to skip at the start and at the end of each file.

    Raises
    ------
    ValueError
        If a size is negative, a dtype is an object type, or a component does not fit
        in ``record_bytes``; the message names the component and the numbers.

    Examples
    --------
    CIFAR-10's binary files: one label byte, then a 3x32x32 image.

    >>> decoder = FixedLengthRecordDecoder(3073, [("uint8", ()), ("uint8", (3, 32, 32))])
    """

    def __init__(
        self,
        record_bytes: int,
        components: Sequence[tuple[Any, Any] | tuple[Any, Any, int]],
        *,
        header_bytes: int = 0,
        footer_bytes: int = 0,
    ) -> None:
        _check_count("record_bytes", record_bytes)
        _check_count("header_bytes", header_bytes, minimum=0)
        _check_count("footer_bytes", footer_bytes, minimum=0)
        if not components:
            raise ValueError("FixedLengthRecordDecoder needs at least one component")
        formats, offsets, dtypes, shapes = [], [], [], []
        end = 0
        for index, spec in enumerate(components):
            if len(spec) not in (2, 3):
                raise ValueError(f"component {index} must be (dtype, shape) or (dtype, shape, offset), not {spec!r}")
            dtype = np.dtype(spec[0])
            shape = (spec[1],) if isinstance(spec[1], int | np.integer) else tuple(spec[1])
            offset = spec[2] if len(spec) == 3 else end
            if dtype.hasobject:
                raise ValueError(f"component {index}: dtype {dtype} holds Python objects, which raw bytes cannot")
            if any(size < 0 for size in shape):
                raise ValueError(f"component {index}: shape {shape} has a negative size")
            _check_count(f"component {index} offset", offset, minimum=0)
            size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            end = offset + size
            if end > record_bytes:
                raise ValueError(
                    f"component {index} ({dtype} of shape {shape}, {size} bytes at offset {offset}) "
                    f"ends at byte {end}, past record_bytes={record_bytes}"
                )
            formats.append((dtype, shape))
            offsets.append(offset)
            dtypes.append(dtype.newbyteorder("="))
            shapes.append(shape)
        self._record_bytes = record_bytes
        self._header_bytes = header_bytes
        self._footer_bytes = footer_bytes
        self._record = np.dtype(
            {
                "names": [f"c{index}" for index in range(len(formats))],
                "formats": formats,
                "offsets": offsets,
                "itemsize": record_bytes,
            }
        )
        self._dtypes = tuple(dtypes)
        self._shapes = tuple(shapes)

    @property
    def dtypes(self) -> tuple[np.dtype, ...]:
        """The dtype of each component, in native byte order."""
        return self._dtypes

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shape of each component of one record."""
        return self._shapes

    def count_records(self, path: PathLike) -> int:
        """Return how many records the file holds, after checking that its size fits.

        Raises
        ------
        DecodeError
            If the file size is not ``header_bytes + N * record_bytes + footer_bytes``.
        OSError
            If the file cannot be read.
        """
        path = os.fspath(path)
        size = os.path.getsize(path)
        layout = (
            f"header_bytes={self._header_bytes} + N * record_bytes={self._record_bytes} "
            f"+ footer_bytes={self._footer_bytes}"
        )
        body = size - self._header_bytes - self._footer_bytes
        if body < 0:
            raise DecodeError(
                f"{path}: {size} bytes do not fit {layout}, since the file is {-body} bytes too short even for N = 0",
                path=path,
            )
        if body % self._record_bytes:
            raise DecodeError(
                f"{path}: {size} bytes do not fit {layout}, since {body % self._record_bytes} bytes are left over "
                f"after {body // self._record_bytes} records",
                path=path,
            )
        return body // self._record_bytes

    def _blocks(self, path: PathLike, block_rows: int | None) -> Iterator[Item]:
        count = self.count_records(path)
        if count == 0:
            # NOTE: numpy cannot memory-map zero bytes.
            yield tuple(np.empty((0, *shape), dtype) for dtype, shape in zip(self._dtypes, self._shapes, strict=True))
            return
        # asarray: a plain ndarray view, so that copies taken from it are not np.memmap objects.
        records = np.asarray(np.memmap(path, dtype=self._record, mode="r", offset=self._header_bytes, shape=(count,)))
        step = block_rows or count
        for start in range(0, count, step):
            chunk = records[start : start + step]
            yield tuple(
                chunk[name].astype(dtype) for name, dtype in zip(self._record.names, self._dtypes, strict=True)
            )


class NpyDecoder(_Decoder):
    """Decodes ``.npy`` files: items are the slices of the stored array along axis 0.

    Each item has one component. Files are loaded with ``allow_pickle=False``, so an
    object array is rejected rather than unpickled, and memory-mapped by default.

    Parameters
    ----------
    dtype : dtype-like, optional
        The dtype every file must hold. Checked, never cast: a mismatch raises.
    shape : tuple of int, optional
        The shape of one item (the stored shape without its first axis), checked
        likewise.
    mmap : bool
        Memory-map files rather than reading them whole.

    Examples
    --------
    >>> decoder = NpyDecoder(dtype="float32", shape=(64,))
    """

    def __init__(self, dtype: Any = None, shape: Sequence[int] | None = None, *, mmap: bool = True) -> None:
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._shape = None if shape is None else tuple(int(size) for size in shape)
        self._mmap = mmap

    @property
    def dtypes(self) -> tuple[np.dtype, ...] | None:
        """``(dtype,)`` if a dtype was given, else None."""
        return None if self._dtype is None else (self._dtype,)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...] | None:
        """``(shape,)`` if a shape was given, else None."""
        return None if self._shape is None else (self._shape,)

    def load(self, path: PathLike) -> np.ndarray:
        """Open one file and check it, returning the whole (possibly memory-mapped) array.

        Raises
        ------
        DecodeError
            If the file is not a .npy file, holds objects, is 0-d, or does not have the
            declared dtype or item shape.
        OSError
            If the file cannot be read.
        """
        path = os.fspath(path)
        with open(path, "rb") as file:
            magic = file.read(len(_NPY_MAGIC))
        if magic.startswith(_ZIP_MAGIC):
            raise DecodeError(f"{path}: is an .npz archive; NpyDecoder reads .npy files only", path=path)
        if magic != _NPY_MAGIC:
            raise DecodeError(f"{path}: is not a .npy file (it does not start with the .npy magic bytes)", path=path)
        try:
            array = np.load(path, mmap_mode="r" if self._mmap else None, allow_pickle=False)
        except ValueError as exc:
            if "object" in str(exc) or "pickle" in str(exc):
                message = f"{path}: holds Python objects, which are never unpickled; store a numeric array"
                raise DecodeError(message, path=path) from None
            raise DecodeError(f"{path}: cannot be read as .npy: {exc}", path=path) from None
        if array.ndim == 0:
            raise DecodeError(f"{path}: holds a 0-d array, but items are taken along axis 0", path=path)
        if self._dtype is not None and array.dtype != self._dtype:
            raise DecodeError(f"{path}: holds {array.dtype} values, but the decoder expects {self._dtype}", path=path)
        if self._shape is not None and array.shape[1:] != self._shape:
            raise DecodeError(
                f"{path}: holds items of shape {array.shape[1:]}, but the decoder expects {self._shape}", path=path
            )
        return array

    def _blocks(self, path: PathLike, block_rows: int | None) -> Iterator[Item]:
        array = self.load(path)
        step = block_rows or max(len(array), 1)
        for start in range(0, max(len(array), 1), step):
            yield (np.array(array[start : start + step]),)


# --------------------------------------------------------------------------- file names


def list_files(patterns: PathLike | Iterable[PathLike]) -> list[str]:
    """Expand glob patterns into a list of files.

    Each pattern's matches are sorted; patterns keep their order; a file matched
    twice is listed once. ``**`` matches across directories. A pattern that names an
    existing file is taken literally, even if it contains glob characters. Only
    regular files are listed.

    Parameters
    ----------
    patterns : str, os.PathLike, or iterable of them
        Glob patterns or file names.

    Returns
    -------
    list of str

    Raises
    ------
    FileNotFoundError
        If a pattern matches no file; the message names the pattern.
    ValueError
        If no pattern is given.
    """
    if isinstance(patterns, str | os.PathLike):
        patterns = [patterns]
    files: dict[str, None] = {}
    count = 0
    for pattern in patterns:
        count += 1
        pattern = os.fspath(pattern)
        if os.path.isfile(pattern):
            matches = [pattern]
        else:
            matches = sorted(match for match in glob.glob(pattern, recursive=True) if os.path.isfile(match))
        if not matches:
            where = "" if os.path.isabs(pattern) else f" (relative to {os.getcwd()})"
            raise FileNotFoundError(f"file pattern {pattern!r} matches no files{where}")
        files.update(dict.fromkeys(matches))
    if not count:
        raise ValueError("no file patterns were given")
    return list(files)


def filename_epochs(
    patterns: PathLike | Iterable[PathLike],
    num_epochs: int | None = None,
    *,
    shuffle: bool = True,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield file names epoch after epoch, in a new order each epoch.

    The patterns are expanded once, at the call, with `list_files`. Each epoch
    yields every file once; with ``shuffle`` the order is a fresh permutation per
    epoch, drawn from a generator seeded with ``seed``, so the same seed gives the
    same sequence of epochs. This is what a reader feeds to a file-name queue.

    Parameters
    ----------
    patterns : str, os.PathLike, or iterable of them
        Glob patterns or file names, as for `list_files`.
    num_epochs : int, optional
        How many epochs, at least 1; None repeats forever.
    shuffle : bool
        Shuffle each epoch; if False, every epoch is in `list_files` order.
    seed : int, optional
        Seed of the shuffle; None draws fresh entropy.

    Returns
    -------
    iterator of str

    Raises
    ------
    FileNotFoundError
        At once, if a pattern matches no file.
    TypeError, ValueError
        At once, if ``num_epochs`` is not None or a positive int.

    Examples
    --------
    >>> for name in filename_epochs("data/train-*.csv", num_epochs=2, seed=7):
    ...     queue.enqueue(name)
    """
    if num_epochs is not None:
        _check_count("num_epochs", num_epochs)
    files = list_files(patterns)
    return _epochs(files, num_epochs, shuffle, seed)


def _epochs(files: list[str], num_epochs: int | None, shuffle: bool, seed: int | None) -> Iterator[str]:
    rng = np.random.default_rng(seed)
    epoch = 0
    while num_epochs is None or epoch < num_epochs:
        if shuffle:
            yield from (files[index] for index in rng.permutation(len(files)))
        else:
            yield from files
        epoch += 1


def shard_files(files: Sequence[str], replica: int, num_replicas: int) -> list[str]:
    """Return the files of one replica: ``files[replica::num_replicas]``.

    Parameters
    ----------
    files : sequence of str
        All the files, in the same order on every replica (as `list_files` gives).
    replica : int
        This replica's index, from 0 to ``num_replicas - 1``.
    num_replicas : int
        How many replicas share the files.

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        If ``replica`` is out of range, or the replica would get no file because
        there are fewer files than replicas.
    """
    _check_count("num_replicas", num_replicas)
    _check_count("replica", replica, minimum=0)
    if replica >= num_replicas:
        raise ValueError(f"replica {replica} is out of range for {num_replicas} replicas (0 to {num_replicas - 1})")
    shard = list(files)[replica::num_replicas]
    if not shard:
        raise ValueError(
            f"replica {replica} of {num_replicas} gets no files, since only {len(files)} were given; "
            f"use at most {len(files)} replicas"
        )
    return shard
