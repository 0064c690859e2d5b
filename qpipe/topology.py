# Imports only the standard library: a topology is read and checked before anything starts.
"""Topology files: TOML in, frozen dataclasses out, every mistake reported.

A topology file declares the machines (``[hosts.*]``), the queue-server
processes (``[queue_hosts.*]``), the queues (``[queues.*]``) and the nodes
(``[nodes.*]``) of one pipeline, and which node writes and reads which queue.
:func:`load` reads a file, checks all of it, and returns a :class:`Topology`;
nothing is started. ``topologies/README.md`` documents every key.

Example::

    [pipeline]
    name = "digits"

    [queue_hosts.qh]
    port = 5555

    [queues.instances]
    kind = "shuffle"
    capacity = 1000
    min_after_dequeue = 200
    dtypes = ["float32", "int64"]
    shapes = [[64], []]

    [nodes.reader]
    kind = "reader"
    writes = ["instances"]
    [nodes.reader.params]
    files = "data/digits/train-*.csv"
    components = [
      { name = "image", columns = "0:64", dtype = "float32" },
      { name = "label", columns = 64, dtype = "int64" },
    ]

    [nodes.count]
    kind = "consumer"
    reads = ["instances"]

What is checked
---------------
Every problem in a file is collected and raised together as one
:class:`TopologyError`; each :class:`Problem` names the file, the line (best
effort) and the dotted key path, in one sentence, with the fix where it is
obvious:

* TOML syntax (with the line), unknown keys (with a "did you mean"), missing
  required keys, wrong types (a quoted ``"64"`` is not an integer; ``true`` is
  not an integer either);
* names: letters, digits, ``_`` and ``-``, starting with a letter or ``_``;
* references: a node's or queue host's ``host``, a queue's ``host`` (queue
  host), a node's ``reads``/``writes``; every queue must have a writer and a
  reader among the nodes unless it is marked ``external = true``;
* queues: kind, ``capacity >= 1``, ``0 <= min_after_dequeue < capacity``
  (shuffle only), ``seed`` (shuffle only), dtype names (:data:`DTYPES`), one
  shape per dtype, dimensions ``>= 0`` or ``-1`` for unknown (padding queues
  only; padding queues need shapes), component ``names``;
* ports: 1-65535, no two queue hosts on one address and port; ``0`` (any free
  port) and an omitted port only when every node and queue host is on this
  machine;
* nodes: known kind (:data:`BUILTIN_KINDS`, or ``"package.module:function"``;
  with ``check_imports=True`` the function is imported), ``replicas >= 1``,
  one GPU per replica, ``0 < gpu_memory_fraction <= 1``, ``threads >= 1``,
  timeouts ``> 0``, restart policy, PS nodes on the CPU;
* params: for kinds with a schema in :data:`KIND_PARAMS` unknown and missing
  params and their types; other kinds' params are free-form;
* items: a reader's ``components`` must match every queue it writes (except
  filename queues: one scalar ``"string"``); a feeder's queues must all hold
  the same items; ``params.dtypes`` / ``params.shapes`` hints on any other
  node must match every queue the node reads. Dtypes must be equal; shapes
  must have the same rank and equal sizes where both are known.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import ipaddress
import json
import math
import re
import tomllib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_KINDS",
    "DTYPES",
    "KIND_PARAMS",
    "QUEUE_KINDS",
    "READER_COMPONENT",
    "UNKNOWN_DIM",
    "HostSpec",
    "NodeSpec",
    "Param",
    "Problem",
    "QueueHostSpec",
    "QueueSpec",
    "Topology",
    "TopologyError",
    "load",
    "loads",
]

#: Node kinds that ship with qpipe; each is the module ``nodes/<kind>.py`` with a ``main(argv)``.
BUILTIN_KINDS = (
    "reader", "feeder", "trainer", "ps", "evaluator", "solo_trainer", "leaderboard", "predictor",
    "model_slice", "aggregator", "consumer", "load_client",
)
#: Queue kinds: TensorFlow's FIFOQueue, RandomShuffleQueue and PaddingFIFOQueue.
QUEUE_KINDS = ("fifo", "shuffle", "padding")
#: Dtype names a topology file may use; ``"string"`` holds bytes.
DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", "string",
)
#: How a topology file writes an unknown dimension (TOML has no null); it becomes ``None``.
UNKNOWN_DIM = -1

_LOCAL = "local"
_DEFAULT_QUEUE_HOST = "default"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}\Z")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_USER_KIND_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*\Z")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z")
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*\Z")
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_RANGE_RE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*\Z")
_DTYPE_ALIASES = {
    "float": "float64", "double": "float64", "single": "float32", "half": "float16",
    "int": "int64", "long": "int64", "short": "int16", "byte": "int8", "uint": "uint64",
    "boolean": "bool", "bool_": "bool", "str": "string", "bytes": "string", "object": "string",
    "unicode": "string", "f2": "float16", "f4": "float32", "f8": "float64", "i1": "int8",
    "i2": "int16", "i4": "int32", "i8": "int64", "u1": "uint8", "u2": "uint16", "u4": "uint32",
    "u8": "uint64", "c8": "complex64", "c16": "complex128",
}


# -- errors ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """One mistake in a topology file.

    Attributes
    ----------
    path : str
        The file as the caller named it (``"<string>"`` for :func:`loads` without a path).
    key : str or None
        Dotted key path such as ``"nodes.trainer.params.batch_size"`` or
        ``"queues.instances.shapes[1][0]"``; ``None`` for syntax errors.
    message : str
        One sentence saying what is wrong and, where obvious, how to fix it.
    line : int or None
        1-based line in the file, found on a best-effort basis (keys inside
        inline tables point at the line of the enclosing key).
    """

    path: str
    key: str | None
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}" if self.key is None else f"{where}: {self.key}: {self.message}"


class TopologyError(ValueError):
    """Raised when a topology file cannot be read or is wrong; lists every problem found.

    Example: ``digits.toml:14: nodes.reader.replica: unknown key; did you mean "replicas"?``

    Attributes
    ----------
    path : str
        The file, as the caller named it.
    key : str or None
        Key path of the first problem.
    problems : list of Problem
        All problems, in file order.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        self.path = self.problems[0].path
        self.key = self.problems[0].key
        if len(self.problems) == 1:
            text = str(self.problems[0])
        else:
            text = f"{self.path}: {len(self.problems)} problems:\n" + "\n".join(
                f"  {p}" for p in self.problems
            )
        super().__init__(text)


# -- specs ----------------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _is_local_address(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """A machine, from ``[hosts.NAME]``; ``local`` (127.0.0.1) always exists.

    Attributes
    ----------
    name : str
        The table name; nodes and queue hosts refer to it with ``host = NAME``.
    address : str
        IP address or DNS name that other machines reach it by.
    """

    name: str
    address: str

    @property
    def is_local(self) -> bool:
        """True for loopback addresses (``127.0.0.0/8``, ``::1``, ``localhost``)."""
        return _is_local_address(self.address)


@dataclasses.dataclass(frozen=True)
class QueueHostSpec:
    """A queue-server process (``qpipe.QueueServer``), from ``[queue_hosts.NAME]``.

    Attributes
    ----------
    name : str
        The table name; queues refer to it with ``host = NAME``.
    host : str
        Name of the :class:`HostSpec` it runs on.
    host_address : str
        That host's address.
    port : int
        TCP port; ``0`` lets the server pick a free one (single-machine runs only,
        so the launcher must pass the bound address to the nodes).
    max_message_size : int or None
        Largest message in bytes the server accepts; ``None`` keeps the library default.
    """

    name: str
    host: str
    host_address: str
    port: int
    max_message_size: int | None = None

    @property
    def address(self) -> str:
        """ZeroMQ address clients connect to, e.g. ``"tcp://127.0.0.1:5555"``."""
        return f"tcp://{_url_host(self.host_address)}:{self.port}"

    @property
    def bind_address(self) -> str:
        """ZeroMQ address the server binds: the host's IP, or ``*`` when the host is a DNS name."""
        try:
            ipaddress.ip_address(self.host_address)
            host = _url_host(self.host_address)
        except ValueError:
            host = "127.0.0.1" if self.host_address == "localhost" else "*"
        return f"tcp://{host}:{self.port}"


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


