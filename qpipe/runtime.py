"""The node runtime: what a node's code receives, and how one node process runs.

A node is a function that takes a :class:`NodeContext`::

    def run(ctx: qpipe.runtime.NodeContext) -> None:
        src, = ctx.inputs()              # handles of the queues in `reads`
        dst, = ctx.outputs()             # handles of the queues in `writes`
        while not ctx.coord.should_stop():
            try:
                x = src.dequeue()        # the node's default timeout applies
            except qpipe.OutOfRangeError:
                break                    # upstream closed and drained: done
            dst.enqueue(f(x))
            ctx.metric(items=1)          # counters, summed by the launcher

Built-in kinds live in ``nodes/<kind>.py`` as ``run(ctx)``; a user's own node
is ``kind = "package.module:function"`` in the topology. When the function
returns, the runtime tells each queue host that this replica has finished
writing its ``writes`` queues; the host closes a queue once every replica of
every node that writes it has finished, so readers drain it and stop
(exactly once, whichever replica ends last, on any machine).

Processes report to the launcher on standard output with lines starting
``QPIPE-METRIC`` or ``QPIPE-RESULT`` followed by JSON; everything else a node
prints is its log.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from .client import Client, Queue, connect
from .coordinator import Coordinator
from .errors import QueueError
from .spec import QueueSpec
from .topology import NodeSpec, Topology, load
from .xp import array_module, describe

__all__ = ["NodeContext", "queue_host_addresses", "run_node"]

METRIC_PREFIX = "QPIPE-METRIC "
RESULT_PREFIX = "QPIPE-RESULT "
READY_PREFIX = "QPIPE-READY "
ENV_QUEUE_HOSTS = "QPIPE_QUEUE_HOSTS"
ENV_SERVICES = "QPIPE_SERVICES"
#: Node kinds that serve requests (parameter servers): the launcher starts them
#: before the others and passes their bound addresses on, as for queue hosts.
SERVICE_KINDS = ("ps",)


def queue_host_addresses(topology: Topology) -> dict[str, str]:
    """Address of every queue host: from ``QPIPE_QUEUE_HOSTS`` (set by the launcher) or the file."""
    out = {name: qh.address for name, qh in topology.queue_hosts.items()}
    raw = os.environ.get(ENV_QUEUE_HOSTS)
    if raw:
        try:
            given = json.loads(raw)
        except ValueError:
            raise ValueError(f"{ENV_QUEUE_HOSTS} is not JSON: {raw[:80]!r}") from None
        out.update({k: v for k, v in given.items() if k in out})
    return out


class NodeContext:
    """Everything one node replica needs: its spec, params, queues, logger and coordinator.

    Attributes
    ----------
    topology : Topology
        The checked topology file.
    node : NodeSpec
        This node's table.
    replica, replicas : int
        This process's replica index and the node's replica count.
    params : dict
        The node's ``params`` (a mutable copy).
    timeout : float or None
        The node's default timeout for queue operations.
    coord : Coordinator
        Stop together: threads of this node check ``coord.should_stop()``.
    log : logging.Logger
        The node's logger (the launcher prefixes lines with the node name).
    """

    def __init__(self, topology: Topology, node: NodeSpec, replica: int,
                 addresses: Mapping[str, str] | None = None, out: Any = None) -> None:
        self.topology = topology
        self.node = node
        self.replica = replica
        self.replicas = node.replicas
        self.params = node.params_dict()
        self.timeout = node.timeout
        self.coord = Coordinator()
        self.log = logging.getLogger(f"qpipe.node.{node.name}")
        self._addresses = dict(addresses or queue_host_addresses(topology))
        self._clients: dict[str, Client] = {}
        self._handles: dict[str, Queue] = {}
        self._out = out or sys.stdout
        self._out_lock = threading.Lock()
        self._lock = threading.Lock()

    def service_addresses(self, node_name: str) -> list[str]:
        """Endpoints of every replica of a service node (e.g. the PS shards), by replica.

        From ``QPIPE_SERVICES`` (set by ``qpipe run``, which knows the bound
        ports) or else from the file: the node's host address and
        ``params.port + replica``.
        """
        node = self.topology.node(node_name)
        raw = os.environ.get(ENV_SERVICES)
        given = json.loads(raw) if raw else {}
        out = []
        for r in range(node.replicas):
            addr = given.get(f"{node_name}/{r}")
            if addr is None:
                port = int(node.params.get("port", 0))
                if not port:
                    raise ValueError(f"node {node_name!r} needs params.port when started with 'qpipe node' "
                                     f"(only 'qpipe run' can pass on a port chosen at random)")
                host = self.topology.hosts[node.host].address
                addr = f"tcp://{host}:{port + r}"
            out.append(addr)
        return out

    def bind_address(self) -> str:
        """Where a service replica binds: its host's address and ``params.port + replica`` (0: any port)."""
        port = int(self.params.get("port", 0))
        host = self.topology.hosts[self.node.host].address
        return f"tcp://{host}:{port + self.replica if port else 0}"

    def ready(self, address: str) -> None:
        """Tell the launcher this service is up at ``address`` (the startup handshake)."""
        with self._out_lock:
            self._out.write(READY_PREFIX + address + "\n")
            self._out.flush()

    @property
    def run_dir(self) -> Path:
        """The run directory (``QPIPE_RUN_DIR``, set by ``qpipe run``), else ``runs/NAME`` here."""
        d = os.environ.get("QPIPE_RUN_DIR")
        return Path(d) if d else Path("runs") / self.topology.name

    @property
    def resume(self) -> bool:
        """Whether the run was started with ``--resume``."""
        return os.environ.get("QPIPE_RESUME") == "1"

    @property
    def name(self) -> str:
        """``"node/replica"``, e.g. ``"reader/1"``."""
        return f"{self.node.name}/{self.replica}"

    def path(self, p: str) -> Path:
        """Resolve a path from the params against the topology file's folder."""
        return self.topology.resolve_path(p)

    # -- queues ---------------------------------------------------------------------

    def client(self, queue_host: str) -> Client:
        """The blocking client of a queue host (one per host, shared by this node's threads)."""
        with self._lock:
            c = self._clients.get(queue_host)
            if c is None:
                c = self._clients[queue_host] = connect(self._addresses[queue_host], timeout=self.timeout)
            return c

    def queue(self, name: str) -> Queue:
        """A handle to a topology queue, declared with the file's spec (idempotent)."""
        h = self._handles.get(name)
        if h is None:
            qs = self.topology.queue(name)
            c = self.client(qs.host)
            h = c._declare(name, QueueSpec.make(**qs.spec_kwargs()), self.timeout)
            self._handles[name] = h
        return h

    def inputs(self) -> list[Queue]:
        """Handles of the queues in ``reads``, in file order."""
        return [self.queue(n) for n in self.node.reads]

    def outputs(self) -> list[Queue]:
        """Handles of the queues in ``writes``, in file order."""
        return [self.queue(n) for n in self.node.writes]

    def writers_of(self, queue: str) -> int:
        """How many replicas (over all nodes) write ``queue``."""
        return sum(self.topology.node(n).replicas for n in self.topology.writers(queue))

    def finish_writing(self) -> None:
        """Tell the hosts this replica is done with its ``writes``; called by the runtime on success."""
        for name in self.node.writes:
            qs = self.topology.queue(name)
            c = self.client(qs.host)
            c._call("writer_done", {"queue": name, "writer": self.name, "writers": self.writers_of(name)},
                    (), c._timeout(self.timeout))

    # -- reporting ------------------------------------------------------------------

    def _emit(self, prefix: str, values: dict[str, Any]) -> None:
        line = prefix + json.dumps(values, separators=(",", ":"), default=_jsonable)
        with self._out_lock:
            self._out.write(line + "\n")
            self._out.flush()

    def metric(self, **values: Any) -> None:
        """Report numbers to the launcher; numbers are counters it adds up (``items=32``).

        Keys starting with ``last_`` are gauges: the launcher keeps the latest.
        """
        self._emit(METRIC_PREFIX, values)

    def result(self, **values: Any) -> None:
        """Report final results (e.g. ``test_accuracy=0.97``); they go into ``summary.json``."""
        self._emit(RESULT_PREFIX, values)

    def close(self) -> None:
        for c in self._clients.values():
            c.close()


