"""Start, watch and stop a topology's processes on this machine (``qpipe run``).

Order of events:

1. Every queue host starts as its own process (``qpipe node FILE QH``). It
   binds, declares its queues and prints ``QPIPE-READY ADDRESS``; the
   launcher waits for that line and then pings the address (a handshake,
   never a sleep). Port 0 works: the bound address is passed on.
2. Every node replica starts as its own process (``qpipe node FILE NAME
   --replica I``) with ``CUDA_VISIBLE_DEVICES``, the GPU memory fraction and
   the CPU thread counts set from the file. Each line it prints is prefixed
   ``[name/replica]``, shown and written to ``RUN_DIR/logs/name-replica.log``.
3. The launcher waits on process exits and metric lines, shows progress
   (queue depths, items/s, node counters), restarts failed replicas as their
   restart policy allows, and on the first unrecoverable failure stops
   everything and exits non-zero, naming the node and its last log lines.
4. Ctrl-C or SIGTERM: every queue is closed (waiting enqueues cancelled), nodes
   get ``grace`` seconds to finish, then SIGTERM, then SIGKILL. Children die
   with the launcher (``PR_SET_PDEATHSIG``), so nothing is orphaned.

Every run writes ``RUN_DIR/summary.json`` (also printed), ``metrics.jsonl``
and the per-replica logs.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import queue as queue_mod
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .client import connect
from .errors import QueueError
from .runtime import ENV_QUEUE_HOSTS, ENV_SERVICES, METRIC_PREFIX, READY_PREFIX, RESULT_PREFIX, SERVICE_KINDS
from .topology import Topology

__all__ = ["Launcher", "child_env"]

TAIL_LINES = 20


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_env(topology: Topology, node_name: str | None, replica: int, addresses: dict[str, str],
              run_dir: Path | None, services: dict[str, str] | None = None,
              resume: bool = False) -> dict[str, str]:
    """The environment of one process: device, threads, queue-host and service addresses."""
    env = dict(os.environ)
    env[ENV_QUEUE_HOSTS] = json.dumps(addresses)
    env[ENV_SERVICES] = json.dumps(services or {})
    if resume:
        env["QPIPE_RESUME"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if run_dir is not None:
        env["QPIPE_RUN_DIR"] = str(run_dir)
    if node_name is None:
        return env
    node = topology.node(node_name)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(node.threads)
    env["QPIPE_DEVICE"] = node.device
    if node.device == "gpu" and node.gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(node.gpus[replica % len(node.gpus)])
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # PS and CPU nodes see no GPU
    if node.gpu_memory_fraction is not None:
        env["QPIPE_GPU_MEMORY_FRACTION"] = str(node.gpu_memory_fraction)
    env["QPIPE_NODE"] = node_name
    env["QPIPE_REPLICA"] = str(replica)
    if node.timeout is not None:
        env["QPIPE_TIMEOUT"] = str(node.timeout)
    return env


@dataclass
class _Proc:
    name: str  # "reader/0" or "qh"
    node: str | None  # None for queue hosts
    replica: int
    popen: subprocess.Popen
    log: TextIO
    started: float
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    restarts: int = 0
    rc: int | None = None
    ended: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    address: str | None = None


class Launcher:
    """Runs a topology's queue hosts and nodes as child processes and supervises them.

    Parameters
    ----------
    topology : Topology
        The checked topology.
    run_dir : Path
        Where logs, metrics and ``summary.json`` go (created).
    quiet : bool
        No progress lines, and node output only in the log files.
    grace : float
        Seconds nodes get to finish after Ctrl-C/SIGTERM before they are terminated.
    progress_every : float
        Seconds between progress updates.
    """

    def __init__(self, topology: Topology, run_dir: Path, *, quiet: bool = False, grace: float = 10.0,
                 progress_every: float = 2.0, out: TextIO | None = None, extra_args: list[str] | None = None,
                 startup_timeout: float = 60.0, resume: bool = False) -> None:
        self.topology = topology
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.grace = grace
        self.progress_every = progress_every
        self.out = out or sys.stdout
        self.tty = self.out.isatty() and not quiet
        self.extra_args = extra_args or []
        self.startup_timeout = startup_timeout
        self.events: queue_mod.Queue = queue_mod.Queue()
        self.hosts: dict[str, _Proc] = {}
        self.procs: dict[str, _Proc] = {}
        self.addresses: dict[str, str] = {}
        self.services: dict[str, str] = {}
        self.resume = resume
        self.results: dict[str, Any] = {}
        self._out_lock = threading.Lock()
        self._stop_requested: str | None = None
        self._last_stats: tuple[float, dict[str, Any]] | None = None
        self._metrics_file: TextIO | None = None
        self._status_len = 0

    # -- output -----------------------------------------------------------------------

    def say(self, line: str) -> None:
        with self._out_lock:
            if self._status_len:
                self.out.write("\r" + " " * self._status_len + "\r")
                self._status_len = 0
            self.out.write(line + "\n")
            self.out.flush()

    def _status(self, line: str) -> None:
        with self._out_lock:
            if self.tty:
                line = line[:200]
                self.out.write("\r" + line + " " * max(0, self._status_len - len(line)))
                self._status_len = len(line)
            else:
                self.out.write(line + "\n")
            self.out.flush()

    # -- processes ------------------------------------------------------------------------

    def _command(self, name: str, replica: int | None) -> list[str]:
        cmd = [sys.executable, "-m", "qpipe.cli", "node", str(self.topology.path), name]
        if replica is not None:
            cmd += ["--replica", str(replica)]
        return cmd + self.extra_args

    def _spawn(self, name: str, node: str | None, replica: int, restarts: int = 0) -> _Proc:
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        label = name if node is None else f"{node}/{replica}"
        log = open(logs / (label.replace("/", "-") + ".log"), "a", encoding="utf-8")
        env = child_env(self.topology, node, replica, self.addresses, self.run_dir, self.services, self.resume)
        popen = subprocess.Popen(
            self._command(name, None if node is None else replica),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=_pdeathsig, text=True, encoding="utf-8", errors="replace",
            bufsize=1,
        )
        p = _Proc(label, node, replica, popen, log, time.monotonic(), restarts=restarts)
        pump = threading.Thread(target=self._pump, args=(p,), name=f"pump {label}", daemon=True)
        pump.start()
        threading.Thread(target=self._wait, args=(p, pump), name=f"wait {label}", daemon=True).start()
        return p

    def _wait(self, p: _Proc, pump: threading.Thread) -> None:
        # The exit is reported when the process ends, not when its output closes
        # (a helper it started may hold the pipe open); its last lines get a moment.
        rc = p.popen.wait()
        pump.join(1.0)
        p.ready.set()
        self.events.put(("exit", p, rc))

    def _pump(self, p: _Proc) -> None:
        assert p.popen.stdout is not None
        for raw in p.popen.stdout:
            line = raw.rstrip("\n")
            if line.startswith(READY_PREFIX):
                p.address = line[len(READY_PREFIX):].strip()
                p.ready.set()
                continue
            if line.startswith(METRIC_PREFIX) or line.startswith(RESULT_PREFIX):
                self.events.put(("metric" if line.startswith(METRIC_PREFIX) else "result", p, line))
                continue
            p.log.write(line + "\n")
            p.log.flush()
            p.tail.append(line)
            if not self.quiet:
                self.say(f"[{p.name}] {line}")

    def _start_queue_hosts(self) -> None:
        for name in self.topology.queue_hosts:
            self.hosts[name] = self._spawn(name, None, 0)
        deadline = time.monotonic() + self.startup_timeout
        for name, p in self.hosts.items():
            self._await_ready(p, f"queue host {name!r}", deadline)
            with connect(p.address, liveness=max(1.0, deadline - time.monotonic())) as c:
                c.ping(timeout=max(1.0, deadline - time.monotonic()))
            self.addresses[name] = p.address
            self.say(f"queue host {name} ready at {p.address}")

    def _await_ready(self, p: _Proc, what: str, deadline: float) -> None:
        """Wait for a process's QPIPE-READY line; raise naming it, with its last lines, if none came."""
        if not p.ready.wait(max(0.0, deadline - time.monotonic())) or p.address is None:
            tail = "\n  ".join(p.tail) or "(no output)"
            raise RuntimeError(f"{what} did not come up within {self.startup_timeout:g} s; its last lines:\n  {tail}")

    def _start_nodes(self) -> None:
        # Services (parameter servers) first: others need their addresses.
        services = [n for n in self.topology.nodes.values() if n.kind in SERVICE_KINDS]
        for node in services:
            for r in range(node.replicas):
                p = self._spawn(node.name, node.name, r)
                self.procs[p.name] = p
        deadline = time.monotonic() + self.startup_timeout
        for node in services:
            for r in range(node.replicas):
                p = self.procs[f"{node.name}/{r}"]
                self._await_ready(p, f"service {p.name}", deadline)
                self.services[p.name] = p.address
                self.say(f"service {p.name} ready at {p.address}")
        for node in self.topology.nodes.values():
            if node.kind in SERVICE_KINDS:
                continue
            for r in range(node.replicas):
                p = self._spawn(node.name, node.name, r)
                self.procs[p.name] = p

    @staticmethod
    def _signal(p: _Proc, sig: int) -> None:
        # Each child leads its own session: signal the whole group, so helpers a
        # node started go too.
        try:
            os.killpg(p.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _close_all_queues(self, cancel: bool) -> None:
        for qh, addr in self.addresses.items():
            try:
                with connect(addr, liveness=2.0) as c:
                    for name, qs in self.topology.queues.items():
                        if qs.host != qh:
                            continue
                        try:
                            c.queue(name, timeout=2.0).close(cancel_pending_enqueues=cancel, timeout=2.0)
                        except QueueError:
                            pass  # already closed, or the host is gone
            except QueueError:
                pass

    def _stop_nodes(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        live = [p for p in self.procs.values() if p.popen.poll() is None]
        for p in live:
            try:
                p.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            live = [p for p in self.procs.values() if p.popen.poll() is None]
            if not live:
                break
            for p in live:
                self._signal(p, sig)
            for p in live:
                try:
                    p.popen.wait(wait)
                except subprocess.TimeoutExpired:
                    pass

    def _stop_hosts(self) -> None:
        for p in self.hosts.values():
            self._signal(p, signal.SIGTERM)
        for p in self.hosts.values():
            try:
                p.popen.wait(5.0)
            except subprocess.TimeoutExpired:
                self._signal(p, signal.SIGKILL)
                p.popen.wait(5.0)

    # -- progress ---------------------------------------------------------------------------

    def _queue_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for addr in self.addresses.values():
            try:
                with connect(addr, liveness=1.0) as c:
                    out.update(c.stats(timeout=1.0)["queues"])
            except QueueError:
                pass
        return out

    def _progress(self) -> None:
        now = time.monotonic()
        stats = self._queue_stats()
        parts = []
        for name, st in stats.items():
            rate = ""
            if self._last_stats is not None:
                t0, old = self._last_stats
                if name in old and now > t0:
                    rate = f" {(st['dequeued'] - old[name]['dequeued']) / (now - t0):,.0f}/s"
            parts.append(f"{name} {st['size']}/{st['capacity']}{' closed' if st['closed'] else ''}{rate}")
        self._last_stats = (now, stats)
        running = sum(1 for p in self.procs.values() if p.rc is None)
        counters = collections.Counter()
        for p in self.procs.values():
            for k, v in p.metrics.items():
                if isinstance(v, (int, float)) and not k.startswith("last_"):
                    counters[k] += v
        extra = " ".join(f"{k}={v:,.0f}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in
                         sorted(counters.items())[:4])
        self._status(f"[{time.monotonic() - self._t0:6.1f}s] nodes {running}/{len(self.procs)} running | "
                     + " | ".join(parts) + (f" | {extra}" if extra else ""))

    # -- main loop ------------------------------------------------------------------------

    def request_stop(self, why: str) -> None:
        """Ask the run to stop (thread-safe); used by the signal handlers."""
        self.events.put(("stop", None, why))

    def run(self) -> int:
        """Run the pipeline to completion; returns the process exit status."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8", buffering=1)
        self._t0 = time.monotonic()
        started_at = time.time()
        status, failed, message = "completed", None, ""
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        if threading.current_thread() is threading.main_thread():
            for s in old:
                signal.signal(s, lambda sig, _f: self.request_stop(signal.Signals(sig).name))
        try:
            self.say(f"pipeline {self.topology.name}: {len(self.topology.queue_hosts)} queue host(s), "
                     f"{sum(n.replicas for n in self.topology.nodes.values())} node process(es); "
                     f"run dir {self.run_dir}")
            self._start_queue_hosts()
            self._start_nodes()
            status, failed, message = self._supervise()
        except RuntimeError as e:
            status, message = "failed", str(e)
        finally:
            if status != "completed":
                self._close_all_queues(cancel=True)
                self._stop_nodes(self.grace)
            self._drain_events()
            self._stop_hosts()
            for s, h in old.items():
                if threading.current_thread() is threading.main_thread():
                    signal.signal(s, h)
        summary = self._summary(status, failed, message, started_at)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        self._print_summary(summary)
        for p in [*self.procs.values(), *self.hosts.values()]:
            p.log.close()
        if self._metrics_file:
            self._metrics_file.close()
        return 0 if status == "completed" else (130 if status == "interrupted" else 1)

    def _supervise(self) -> tuple[str, str | None, str]:
        next_progress = time.monotonic() + self.progress_every
        while True:
            if all(p.rc is not None for p in self.procs.values()):
                return "completed", None, ""  # failures left by now were tolerated
            timeout = max(0.0, next_progress - time.monotonic())
            try:
                kind, p, data = self.events.get(timeout=timeout)
            except queue_mod.Empty:
                if not self.quiet:
                    self._progress()
                next_progress = time.monotonic() + self.progress_every
                continue
            if kind == "stop":
                self.say(f"{data}: closing queues; nodes have {self.grace:g} s to finish")
                self._stop_requested = data
                self._close_all_queues(cancel=True)
                self._stop_nodes(self.grace)
                return "interrupted", None, f"stopped by {data}"
            if kind in ("metric", "result"):
                self._record(kind, p, data)
                continue
            # a process exited
            p.rc, p.ended = data, time.monotonic()
            if p.node is None:
                if self._stop_requested:
                    continue
                tail = "\n    ".join(p.tail) or "(no output)"
                return "failed", p.name, (f"queue host {p.name} exited with status {data}; its last lines:"
                                          f"\n    {tail}")
            if data == 0:
                self.say(f"{p.name} finished ({p.ended - p.started:.1f} s)")
                continue
            node = self.topology.node(p.node)
            if node.restart == "on-failure" and p.restarts < node.max_restarts:
                self.say(f"{p.name} exited with status {data}; restarting "
                         f"({p.restarts + 1} of {node.max_restarts})")
                p.log.close()
                q = self._spawn(p.node, p.node, p.replica, restarts=p.restarts + 1)
                self.procs[p.name] = q
                continue
            failed_for_good = sum(1 for q in self.procs.values() if q.node == p.node and q.rc not in (None, 0))
            if failed_for_good <= node.allowed_failures:
                self.say(f"{p.name} exited with status {data}; tolerated ({failed_for_good} of "
                         f"{node.allowed_failures} allowed failures of node {p.node})")
                continue
            tail = "\n    ".join(p.tail) or "(no output)"
            return "failed", p.name, (f"node {p.name} exited with status {data}; last lines of its log "
                                      f"({self.run_dir / 'logs' / (p.name.replace('/', '-') + '.log')}):"
                                      f"\n    {tail}")

    def _drain_events(self) -> None:
        while True:
            try:
                kind, p, data = self.events.get_nowait()
            except queue_mod.Empty:
                return
            if kind in ("metric", "result"):
                self._record(kind, p, data)
            elif kind == "exit" and p.rc is None:
                p.rc, p.ended = data, time.monotonic()

    def _record(self, kind: str, p: _Proc, line: str) -> None:
        prefix = METRIC_PREFIX if kind == "metric" else RESULT_PREFIX
        try:
            values = json.loads(line[len(prefix):])
        except ValueError:
            self.say(f"[{p.name}] (unreadable {kind} line ignored: {line[:80]!r})")
            return
        if not isinstance(values, dict):
            return
        if kind == "metric":
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("last_"):
                    p.metrics[k] = p.metrics.get(k, 0) + v
                else:
                    p.metrics[k] = v
        else:
            multi = p.node is not None and self.topology.node(p.node).replicas > 1
            self.results.setdefault(p.name if multi else (p.node or p.name), {}).update(values)
        if self._metrics_file:
            self._metrics_file.write(json.dumps({"t": round(time.monotonic() - self._t0, 3), "proc": p.name,
                                                 "kind": kind, **values}, default=str) + "\n")

    # -- summary ----------------------------------------------------------------------------

    def _summary(self, status: str, failed: str | None, message: str, started_at: float) -> dict[str, Any]:
        nodes: dict[str, Any] = {}
        for p in self.procs.values():
            nodes.setdefault(p.node, {"kind": self.topology.node(p.node).kind, "replicas": []})["replicas"].append({
                "replica": p.replica, "exit_code": p.rc if p.rc is not None else p.popen.poll(),
                "restarts": p.restarts,
                "seconds": round((p.ended or time.monotonic()) - p.started, 3),
                "metrics": p.metrics,
            })
        summary: dict[str, Any] = {
            "pipeline": self.topology.name,
            "topology": str(self.topology.path),
            "status": status,
            "exit_code": 0 if status == "completed" else (130 if status == "interrupted" else 1),
            "failed": failed,
            "message": message,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
            "seconds": round(time.time() - started_at, 3),
            "run_dir": str(self.run_dir),
            "nodes": nodes,
            "results": self.results,
        }
        # Results of single-replica nodes (e.g. the evaluator's test_accuracy) are
        # also at the top level, unless two nodes report the same key (then only
        # under "results", so no node's value silently hides another's).
        owners = collections.Counter(k for who, values in self.results.items() if "/" not in who for k in values)
        for who, values in self.results.items():
            if "/" in who:
                continue
            for k, v in values.items():
                if owners[k] == 1:
                    summary.setdefault(k, v)
        return summary

    def _print_summary(self, s: dict[str, Any]) -> None:
        lines = [f"pipeline {s['pipeline']}: {s['status']} in {s['seconds']:.1f} s (exit {s['exit_code']})"]
        if s["message"]:
            lines.append(s["message"])
        for name, n in s["nodes"].items():
            rcs = ",".join(str(r["exit_code"]) for r in n["replicas"])
            m = collections.Counter()
            for r in n["replicas"]:
                for k, v in r["metrics"].items():
                    if isinstance(v, (int, float)) and not k.startswith("last_"):
                        m[k] += v
            ms = " ".join(f"{k}={v:g}" for k, v in sorted(m.items()))
            lines.append(f"  {name:<12} {n['kind']:<10} x{len(n['replicas'])} exit [{rcs}] {ms}")
        for node, values in s["results"].items():
            lines.append(f"  result {node}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        lines.append(f"summary: {self.run_dir / 'summary.json'}")
        for line in lines:
            self.say(line)