@dataclasses.dataclass(frozen=True)
class QueueSpec:
    """A queue, from ``[queues.NAME]``; fields match :meth:`qpipe.spec.QueueSpec.make`.

    Attributes
    ----------
    name : str
        The queue's name on its queue host.
    kind : str
        ``"fifo"``, ``"shuffle"`` or ``"padding"``.
    capacity : int
        Most items the queue holds; ``enqueue`` blocks while it is full.
    dtypes : tuple of str
        One dtype name per component (see :data:`DTYPES`).
    shapes : tuple of tuple, or None
        One shape per component with ``None`` for unknown dimensions;
        ``None`` when the file gives no shapes (then ``dequeue_many`` cannot stack).
    min_after_dequeue : int
        Shuffle queues only: items kept back after each dequeue until closed.
    seed : int or None
        Shuffle queues only: random seed.
    names : tuple of str, or None
        Optional component names.
    host : str
        Name of the :class:`QueueHostSpec` holding the queue.
    external : bool
        True when clients outside the topology may be its only writers or readers.
    """

    name: str
    kind: str
    capacity: int
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int | None, ...], ...] | None
    min_after_dequeue: int = 0
    seed: int | None = None
    names: tuple[str, ...] | None = None
    host: str = _DEFAULT_QUEUE_HOST
    external: bool = False

    def spec_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``qpipe.spec.QueueSpec.make`` (lists, not tuples)."""
        return {
            "kind": self.kind,
            "capacity": self.capacity,
            "dtypes": list(self.dtypes),
            "shapes": None if self.shapes is None else [list(s) for s in self.shapes],
            "min_after_dequeue": self.min_after_dequeue,
            "seed": self.seed,
            "names": None if self.names is None else list(self.names),
            "queue": self.name,
        }

    def describe_items(self) -> str:
        """Components as text, e.g. ``"image float32[64], label int64[]"``."""
        return _items_text(self.dtypes, self.shapes, self.names)


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """A node (one or more processes running the same code), from ``[nodes.NAME]``.

    Attributes
    ----------
    name : str
        The table name; ``qpipe node FILE NAME`` starts this node.
    kind : str
        A built-in kind (:data:`BUILTIN_KINDS`) or ``"package.module:function"``.
    replicas : int
        Number of processes; each gets its replica index from the launcher.
    host : str
        Name of the :class:`HostSpec` the processes run on.
    device : str
        ``"cpu"`` or ``"gpu"``.
    gpus : tuple of int
        GPU index for each replica (``len(gpus) == replicas``); empty on the CPU.
    gpu_memory_fraction : float or None
        Share of each GPU's memory a process may use; ``None`` for no limit.
    threads : int
        CPU threads per process (OMP/OpenBLAS/MKL).
    timeout : float or None
        Default timeout in seconds for every queue operation; ``None`` waits forever.
    restart : str
        ``"never"`` or ``"on-failure"``.
    max_restarts : int
        Restarts allowed per replica (0 when ``restart = "never"``).
    reads, writes : tuple of str
        Queues the node dequeues from and enqueues into (and closes when done).
    allowed_failures : int
        Replicas that may fail for good (after their restarts) without failing
        the run, e.g. spare trainers in synchronous training.
    params : Mapping
        Kind-specific parameters, read-only (nested tables are mappings, arrays
        tuples); built-in kinds have their defaults filled in.
    """

    name: str
    kind: str
    replicas: int = 1
    host: str = _LOCAL
    device: str = "cpu"
    gpus: tuple[int, ...] = ()
    gpu_memory_fraction: float | None = None
    threads: int = 1
    timeout: float | None = None
    restart: str = "never"
    max_restarts: int = 0
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    params: Mapping[str, Any] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    allowed_failures: int = 0

    @property
    def is_builtin(self) -> bool:
        """True for kinds that ship with qpipe."""
        return self.kind in BUILTIN_KINDS

    @property
    def entry_point(self) -> str:
        """``"module:function"`` to run: ``"nodes.<kind>:main"`` for built-in kinds."""
        return f"nodes.{self.kind}:main" if self.is_builtin else self.kind

    def params_dict(self) -> dict[str, Any]:
        """A mutable deep copy of :attr:`params` with plain dicts and lists."""
        return _thaw(self.params)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A checked topology file. Mappings are read-only and keep file order.

    Attributes
    ----------
    name : str
        ``pipeline.name``.
    description : str
        ``pipeline.description`` (may be empty).
    path : pathlib.Path or None
        Absolute path of the file; ``None`` for :func:`loads` without a path.
    base_dir : pathlib.Path
        Directory that relative paths in params are resolved against: the file's
        directory, or the working directory at load time for text without a path.
    default_timeout : float or None
        ``pipeline.default_timeout``; already applied to nodes without their own.
    hosts, queue_hosts, queues, nodes : Mapping
        Name to :class:`HostSpec`, :class:`QueueHostSpec`, :class:`QueueSpec`,
        :class:`NodeSpec`.
    """

    name: str
    description: str
    path: Path | None
    base_dir: Path
    default_timeout: float | None
    hosts: Mapping[str, HostSpec]
    queue_hosts: Mapping[str, QueueHostSpec]
    queues: Mapping[str, QueueSpec]
    nodes: Mapping[str, NodeSpec]

    def node(self, name: str) -> NodeSpec:
        """The node called ``name``; raises ``KeyError`` naming the known nodes."""
        return _lookup(self.nodes, name, "node", self._where())

    def queue(self, name: str) -> QueueSpec:
        """The queue called ``name``; raises ``KeyError`` naming the known queues."""
        return _lookup(self.queues, name, "queue", self._where())

    def queue_host_for(self, queue_name: str) -> QueueHostSpec:
        """The queue host that holds ``queue_name``; raises ``KeyError`` for unknown queues."""
        return self.queue_hosts[self.queue(queue_name).host]

    def writers(self, queue_name: str) -> tuple[str, ...]:
        """Names of the nodes that write ``queue_name``, in file order."""
        self.queue(queue_name)
        return tuple(n.name for n in self.nodes.values() if queue_name in n.writes)

    def readers(self, queue_name: str) -> tuple[str, ...]:
        """Names of the nodes that read ``queue_name``, in file order."""
        self.queue(queue_name)
        return tuple(n.name for n in self.nodes.values() if queue_name in n.reads)

    def resolve_path(self, p: str | Path) -> Path:
        """Resolve a path from a node's params against :attr:`base_dir`.

        ``~`` is expanded; absolute paths are returned unchanged; glob
        characters are kept for the caller to expand.
        """
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q

    def graph_text(self) -> str:
        """A readable rendering: header, queue hosts, queues, nodes and the flow between them."""
        out = [f"pipeline {self.name}" + (f": {self.description}" if self.description else "")]
        if self.path is not None:
            out.append(f"  file     {self.path}")
        if self.default_timeout is not None:
            out.append(f"  timeout  {_num(self.default_timeout)} s unless a node sets its own")

        out += ["", "queue hosts"]
        if not self.queue_hosts:
            out.append("  (none)")
        w = max((len(q) for q in self.queue_hosts), default=0)
        for qh in self.queue_hosts.values():
            port = "" if qh.port else "  (port picked at start)"
            out.append(f"  {qh.name:<{w}}  {qh.address}  on host {qh.host}{port}")

        out += ["", "queues"]
        if not self.queues:
            out.append("  (none)")
        w = max((len(q) for q in self.queues), default=0)
        for q in self.queues.values():
            extra = [f"capacity {q.capacity}"]
            if q.kind == "shuffle":
                extra.append(f"min_after_dequeue {q.min_after_dequeue}")
            if q.external:
                extra.append("external")
            out.append(f"  {q.name:<{w}}  {q.kind:<7}  {', '.join(extra)}  on {q.host}")
            out.append(f"  {'':<{w}}  items ({q.describe_items()})")

        out += ["", "nodes"]
        w = max((len(n) for n in self.nodes), default=0)
        for n in self.nodes.values():
            bits = [n.kind if n.replicas == 1 else f"{n.kind} x{n.replicas}", f"on {n.host}"]
            if n.device == "gpu":
                gpus = sorted(set(n.gpus))
                bits.append(f"gpu {','.join(map(str, gpus))}" + (
                    f" ({_num(n.gpu_memory_fraction)} of memory)" if n.gpu_memory_fraction else ""))
            else:
                bits.append("cpu")
            bits.append(f"{n.threads} thread" + ("s" if n.threads != 1 else ""))
            if n.timeout is not None:
                bits.append(f"timeout {_num(n.timeout)} s")
            if n.restart != "never":
                bits.append(f"restart {n.restart} (max {n.max_restarts})")
            out.append(f"  {n.name:<{w}}  " + ", ".join(bits))

        out += ["", "flow (writers --> queue --> readers)"]
        rows = []
        for q in self.queues.values():
            left = ", ".join(self._label(x) for x in self.writers(q.name)) or "(outside)"
            right = ", ".join(self._label(x) for x in self.readers(q.name)) or "(outside)"
            rows.append((left, f"{q.name} [{q.kind} {q.capacity}]", right))
        wl = max((len(r[0]) for r in rows), default=0)
        wm = max((len(r[1]) for r in rows), default=0)
        for left, mid, right in rows:
            out.append(f"  {left:<{wl}}  --> {mid:<{wm}}  --> {right}")
        for n in self.nodes.values():
            if not n.reads and not n.writes:
                out.append(f"  {self._label(n.name)} (uses no queue)")
        return "\n".join(out) + "\n"

    def _label(self, node_name: str) -> str:
        n = self.nodes[node_name]
        return n.name if n.replicas == 1 else f"{n.name} x{n.replicas}"

    def _where(self) -> str:
        return str(self.path) if self.path is not None else f"topology {self.name!r}"


def _lookup(mapping: Mapping[str, Any], name: str, what: str, where: str) -> Any:
    try:
        return mapping[name]
    except KeyError:
        known = ", ".join(mapping) or "none"
        raise KeyError(f"{where}: no {what} named {name!r}{_did_you_mean(name, mapping, mid=True)}; "
                       f"known: {known}") from None


def _num(x: float) -> str:
    return f"{x:g}"