def _jsonable(x: Any) -> Any:
    try:
        return x.item()  # numpy scalars
    except AttributeError:
        return str(x)


def resolve_entry(node: NodeSpec) -> Callable[[NodeContext], Any]:
    """The function that runs ``node``: ``nodes.<kind>.run`` or the user's ``module:function``."""
    if node.is_builtin:
        module, func = f"nodes.{node.kind}", "run"
    else:
        module, _, func = node.kind.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"node {node.name!r}: cannot import {module!r} for kind {node.kind!r}: {e}") from e
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ImportError(f"node {node.name!r}: {module!r} has no function {func!r}")
    return fn


def run_node(topology: Topology | str | Path, node_name: str, replica: int = 0,
             addresses: Mapping[str, str] | None = None) -> int:
    """Run one replica of a node in this process; returns its exit status (0: success).

    Errors are logged with a traceback and give status 1; the run's other
    replicas learn of it from the launcher.
    """
    topo = topology if isinstance(topology, Topology) else load(topology)
    node = topo.node(node_name)
    if not 0 <= replica < node.replicas:
        raise ValueError(f"node {node_name!r} has {node.replicas} replicas; --replica {replica} is out of range")
    _setup_logging(f"{node_name}/{replica}")
    ctx = NodeContext(topo, node, replica, addresses)
    log = ctx.log
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (the launcher stopping a run) asks the node's threads to stop;
        # blocked queue calls wake because the launcher also closes the queues.
        signal.signal(signal.SIGTERM, lambda sig, frame: ctx.coord.request_stop())
    try:
        fn = resolve_entry(node)
        log.info("starting %s (kind %s, replica %d of %d, pid %d)", ctx.name, node.kind, replica,
                 node.replicas, os.getpid())
        log.info("device: %s requested, arrays on %s", node.device, describe(array_module(node.device)))
        t0 = time.monotonic()
        fn(ctx)
        ctx.finish_writing()
        log.info("finished in %.2f s", time.monotonic() - t0)
        return 0
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except QueueError as e:
        log.error("failed: %s: %s", type(e).__name__, e)
        return 1
    except Exception:
        log.error("failed:\n%s", traceback.format_exc().rstrip())
        return 1
    finally:
        ctx.close()


def setup_logging(who: str = "") -> None:
    """Log lines as ``HH:MM:SS LEVEL message`` on stderr (the launcher adds the node's name)."""
    _setup_logging(who)


def _setup_logging(who: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("QPIPE_LOG_LEVEL", "INFO").upper())