def _shape_text(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "[?...]"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _items_text(dtypes: Sequence[str], shapes: Sequence[Any] | None, names: Sequence[str] | None) -> str:
    parts = []
    for i, dt in enumerate(dtypes):
        t = dt + _shape_text(None if shapes is None else shapes[i])
        parts.append(t if names is None else f"{names[i]} {t}")
    return ", ".join(parts)


# -- parameter schemas ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Param:
    """One key of a table: its type, whether it is required, its default and limits.

    Attributes
    ----------
    type : str
        ``"str"``, ``"int"``, ``"number"`` (int or float), ``"bool"``,
        ``"str_list"``, ``"int_list"``, ``"str_or_str_list"``,
        ``"int_or_inf"`` (``inf`` becomes ``None``), ``"number_or_inf"``,
        ``"table"``, ``"table_list"``, ``"size"`` (bytes, or ``"256MiB"``),
        ``"list"`` (any array, checked by the caller) or ``"any"``.
    required : bool
        Missing required keys are an error.
    default : object
        Filled in when the key is absent (``None``: leave it absent).
    choices : tuple
        Allowed values, if limited.
    min : float or None
        Smallest allowed value (inclusive).
    formats : tuple of str
        Reader only: the formats this param applies to (empty: all).
    doc : str
        One line for the reference in ``topologies/README.md``.
    """

    type: str
    required: bool = False
    default: Any = None
    choices: tuple[Any, ...] = ()
    min: float | None = None
    formats: tuple[str, ...] = ()
    doc: str = ""


#: Keys of one entry of a reader's ``components`` list.
READER_COMPONENT: Mapping[str, Param] = types.MappingProxyType({
    "name": Param("str", doc="component name (required for npy files with several components)"),
    "dtype": Param("str", required=True, doc="dtype of the component"),
    "columns": Param("any", formats=("csv",),
                     doc='CSV columns: an index (scalar), "start:stop", a list of indices, a header name or a list of names'),
    "shape": Param("int_list", doc="shape of one item; default: [] for one column, [n] for n columns"),
    "default": Param("any", formats=("csv",), doc="value for empty fields (default: a missing field is an error)"),
})

_HINTS = {
    "dtypes": Param("str_list", doc="dtypes this node expects from every queue it reads"),
    "shapes": Param("list", doc="shapes it expects, -1 for any size"),
}

_CSV_DATA = {
    "components": Param("table_list", required=True, doc="how a row becomes (features, label), as for reader"),
    "header": Param("bool", doc="the CSV files' first line names the columns (default true)"),
    "delimiter": Param("str", doc="CSV field separator (default \",\")"),
}
# NOTE: no defaults here: nodes/solo_trainer.py's DEFAULTS fill what a config leaves out, for
# the solo_trainer and for a predictor's params.train alike.
_HYPERPARAMS = {
    "lr": Param("number", doc="learning rate (default 0.5)"),
    "hidden": Param("int_list", doc="hidden layer widths (default [128])"),
    "batch_size": Param("int", min=1, doc="items per training step (default 32)"),
    "epochs": Param("int", min=1, doc="passes over the training files (default 20)"),
    "seed": Param("int", min=0, doc="initialisation and shuffling seed (default 0)"),
    "optimizer": Param("str", choices=("sgd", "momentum", "adam"), doc="update rule (default sgd)"),
    "momentum": Param("number", doc="momentum coefficient (default 0.9)"),
    "l2": Param("number", doc="weight decay on the weight matrices (default 0)"),
    "input_scale": Param("number", doc="factor applied to the inputs (default 1)"),
}

#: Per built-in kind: param name -> :class:`Param`; ``None`` means free-form params.
#: ``dtypes``/``shapes`` hints are reserved and checked for every kind except reader.
KIND_PARAMS: Mapping[str, Mapping[str, Param] | None] = types.MappingProxyType({
    "reader": types.MappingProxyType({
        "files": Param("str_or_str_list", required=True,
                       doc="file names or glob patterns, relative to the topology file"),
        "format": Param("str", default="csv", choices=("csv", "npy", "fixed"), doc="file format"),
        "components": Param("table_list", required=True,
                            doc="one table per component of an item (see below)"),
        "num_epochs": Param("int_or_inf", default=1, min=1, doc="passes over the files; inf repeats forever"),
        "shuffle_files": Param("bool", default=True, doc="shuffle the file order every epoch"),
        "seed": Param("int", min=0, doc="seed for the file shuffle"),
        "read_threads": Param("int", default=1, min=1, doc="reading threads in each reader process"),
        "batch_size": Param("int", default=1, min=1, doc="items per enqueue_many"),
        "on_error": Param("str", default="raise", choices=("raise", "skip"),
                          doc="a bad record stops the reader, or is skipped and counted"),
        "header": Param("bool", default=True, formats=("csv",), doc="the first line of each file names the columns"),
        "delimiter": Param("str", default=",", formats=("csv",), doc="field separator"),
        "header_bytes": Param("int", default=0, min=0, formats=("fixed",),
                              doc="bytes to skip at the start of each file"),
        "footer_bytes": Param("int", default=0, min=0, formats=("fixed",),
                              doc="bytes to ignore at the end of each file"),
    }),
    "consumer": types.MappingProxyType({
        "batch_size": Param("int", default=1, min=1, doc="items per dequeue_up_to"),
        "report_every": Param("int", min=1, doc="log a count every this many items (default: only at the end)"),
        **_HINTS,
    }),
    "ps": types.MappingProxyType({
        "layers": Param("int_list", required=True, doc="MLP layer sizes, inputs first, classes last"),
        "input_scale": Param("number", default=1.0, doc="factor trainers and evaluators apply to inputs"),
        "seed": Param("int", default=0, min=0, doc="initialisation seed"),
        "dtype": Param("str", default="float32", choices=("float32", "float64"), doc="parameter dtype"),
        "mode": Param("str", default="sync", choices=("sync", "async"), doc="synchronous or asynchronous updates"),
        "replicas_to_aggregate": Param("int", default=1, min=1,
                                       doc="sync: gradients averaged per step (N of the N+k trainers)"),
        "staleness": Param("str", default="none", choices=("none", "drop", "scale"),
                           doc="async: what to do with stale gradients"),
        "max_staleness": Param("int", default=0, min=0, doc="async, drop: largest staleness applied"),
        "optimizer": Param("str", default="sgd", choices=("sgd", "momentum", "adam"), doc="update rule"),
        "lr": Param("number", default=0.1, doc="learning rate"),
        "momentum": Param("number", default=0.9, doc="momentum coefficient"),
        "checkpoint_every_steps": Param("int", default=0, min=0, doc="checkpoint period in updates (0: off)"),
        "checkpoint_every_secs": Param("number", default=0.0, doc="checkpoint period in seconds (0: off)"),
        "client_timeout": Param("number", default=10.0,
                                doc="seconds of silence after which a trainer counts as gone"),
        "port": Param("int", default=0, min=0, doc="base TCP port, replica r binds port + r (0: any; qpipe run only)"),
    }),
    "trainer": types.MappingProxyType({
        "ps": Param("str", required=True, doc="name of the parameter-server node"),
        "batch_size": Param("int", default=32, min=1, doc="items per step (last batch may be smaller)"),
        "wire_dtype": Param("str", default="float32", choices=("float32", "float16", "bfloat16"),
                            doc="float format of parameters and gradients on the wire"),
        "max_steps": Param("int", min=1, doc="stop after this many steps (default: when the input is drained)"),
        "compute_ms": Param("number", default=0.0, doc="extra simulated compute per step (benchmarks)"),
        "warmup_steps": Param("int", default=0, min=0,
                              doc="async: replicas other than 0 wait until the PS reached this version"),
        "report_every": Param("number", default=1.0, doc="seconds between metric reports"),
        **_HINTS,
    }),
    "evaluator": types.MappingProxyType({
        "ps": Param("str", required=True, doc="name of the parameter-server node"),
        "validation": Param("str", required=True, doc="CSV file scored while training runs"),
        "test": Param("str", doc="CSV file scored when training is done (summary: test_accuracy)"),
        "components": Param("table_list", required=True, doc="how a row becomes (features, label), as for reader"),
        "eval_every_secs": Param("number", default=1.0, doc="seconds between validation scores"),
        "header": Param("bool", default=True, doc="the first line names the columns"),
        "delimiter": Param("str", default=",", doc="field separator"),
    }),
    "feeder": types.MappingProxyType({
        # NOTE: files and components are checked by the node, not here: the item check below
        # (_check_items) still describes a feeder that copies queue items unchanged.
        "files": Param("str_or_str_list", doc="CSV files or glob patterns, read in order"),
        "components": Param("table_list", doc="how a row becomes (features, label), as for reader"),
        "header": _CSV_DATA["header"],
        "delimiter": _CSV_DATA["delimiter"],
        "labels_queue": Param("str", doc="the queue in writes that gets (id, label) instead of (id, features)"),
        "rate": Param("number", doc="requests per second (default: as fast as the queues take them)"),
        "limit": Param("int", min=0, doc="send at most this many requests (default: every row)"),
        "first_id": Param("int", min=0, default=0, doc="id of the first request"),
        "stall_timeout": Param("number_or_inf", doc="seconds before a full member queue counts as stalled "
                                                    "(default: the node's timeout)"),
    }),
    "solo_trainer": types.MappingProxyType({
        "train": Param("str_or_str_list", required=True, doc="training CSV files or glob patterns"),
        "validation": Param("str", required=True, doc="CSV file scored after every epoch; the ranking uses it"),
        "test": Param("str", doc="CSV file scored at the end, for information"),
        **_CSV_DATA,
        "configs": Param("table_list", doc="one table of hyperparameters per replica"),
        "grid": Param("table", doc="lists of values per hyperparameter; replica i takes the i-th combination"),
        **_HYPERPARAMS,
    }),
    "leaderboard": types.MappingProxyType({
        "top_k": Param("int", min=1, default=3, doc="how many of the best models the summary names"),
        **_HINTS,
    }),
    "predictor": types.MappingProxyType({
        "model": Param("str", doc="a model directory written by save_model (solo_trainer, evaluator)"),
        "train": Param("table", doc="train a model at start: data keys and hyperparameters as for solo_trainer"),
        "batch_size": Param("int", min=1, default=1, doc="most requests answered together"),
        "input_scale": Param("number", doc="factor applied to the inputs (default: the model's own)"),
        "delay_ms": Param("number", min=0, default=0.0, doc="injected latency per request (tests, benchmarks)"),
        "fail_after": Param("int", min=0, doc="crash (exit status 1) after answering this many requests"),
        "reply_timeout": Param("number", min=0, default=1.0,
                               doc="seconds an answer may wait for room in a reply_to queue"),
        **_HINTS,
    }),
    "model_slice": types.MappingProxyType({
        # NOTE: no defaults here: a slice takes its model from the driver and must not set these.
        "role": Param("str", required=True, choices=("driver", "slice"),
                      doc="driver (feeds the slices, computes the loss, reports) or slice (K replicas)"),
        "slices": Param("str", doc="driver: name of the slice node (its replicas are the K slices)"),
        "driver": Param("str", doc="slice: name of the driver node, whose params describe the model"),
        "inbox": Param("str", doc="driver: the queue in its reads that slices send to"),
        "scheme": Param("str", choices=("vertical", "pipeline", "blocks"), doc="how the model is split"),
        "layers": Param("int_list", doc="MLP layer sizes, inputs first, classes last"),
        "micro_batches": Param("int", min=1, doc="pipeline: micro-batches per step (default 4)"),
        "stages": Param("int_list", doc="pipeline: layers per stage (default: balanced by parameter count)"),
        "batch_size": Param("int", min=1, doc="items per step (default 32)"),
        "max_steps": Param("int", min=1, doc="stop after this many steps (default: when the data is drained)"),
        "input_scale": Param("number", doc="factor applied to the inputs (default 1)"),
        "seed": Param("int", min=0, doc="initialisation seed (default 0)"),
        "dtype": Param("str", choices=("float32", "float64"), doc="parameter and payload dtype (default float32)"),
        "optimizer": Param("str", choices=("sgd", "momentum", "adam"), doc="update rule (default sgd)"),
        "lr": Param("number", doc="learning rate (default 0.1)"),
        "momentum": Param("number", doc="momentum coefficient (default 0.9)"),
        "validation": Param("str", doc="CSV file scored at the end"),
        "test": Param("str", doc="CSV file scored at the end (summary: test_accuracy)"),
        "components": Param("table_list", doc="how a row becomes (features, label), as for reader"),
        "header": Param("bool", doc="the CSV files' first line names the columns (default true)"),
        "delimiter": Param("str", doc="CSV field separator (default \",\")"),
        "report_every": Param("number", doc="seconds between loss reports (default 1)"),
    }),
    "aggregator": types.MappingProxyType({
        "labels_queue": Param("str", default="labels", doc="the queue in reads that holds (id, label)"),
        "timeout": Param("number", default=1.0, doc="seconds a member has to answer a request"),
        "probe_timeout": Param("number", doc="seconds a suspect member is waited for (default timeout / 10)"),
        "startup_timeout": Param("number", doc="seconds a member gets for its first answer (default 30)"),
        "give_up_after": Param("number", doc="seconds all members may miss their probes before the "
                                             "aggregator gives up (default max(3 x timeout, 1))"),
        "min_members": Param("int", min=1, default=1, doc="fewest answers that answer a request"),
        "combine": Param("str", default="mean", choices=("mean", "vote"), doc="how answers are combined"),
        "max_in_flight": Param("int", min=1, default=256, doc="most requests read and not yet decided"),
    }),
})

_PIPELINE = {
    "name": Param("str", required=True),
    "description": Param("str", default=""),
    "default_timeout": Param("number_or_inf"),
}
_HOST = {"address": Param("str", required=True)}
_QUEUE_HOST = {
    "host": Param("str", default=_LOCAL),
    "port": Param("int"),
    "max_message_size": Param("size"),
}
_QUEUE = {
    "kind": Param("str", required=True, choices=QUEUE_KINDS),
    "host": Param("str"),
    "capacity": Param("int", required=True, min=1),
    "min_after_dequeue": Param("int", min=0),
    "seed": Param("int", min=0),
    "dtypes": Param("str_list", required=True),
    "shapes": Param("list"),
    "names": Param("str_list"),
    "external": Param("bool", default=False),
}
_NODE = {
    "kind": Param("str", required=True),
    "replicas": Param("int", default=1, min=1),
    "host": Param("str", default=_LOCAL),
    "device": Param("str", default="cpu", choices=("cpu", "gpu")),
    "gpus": Param("any"),
    "gpu_memory_fraction": Param("number"),
    "threads": Param("int", default=1, min=1),
    "timeout": Param("number_or_inf"),
    "restart": Param("str", default="never", choices=("never", "on-failure")),
    "max_restarts": Param("int", min=0),
    "allowed_failures": Param("int", default=0, min=0),
    "reads": Param("str_list", default=[]),
    "writes": Param("str_list", default=[]),
    "params": Param("table", default={}),
}
_TOP = {
    "pipeline": Param("table", required=True),
    "hosts": Param("table", default={}),
    "queue_hosts": Param("table", default={}),
    "queues": Param("table", default={}),
    "nodes": Param("table", required=True),
}


# -- reading --------------------------------------------------------------------------------


def load(path: str | Path, *, check_imports: bool = False) -> Topology:
    """Read and check a topology file.

    Parameters
    ----------
    path : str or pathlib.Path
        The TOML file. Messages name it as given.
    check_imports : bool
        Also import the module of every ``"package.module:function"`` kind
        (with the current ``sys.path``) and check the function exists. This
        runs the module's top-level code.

    Returns
    -------
    Topology

    Raises
    ------
    TopologyError
        Listing every problem: syntax, unknown or missing keys, wrong types,
        dangling references, item mismatches, port clashes.
    OSError
        When the file cannot be read.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TopologyError([Problem(str(path), None, f"is not UTF-8 text (bad byte at offset {e.start})")]) from None
    return _load_text(text, str(path), Path(path).resolve(), check_imports)


def loads(text: str, path: str = "<string>", *, check_imports: bool = False) -> Topology:
    """Check topology text; ``path`` names it in messages.

    When ``path`` is ``"<string>"`` relative paths resolve against the
    current directory at the time of the call; otherwise against ``path``'s
    directory. Raises :class:`TopologyError` like :func:`load`.
    """
    real = None if path.startswith("<") else Path(path).resolve()
    return _load_text(text, path, real, check_imports)


def _load_text(text: str, shown: str, real: Path | None, check_imports: bool) -> Topology:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
        line = None
        if m:
            line = int(m[1])
            msg = f"{msg[:m.start()]} (column {m[2]})"
        elif msg.endswith("(at end of document)"):
            line = text.count("\n") + 1
            msg = msg.replace(" (at end of document)", " at the end of the file")
        raise TopologyError([Problem(shown, None, f"TOML syntax error: {msg}", line)]) from None
    c = _Checker(shown, text)
    topo = _build(c, doc, real, check_imports)
    if c.problems or topo is None:
        c.problems.sort(key=lambda p: (p.line is None, p.line or 0))
        raise TopologyError(c.problems)
    return topo


# -- checking machinery ---------------------------------------------------------------------

_BAD = object()  # a value that already produced a problem; checks that depend on it are skipped

Key = tuple[str | int, ...]


def _fmt_key(key: Key) -> str:
    out = ""
    for part in key:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + (part if _BARE_KEY_RE.match(part) else json.dumps(part))
    return out


def _show(v: Any) -> str:
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, str):
        s = json.dumps(v, ensure_ascii=False)
    elif isinstance(v, float):
        s = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    elif isinstance(v, dict):
        return "a table"
    elif isinstance(v, list):
        s = "[" + ", ".join(_show(x) for x in v) + "]"
    elif hasattr(v, "isoformat"):
        return f"a date/time ({v.isoformat()})"
    else:
        s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _did_you_mean(word: Any, options: Sequence[str] | Mapping[str, Any], mid: bool = False) -> str:
    if not isinstance(word, str):
        return ""
    m = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    if not m:
        return ""
    return f' (did you mean "{m[0]}"?)' if mid else f'; did you mean "{m[0]}"?'


def _one_of(options: Sequence[Any]) -> str:
    return ", ".join(_show(o) for o in options)


_TYPE_NAMES = {
    "str": "a string", "int": "an integer", "number": "a number", "bool": "true or false",
    "str_list": "a list of strings", "int_list": "a list of integers",
    "str_or_str_list": "a string or a list of strings", "int_or_inf": "an integer or inf",
    "number_or_inf": "a number or inf", "table": "a table", "table_list": "a list of tables",
    "size": 'a size (an integer number of bytes, or a string such as "256MiB")', "list": "a list",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Checker:
    """Collects problems, each with its file, key path and (best-effort) line."""

    def __init__(self, shown: str, text: str) -> None:
        self.shown = shown
        self.lines = _index_lines(text)
        self.problems: list[Problem] = []

    def add(self, key: Key, message: str) -> None:
        self.problems.append(Problem(self.shown, _fmt_key(key) or None, message, self.line(key)))

    def line(self, key: Key) -> int | None:
        parts = tuple(p for p in key if isinstance(p, str))
        for n in range(len(parts), 0, -1):
            if parts[:n] in self.lines:
                return self.lines[parts[:n]]
        return None

    def name(self, key: Key, name: str, what: str) -> None:
        if not _NAME_RE.match(name):
            self.add(key, f"{what} name {_show(name)} must start with a letter or _ and contain only "
                          "letters, digits, _ and - (at most 64 characters)")

    def fields(self, table: Any, key: Key, schema: Mapping[str, Param], what: str,
               fmt: str | None = None) -> dict[str, Any] | None:
        """Check a table against a schema; return values with defaults (``_BAD`` where wrong)."""
        if not isinstance(table, dict):
            self.add(key, f"expected a table ({what}), got {_show(table)}")
            return None
        out: dict[str, Any] = {}
        for k, v in table.items():
            if k not in schema:
                hint = _did_you_mean(k, schema) or f"; the keys allowed here are {', '.join(schema)}"
                self.add(key + (k,), f"unknown key{hint}")
                continue
            p = schema[k]
            if p.formats and fmt is not None and fmt not in p.formats:
                only = " or ".join(f'format = "{f}"' for f in p.formats)
                self.add(key + (k,), f"is used only with {only}; remove it")
                continue
            out[k] = self.value(v, key + (k,), p)
        for k, p in schema.items():
            if k in out or k in table:
                continue
            if p.required:
                self.add(key + (k,), f"missing; {what} needs {k} ({_TYPE_NAMES.get(p.type, p.type)})")
                out[k] = _BAD
            elif p.default is not None and (not p.formats or fmt is None or fmt in p.formats):
                out[k] = p.default
            else:
                out[k] = None
        return out

    def value(self, v: Any, key: Key, p: Param) -> Any:
        """Check one value's type, choices and minimum; return it normalised or ``_BAD``."""
        t = p.type
        ok = True
        if t == "str":
            ok = isinstance(v, str)
        elif t == "int":
            ok = _is_int(v)
        elif t == "bool":
            ok = isinstance(v, bool)
        elif t in ("number", "number_or_inf"):
            ok = _is_num(v) and not (isinstance(v, float) and math.isnan(v))
            if ok and math.isinf(v):
                ok = t == "number_or_inf" and v > 0
                v = None if ok else v
            elif ok:
                v = float(v)
        elif t == "int_or_inf":
            ok = _is_int(v) or (isinstance(v, float) and math.isinf(v) and v > 0)
            if ok and isinstance(v, float):
                v = None
        elif t == "str_list":
            ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
            if isinstance(v, str):
                self.add(key, f"expected a list of strings, got {_show(v)}; write [{_show(v)}]")
                return _BAD
        elif t == "int_list":
            ok = isinstance(v, list) and all(_is_int(x) for x in v)
        elif t == "str_or_str_list":
            ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
        elif t == "table":
            ok = isinstance(v, dict)
        elif t == "table_list":
            ok = isinstance(v, list) and all(isinstance(x, dict) for x in v)
        elif t == "list":
            ok = isinstance(v, list)
        elif t == "size":
            return self.size(v, key)
        if not ok:
            self.add(key, f"expected {_TYPE_NAMES[t]}, got {_show(v)}{_unquote_hint(v, t)}")
            return _BAD
        if p.choices and v not in p.choices:
            self.add(key, f"expected one of {_one_of(p.choices)}, got {_show(v)}{_did_you_mean(v, p.choices)}")
            return _BAD
        if p.min is not None and _is_num(v) and v < p.min:
            self.add(key, f"must be at least {_num(p.min)}, got {_show(v)}")
            return _BAD
        return v

    def size(self, v: Any, key: Key) -> Any:
        if _is_int(v):
            if v >= 1:
                return v
            self.add(key, f"must be at least 1 byte, got {v}")
            return _BAD
        m = _SIZE_RE.match(v) if isinstance(v, str) else None
        unit = m and m[2].lower()
        if not m or unit not in _SIZE_UNITS:
            hint = ""
            if m and unit in ("k", "kb", "m", "mb", "g", "gb"):
                hint = f'; write "{m[1]}{unit[0].upper()}iB" (qpipe sizes are powers of 1024)'
            self.add(key, f"expected {_TYPE_NAMES['size']}, got {_show(v)}{hint}")
            return _BAD
        n = int(float(m[1]) * _SIZE_UNITS[unit])
        if n < 1:
            self.add(key, f"must be at least 1 byte, got {_show(v)}")
            return _BAD
        return n

    def dtype(self, v: Any, key: Key) -> Any:
        if isinstance(v, str) and v in DTYPES:
            return v
        if not isinstance(v, str):
            self.add(key, f"expected a dtype name such as \"float32\", got {_show(v)}")
            return _BAD
        low = v.lower()
        for prefix in ("tf.", "np.", "numpy.", "torch."):
            low = low.removeprefix(prefix)
        guess = low if low in DTYPES else _DTYPE_ALIASES.get(low)
        hint = f'; did you mean "{guess}"?' if guess else _did_you_mean(v, DTYPES)
        if not hint:
            hint = f"; use one of {', '.join(DTYPES)}"
        self.add(key, f"unknown dtype {_show(v)}{hint}")
        return _BAD

    def dtypes(self, v: Any, key: Key) -> Any:
        if v is _BAD or v is None:
            return v
        if not v:
            self.add(key, 'must list at least one dtype, e.g. ["float32"]')
            return _BAD
        out = [self.dtype(d, key + (i,)) for i, d in enumerate(v)]
        return _BAD if _BAD in out else tuple(out)

    def shapes(self, v: Any, key: Key, n: int | None, allow_unknown: bool, unknown_hint: str) -> Any:
        """Check a list of shapes (one per component); -1 becomes None."""
        if v is _BAD or v is None:
            return v
        if n is not None and len(v) != n:
            self.add(key, f"gives {len(v)} shape{'s' if len(v) != 1 else ''} for {n} dtype"
                          f"{'s' if n != 1 else ''}; give one shape per component (use [] for a scalar)")
            return _BAD
        out = []
        for i, s in enumerate(v):
            r = self.shape(s, key + (i,), allow_unknown, unknown_hint)
            out.append(r)
        return _BAD if _BAD in out else tuple(out)

    def shape(self, s: Any, key: Key, allow_unknown: bool, unknown_hint: str) -> Any:
        if _is_int(s):
            self.add(key, f"expected a shape (a list of dimensions), got {s}; write [{s}]")
            return _BAD
        if not isinstance(s, list):
            self.add(key, f"expected a shape (a list of dimensions), got {_show(s)}")
            return _BAD
        dims: list[int | None] = []
        bad = False
        for j, d in enumerate(s):
            if _is_int(d) and d >= 0:
                dims.append(d)
            elif d == UNKNOWN_DIM and _is_int(d) or d in ("?", "None", "none", "null"):
                if d != UNKNOWN_DIM:
                    self.add(key + (j,), f"write {UNKNOWN_DIM} for an unknown dimension, not {_show(d)}")
                    bad = True
                elif not allow_unknown:
                    self.add(key + (j,), f"an unknown dimension ({UNKNOWN_DIM}) {unknown_hint}")
                    bad = True
                else:
                    dims.append(None)
            else:
                self.add(key + (j,), f"expected a dimension >= 0 (or {UNKNOWN_DIM} for unknown), got {_show(d)}")
                bad = True
        return _BAD if bad else tuple(dims)


def _unquote_hint(v: Any, t: str) -> str:
    if not isinstance(v, str):
        if t in ("str", "str_or_str_list") and _is_num(v):
            return f'; put it in quotes: "{_show(v)}"'
        return ""
    s = v.strip()
    if t in ("int", "int_or_inf") and re.fullmatch(r"[-+]?\d+", s):
        return "; remove the quotes"
    if t in ("number", "number_or_inf") and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf", s):
        return "; remove the quotes"
    if t == "bool" and s in ("true", "false"):
        return "; remove the quotes"
    if t == "bool" and s.lower() in ("true", "false", "yes", "no", "on", "off"):
        return "; write true or false without quotes"
    return ""


_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_RE = re.compile(rf"\s*\[\[?\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?\Z")
_ASSIGN_RE = re.compile(rf"\s*({_DOTTED})\s*=")
_PART_RE = re.compile(_KEY_PART)
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'')


def _split_key(s: str) -> tuple[str, ...]:
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in _PART_RE.findall(s))


def _index_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map key paths to the first line defining them (a line scanner, not a TOML parser)."""
    index: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    depth = 0          # open [ of a multi-line array
    multiline = None   # open ''' or """
    for n, line in enumerate(text.splitlines(), 1):
        if multiline:
            if multiline in line:
                multiline = None
            continue
        if depth > 0:
            depth += _bracket_balance(line)
            continue
        m = _HEADER_RE.match(line)
        if m:
            table = _split_key(m[1])
            for i in range(1, len(table) + 1):
                index.setdefault(table[:i], n)
            continue
        m = _ASSIGN_RE.match(line)
        if m:
            key = table + _split_key(m[1])
            for i in range(len(table) + 1, len(key) + 1):
                index.setdefault(key[:i], n)
            rest = line[m.end():]
            for q in ('"""', "'''"):
                if rest.count(q) == 1:
                    multiline = q
            if not multiline:
                depth = max(0, _bracket_balance(rest))
    return index


def _bracket_balance(s: str) -> int:
    s = _STRING_RE.sub("", s).split("#", 1)[0]
    return s.count("[") - s.count("]")


# -- building -------------------------------------------------------------------------------


def _build(c: _Checker, doc: dict[str, Any], real: Path | None, check_imports: bool) -> Topology | None:
    top = c.fields(doc, (), _TOP, "a topology file")
    assert top is not None
    pipe = c.fields(top["pipeline"], ("pipeline",), _PIPELINE, "[pipeline]") if top["pipeline"] is not _BAD else None
    pipe = pipe or {"name": _BAD, "description": "", "default_timeout": None}
    if isinstance(pipe["name"], str):
        c.name(("pipeline", "name"), pipe["name"], "pipeline")
    if pipe["default_timeout"] is not None and pipe["default_timeout"] is not _BAD and pipe["default_timeout"] <= 0:
        c.add(("pipeline", "default_timeout"),
              f"must be more than 0 seconds (or inf to wait forever), got {_num(pipe['default_timeout'])}")
        pipe["default_timeout"] = _BAD

    hosts = _build_hosts(c, top["hosts"])
    raw_qhosts = _tables(c, top["queue_hosts"], ("queue_hosts",), _QUEUE_HOST, "queue host")
    queues = _build_queues(c, top["queues"], raw_qhosts)
    timeout = None if pipe["default_timeout"] is _BAD else pipe["default_timeout"]
    nodes, uses = _build_nodes(c, top["nodes"], timeout, queues, hosts, check_imports)
    qhosts = _build_queue_hosts(c, raw_qhosts, hosts, uses, bool(queues))
    _check_flow(c, queues, uses)
    _check_items(c, queues, nodes)

    if c.problems:
        return None
    base = real.parent if real is not None else Path.cwd()
    return Topology(
        name=pipe["name"],
        description=pipe["description"],
        path=real,
        base_dir=base,
        default_timeout=pipe["default_timeout"],
        hosts=types.MappingProxyType(hosts),
        queue_hosts=types.MappingProxyType(qhosts),
        queues=types.MappingProxyType({k: v for k, v in queues.items() if isinstance(v, QueueSpec)}),
        nodes=types.MappingProxyType({k: v for k, v in nodes.items() if isinstance(v, NodeSpec)}),
    )


def _tables(c: _Checker, section: Any, key: Key, schema: Mapping[str, Param], what: str) -> dict[str, dict[str, Any]]:
    """Check each ``[section.NAME]`` table; return name -> field values (bad entries dropped)."""
    out: dict[str, dict[str, Any]] = {}
    if section is _BAD:
        return out
    for name, table in section.items():
        c.name(key + (name,), name, what)
        if not isinstance(table, dict):
            c.add(key + (name,), f"expected a table, got {_show(table)}; declare each {what} as its own "
                                 f"[{_fmt_key(key)}.NAME] table")
            continue
        fields = c.fields(table, key + (name,), schema, f"a {what}")
        if fields is not None:
            out[name] = fields
    return out


def _build_hosts(c: _Checker, section: Any) -> dict[str, HostSpec]:
    hosts = {_LOCAL: HostSpec(_LOCAL, "127.0.0.1")}
    for name, f in _tables(c, section, ("hosts",), _HOST, "host").items():
        addr = f["address"]
        key = ("hosts", name, "address")
        if not isinstance(addr, str):
            continue
        if "://" in addr:
            c.add(key, f'give the bare address without a scheme, e.g. "{addr.split("://", 1)[1].split(":")[0]}"')
            continue
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            if ":" in addr:
                c.add(key, f"give the address without a port ({_show(addr)}); ports belong to [queue_hosts.*]")
                continue
            if not _HOSTNAME_RE.match(addr):
                c.add(key, f"{_show(addr)} is not an IP address or a host name")
                continue
        hosts[name] = HostSpec(name, addr)
    return hosts


def _build_queues(c: _Checker, section: Any, qhosts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Return name -> QueueSpec, or ``_BAD`` for queues with problems (still referable)."""
    out: dict[str, Any] = {}
    if section is _BAD:
        return out
    qh_names = list(qhosts) or [_DEFAULT_QUEUE_HOST]
    for name, f in _tables(c, section, ("queues",), _QUEUE, "queue").items():
        key: Key = ("queues", name)
        bad = _BAD in f.values()
        kind = f["kind"]
        dtypes = c.dtypes(f["dtypes"], key + ("dtypes",))
        n = len(dtypes) if isinstance(dtypes, tuple) else None
        hint = ('is allowed only in padding queues; give the size, or set kind = "padding"'
                if kind != "padding" else "")
        shapes = c.shapes(f["shapes"], key + ("shapes",), n, kind in ("padding", _BAD), hint)
        if kind == "padding" and f["shapes"] is None:
            c.add(key + ("shapes",), "missing; a padding queue needs a shape for every component "
                                     "(-1 for the dimensions to pad)")
            bad = True
        capacity, mad, seed = f["capacity"], f["min_after_dequeue"], f["seed"]
        if kind not in (_BAD, "shuffle"):
            for k in ("min_after_dequeue", "seed"):
                if f[k] is not None:
                    c.add(key + (k,), 'applies only to shuffle queues; remove it or set kind = "shuffle"')
                    bad = True
        if _is_int(mad) and _is_int(capacity) and kind == "shuffle" and mad >= capacity:
            c.add(key + ("min_after_dequeue",),
                  f"must be less than capacity ({capacity}), got {mad}; "
                  f"lower it or raise capacity above {mad}")
            bad = True
        names = f["names"]
        if isinstance(names, list):
            if n is not None and len(names) != n:
                c.add(key + ("names",), f"gives {len(names)} names for {n} dtypes; give one name per component")
                bad = True
            for i, nm in enumerate(names):
                if nm in names[:i]:
                    c.add(key + ("names", i), f"repeats the component name {_show(nm)}; names must be distinct")
                    bad = True
                elif not nm:
                    c.add(key + ("names", i), "is empty; give each component a name")
                    bad = True
        host = f["host"]
        if host is None:
            if len(qh_names) > 1:
                c.add(key + ("host",), f"missing; there are {len(qh_names)} queue hosts "
                                       f"({', '.join(qh_names)}), so say which one holds this queue")
                bad = True
            host = qh_names[0]
        elif isinstance(host, str) and host not in qh_names:
            c.add(key + ("host",), f"no queue host named {_show(host)}{_did_you_mean(host, qh_names, mid=True)}; "
                                   f"known: {', '.join(qh_names)}")
            bad = True
        if bad or _BAD in (dtypes, shapes):
            out[name] = _BAD
            continue
        out[name] = QueueSpec(
            name=name, kind=kind, capacity=capacity, dtypes=dtypes, shapes=shapes,
            min_after_dequeue=mad or 0, seed=seed,
            names=tuple(names) if names is not None else None, host=host, external=f["external"],
        )
    return out


def _build_nodes(c: _Checker, section: Any, default_timeout: Any, queues: dict[str, Any],
                 hosts: dict[str, HostSpec], check_imports: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return name -> NodeSpec (``_BAD`` when broken), and name -> (reads, writes, host) as written."""
    out: dict[str, Any] = {}
    uses: dict[str, Any] = {}
    for name, f in _tables(c, section, ("nodes",), _NODE, "node").items():
        key: Key = ("nodes", name)
        uses[name] = (f["reads"], f["writes"], f["host"])
        bad = _BAD in f.values()
        kind = f["kind"]
        if isinstance(kind, str):
            if not _check_kind(c, key + ("kind",), kind, check_imports):
                bad = True
        replicas = f["replicas"] if _is_int(f["replicas"]) else 1
        host = f["host"]
        if isinstance(host, str) and host not in hosts:
            c.add(key + ("host",), f"no host named {_show(host)}{_did_you_mean(host, hosts, mid=True)}; "
                                   f"add a [hosts.{host}] table with its address, or use one of: {', '.join(hosts)}")
            bad = True
        device = f["device"]
        gpus: tuple[int, ...] = ()
        if device == "gpu" and kind == "ps":
            c.add(key + ("device",), 'PS nodes run on the CPU; set device = "cpu"')
            bad = True
        if device == "cpu":
            for k in ("gpus", "gpu_memory_fraction"):
                if f[k] is not None:
                    c.add(key + (k,), 'is used only with device = "gpu"; add device = "gpu" or remove it')
                    bad = True
        elif device == "gpu":
            g = f["gpus"]
            if g is None:
                gpus = tuple(range(replicas))
            elif _is_int(g) and g >= 0:
                gpus = (g,) * replicas
            elif isinstance(g, list) and all(_is_int(x) and x >= 0 for x in g):
                if len(g) != replicas:
                    c.add(key + ("gpus",), f"lists {len(g)} GPU{'s' if len(g) != 1 else ''} for {replicas} "
                                           f"replica{'s' if replicas != 1 else ''}; give one GPU per replica, "
                                           "or a single number for all of them")
                    bad = True
                gpus = tuple(g)
            else:
                c.add(key + ("gpus",), f"expected a GPU index >= 0 or a list of them (one per replica), got {_show(g)}")
                bad = True
            frac = f["gpu_memory_fraction"]
            if isinstance(frac, float) and not 0.0 < frac <= 1.0:
                c.add(key + ("gpu_memory_fraction",), f"must be more than 0 and at most 1, got {_num(frac)}")
                bad = True
        timeout = f["timeout"] if "timeout" in section[name] else default_timeout
        if isinstance(f["timeout"], float) and f["timeout"] <= 0:
            c.add(key + ("timeout",), f"must be more than 0 seconds (or inf to wait forever), got {_num(f['timeout'])}")
            bad = True
        restart, max_restarts = f["restart"], f["max_restarts"]
        if restart == "never" and max_restarts is not None:
            c.add(key + ("max_restarts",), 'is used only with restart = "on-failure"; add that or remove it')
            bad = True
        max_restarts = 0 if restart == "never" else (3 if max_restarts is None else max_restarts)
        for side in ("reads", "writes"):
            names = f[side]
            if not isinstance(names, list):
                continue
            for i, q in enumerate(names):
                if q in names[:i]:
                    c.add(key + (side, i), f"lists queue {_show(q)} twice")
                    bad = True
                elif q not in queues:
                    hint = _did_you_mean(q, queues) or (
                        f"; known queues: {', '.join(queues)}" if queues else f"; declare it in a [queues.{q}] table")
                    c.add(key + (side, i), f"no queue named {_show(q)}{hint}")
                    bad = True
        params = f["params"]
        if isinstance(kind, str) and isinstance(params, dict):
            params = _check_params(c, key + ("params",), kind, params)
        if bad or params is _BAD or _BAD in (timeout, max_restarts):
            out[name] = _BAD
            continue
        out[name] = NodeSpec(
            name=name, kind=kind, replicas=replicas, host=host, device=device, gpus=gpus,
            gpu_memory_fraction=f["gpu_memory_fraction"], threads=f["threads"], timeout=timeout,
            restart=restart, max_restarts=max_restarts, reads=tuple(f["reads"]),
            writes=tuple(f["writes"]), params=_freeze(params), allowed_failures=f["allowed_failures"],
        )
    if section is not _BAD and not section:
        c.add(("nodes",), "declares no nodes; add at least one [nodes.NAME] table")
    if section is _BAD or len(uses) != len(section):
        uses[""] = (_BAD, _BAD, _BAD)  # a node we could not read may be the missing writer or reader
    return out, uses


def _check_kind(c: _Checker, key: Key, kind: str, check_imports: bool) -> bool:
    if kind in BUILTIN_KINDS:
        return True
    if not _USER_KIND_RE.match(kind):
        c.add(key, f"unknown node kind {_show(kind)}{_did_you_mean(kind, BUILTIN_KINDS, mid=True)}; built-in kinds are "
                   f'{", ".join(BUILTIN_KINDS)}, and your own code is written "package.module:function"')
        return False
    if not check_imports:
        return True
    module, func = kind.split(":")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # NOTE: any failure while importing user code is the user's problem to see
        c.add(key, f"cannot import module {_show(module)} ({type(e).__name__}: {e}); "
                   "check the name and that its package is on the Python path")
        return False
    if not callable(getattr(mod, func, None)):
        c.add(key, f"module {_show(module)} has no function {_show(func)}{_did_you_mean(func, dir(mod))}")
        return False
    return True


def _check_params(c: _Checker, key: Key, kind: str, params: dict[str, Any]) -> Any:
    """Check params for kinds with a schema; check the dtypes/shapes hints for all others."""
    schema = KIND_PARAMS.get(kind)
    if kind == "reader":
        fmt = params.get("format", "csv")
        f = c.fields(params, key, schema, "a reader", fmt if fmt in ("csv", "npy", "fixed") else None)
        if f is None or _BAD in f.values():
            _reader_components(c, key, f or {})
            return _BAD
        if _reader_components(c, key, f) is _BAD:
            return _BAD
        return {k: v for k, v in f.items() if v is not None or k in params}
    if schema is not None:
        f = c.fields(params, key, schema, f"a {kind}")
        if f is None or _BAD in f.values():
            return _BAD
        params = {k: v for k, v in f.items() if v is not None or k in params}
    if _hints(c, key, params) is _BAD:
        return _BAD
    return params


def _hints(c: _Checker, key: Key, params: Mapping[str, Any]) -> Any:
    """The ``(dtypes, shapes)`` a node's params announce, ``None`` each when absent."""
    dtypes = params.get("dtypes")
    if dtypes is not None and not (isinstance(dtypes, list) and all(isinstance(d, str) for d in dtypes)):
        c.add(key + ("dtypes",), f"expected a list of dtype names, got {_show(dtypes)}")
        return _BAD
    dtypes = c.dtypes(dtypes, key + ("dtypes",))
    shapes = params.get("shapes")
    if shapes is not None and not isinstance(shapes, list):
        c.add(key + ("shapes",), f"expected a list of shapes, got {_show(shapes)}")
        return _BAD
    n = len(dtypes) if isinstance(dtypes, tuple) else None
    shapes = c.shapes(shapes, key + ("shapes",), n, True, "")
    if _BAD in (dtypes, shapes):
        return _BAD
    return dtypes, shapes


def _reader_components(c: _Checker, key: Key, f: Mapping[str, Any]) -> Any:
    """Check a reader's components; return ``(dtypes, shapes, names)`` or ``_BAD``."""
    comps = f.get("components")
    fmt = f.get("format")
    if not isinstance(comps, list) or fmt not in ("csv", "npy", "fixed"):
        return _BAD
    ckey = key + ("components",)
    if not comps:
        c.add(ckey, 'is empty; give one table per component, e.g. [{ dtype = "float32", columns = "0:64" }]')
        return _BAD
    dtypes, shapes, names = [], [], []
    bad = False
    for i, comp in enumerate(comps):
        k = ckey + (i,)
        v = c.fields(comp, k, READER_COMPONENT, "a reader component", fmt)
        if v is None or _BAD in v.values():
            bad = True
            continue
        dtype = c.dtype(v["dtype"], k + ("dtype",))
        shape = v["shape"]
        if shape is not None and any(d < 0 for d in shape):
            c.add(k + ("shape",), f"dimensions must be >= 0 (a reader's items have known sizes), got {_show(shape)}")
            bad = True
            continue
        if fmt == "csv":
            ncols = _columns(c, k + ("columns",), v["columns"], f.get("header"))
            if ncols is None:
                bad = True
                continue
            if shape is None:
                cols = v["columns"]
                one = _is_int(cols) or (isinstance(cols, str) and not _RANGE_RE.match(cols))
                shape = [] if one else [ncols]
            elif math.prod(shape) != ncols:
                c.add(k + ("shape",), f"holds {math.prod(shape)} values but columns give {ncols}; "
                                      "make the shape's sizes multiply to the number of columns")
                bad = True
                continue
            if dtype is not _BAD and v["default"] is not None and not _fits(v["default"], dtype):
                c.add(k + ("default",), f"{_show(v['default'])} is not a {dtype} value")
                bad = True
        else:
            shape = shape if shape is not None else []
            if fmt == "fixed" and dtype == "string":
                c.add(k + ("dtype",), 'fixed-length records cannot hold "string" components; use "uint8" bytes')
                bad = True
            if fmt == "npy" and len(comps) > 1 and v["name"] is None:
                c.add(k + ("name",), "missing; with several components an .npy file holds a structured "
                                     "array, and each component is the field of that name")
                bad = True
        if dtype is _BAD:
            bad = True
        dtypes.append(dtype)
        shapes.append(tuple(shape))
        names.append(v["name"])
    if bad:
        return _BAD
    return tuple(dtypes), tuple(shapes), tuple(names)


def _columns(c: _Checker, key: Key, cols: Any, header: Any) -> int | None:
    """Number of CSV columns a ``columns`` spec selects, or ``None`` after a problem."""
    if cols is None:
        c.add(key, 'missing; say which CSV columns make this component: an index, "start:stop", '
                   "a list of indices, or header names")
        return None
    if _is_int(cols):
        if cols < 0:
            c.add(key, f"column indices start at 0, got {cols}")
            return None
        return 1
    if isinstance(cols, str):
        m = _RANGE_RE.match(cols)
        if m:
            start, stop = int(m[1]), int(m[2])
            if stop <= start:
                c.add(key, f"range {_show(cols)} is empty; write start:stop with stop > start")
                return None
            return stop - start
        names = [cols]
    elif isinstance(cols, list) and cols and all(_is_int(x) and x >= 0 for x in cols):
        return len(cols)
    elif isinstance(cols, list) and cols and all(isinstance(x, str) for x in cols):
        names = cols
    else:
        c.add(key, f'expected a column index, "start:stop", a list of indices or a list of header names, got {_show(cols)}')
        return None
    if header is False:
        c.add(key, "column names need header = true; use indices, or set header = true")
        return None
    return len(names)


def _fits(value: Any, dtype: str) -> bool:
    if dtype == "string":
        return isinstance(value, str)
    if dtype == "bool":
        return isinstance(value, bool)
    if dtype.startswith(("int", "uint")):
        return _is_int(value) and (value >= 0 or dtype.startswith("int"))
    return _is_num(value)


def _build_queue_hosts(c: _Checker, raw: dict[str, dict[str, Any]], hosts: dict[str, HostSpec],
                       uses: dict[str, Any], have_queues: bool) -> dict[str, QueueHostSpec]:
    # Port 0 and missing ports are fine only when everything runs on this machine.
    remote = [(f"node {_show(n)}", u[2]) for n, u in uses.items()
              if u[2] in hosts and not hosts[u[2]].is_local]
    remote += [(f"queue host {_show(q)}", f["host"]) for q, f in raw.items()
               if f["host"] in hosts and not hosts[f["host"]].is_local]
    why = f"{remote[0][0]} runs on host {_show(remote[0][1])} ({hosts[remote[0][1]].address})" if remote else ""
    if not raw and have_queues:
        if remote:
            c.add(("queue_hosts",), f"missing; the queues need a queue host with a fixed port because {why}; "
                                    "add e.g. [queue_hosts.qh] with host and port = 5555")
        return {_DEFAULT_QUEUE_HOST: QueueHostSpec(_DEFAULT_QUEUE_HOST, _LOCAL, hosts[_LOCAL].address, 0)}
    out: dict[str, QueueHostSpec] = {}
    seen: dict[tuple[str, int], str] = {}
    for name, f in raw.items():
        key: Key = ("queue_hosts", name)
        host, port = f["host"], f["port"]
        bad = _BAD in (host, port, f["max_message_size"])
        if isinstance(host, str) and host not in hosts:
            c.add(key + ("host",), f"no host named {_show(host)}{_did_you_mean(host, hosts, mid=True)}; "
                                   f"add a [hosts.{host}] table with its address, or use one of: {', '.join(hosts)}")
            bad = True
        if port is None or port == 0:
            if remote:
                what = "missing" if port is None else "is 0 (any free port)"
                c.add(key + ("port",), f"{what}, but {why}, so the port must be fixed; give one such as 5555")
                bad = True
            port = 0
        elif _is_int(port) and not 1 <= port <= 65535:
            c.add(key + ("port",), f"must be between 1 and 65535 (or 0 for any free port), got {port}")
            bad = True
        if bad:
            continue
        addr = hosts[host].address
        if port:
            where = ("127.0.0.1" if hosts[host].is_local else addr, port)
            if where in seen:
                c.add(key + ("port",), f"queue hosts {_show(seen[where])} and {_show(name)} both use "
                                       f"{where[0]}:{port}; give each its own port")
                continue
            seen[where] = name
        out[name] = QueueHostSpec(name, host, addr, port, f["max_message_size"])
    return out


def _check_flow(c: _Checker, queues: dict[str, Any], uses: dict[str, Any]) -> None:
    """Every queue needs a writer and a reader unless external; uses the lists as written."""
    reads = [u[0] for u in uses.values()]
    writes = [u[1] for u in uses.values()]
    for name, q in queues.items():
        if not isinstance(q, QueueSpec) or q.external:
            continue
        if _BAD not in writes and not any(name in w for w in writes):
            c.add(("queues", name), f"no node writes to this queue; add {_show(name)} to some node's writes, "
                                    "or set external = true if a client outside the topology fills it")
        if _BAD not in reads and not any(name in r for r in reads):
            c.add(("queues", name), f"no node reads this queue; add {_show(name)} to some node's reads, "
                                    "or set external = true if a client outside the topology drains it")


def _check_items(c: _Checker, queues: dict[str, Any], nodes: dict[str, Any]) -> None:
    """Compare what nodes produce or expect with the queues they use."""
    for n in nodes.values():
        if not isinstance(n, NodeSpec):
            continue
        key: Key = ("nodes", n.name)
        if n.kind == "reader":
            dtypes, shapes, names = _reader_components(_Checker(c.shown, ""), key + ("params",), _thaw(n.params))
            for i, q in enumerate(n.reads):
                spec = queues.get(q)
                if isinstance(spec, QueueSpec) and not _is_filename_queue(spec):
                    c.add(key + ("reads", i), f"a reader reads file names, so queue {_show(q)} must hold one "
                                              f"scalar string (dtypes = [\"string\"], shapes = [[]]), but it holds "
                                              f"({spec.describe_items()})")
            for q in n.writes:
                spec = queues.get(q)
                if isinstance(spec, QueueSpec) and not _is_filename_queue(spec):
                    ck = key + ("params", "components")
                    _match(c, ck, "the reader makes items of", "here", dtypes, shapes, spec,
                           at=lambda i, field, ck=ck: ck + (i, field), names=names)
        elif n.kind == "feeder":
            # Every member queue gets the same (id, features); the labels queue gets (id, label).
            labels = _thaw(n.params).get("labels_queue")
            used = [queues[q] for q in n.reads + n.writes if q != labels and isinstance(queues.get(q), QueueSpec)]
            for spec in used[1:]:
                _match(c, key, f"a feeder copies items unchanged, but queue {_show(used[0].name)} holds",
                       f"in queue {_show(used[0].name)}", used[0].dtypes, used[0].shapes, spec)
            if isinstance(labels, str):
                lk = key + ("params", "labels_queue")
                spec = queues.get(labels)
                if labels not in n.writes:
                    c.add(lk, f"queue {_show(labels)} is not in this feeder's writes; add it there")
                elif isinstance(spec, QueueSpec) and (len(spec.dtypes) != 2 or spec.dtypes[0] != "int64"):
                    c.add(lk, f"the feeder writes (id int64, label) to queue {_show(labels)}, but it holds "
                              f"({spec.describe_items()}); declare dtypes = [\"int64\", LABEL_DTYPE]")
        else:
            hints = _hints(_Checker(c.shown, ""), key + ("params",), _thaw(n.params))
            if hints is _BAD or hints == (None, None):
                continue
            if not n.reads:
                c.add(key + ("params", "dtypes" if hints[0] is not None else "shapes"),
                      "describes the items this node reads, but it reads no queue; remove it or add reads")
            for q in n.reads:
                spec = queues.get(q)
                if isinstance(spec, QueueSpec):
                    pk = key + ("params",)
                    _match(c, pk + ("dtypes" if hints[0] is not None else "shapes",),
                           "params.dtypes/shapes describe", "here", hints[0], hints[1], spec,
                           at=lambda i, field, pk=pk: pk + (field + "s", i))


def _is_filename_queue(q: QueueSpec) -> bool:
    return q.dtypes == ("string",) and (q.shapes is None or q.shapes == ((),))


def _match(c: _Checker, key: Key, subject: str, here: str, dtypes: Sequence[str] | None,
           shapes: Sequence[Any] | None, q: QueueSpec, at: Any = None,
           names: Sequence[Any] | None = None) -> None:
    """Add one problem for the first disagreement between ``(dtypes, shapes)`` and queue ``q``.

    ``subject`` completes "... N components" (e.g. "the reader makes items of"), ``here``
    says where the left side comes from, ``at(i, "dtype" | "shape")`` gives a component's key.
    """
    at = at or (lambda i, field: key)
    qname = _show(q.name)
    n = len(dtypes) if dtypes is not None else len(shapes) if shapes is not None else 0
    if (dtypes is not None or shapes is not None) and n != len(q.dtypes):
        c.add(key, f"{subject} {n} component{'s' if n != 1 else ''} but queue {qname} holds "
                   f"{len(q.dtypes)} ({q.describe_items()}); make them agree")
        return
    for i in range(n):
        label = f"component {i}" + (f" ({_show(names[i])})" if names and names[i] else "")
        if dtypes is not None and dtypes[i] != q.dtypes[i]:
            c.add(at(i, "dtype"), f"{label} is {dtypes[i]} {here} but {q.dtypes[i]} in queue {qname} "
                                  f"(queues.{q.name}.dtypes[{i}]); make them the same")
            return
        if shapes is not None and q.shapes is not None:
            a, b = shapes[i], q.shapes[i]
            if len(a) != len(b) or any(x is not None and y is not None and x != y for x, y in zip(a, b)):
                c.add(at(i, "shape"), f"{label} has shape {_shape_text(a)} {here} but {_shape_text(b)} in "
                                      f"queue {qname} (queues.{q.name}.shapes[{i}]); make them the same")
                return
    if names and q.names and all(names) and tuple(names) != q.names:
        c.add(key, f"component names ({', '.join(map(str, names))}) differ from those of queue {qname} "
                   f"({', '.join(q.names)}); make them the same, or drop the names on one side")
