"""Data-parallel training throughput: parameter-server coordination overhead, sync and async.

Every cell of the benchmark starts, with the ``spawn`` method::

    PS shard process(es)  <--pull / push-->  N trainer processes
    (qpipe.ps.ParameterServer around a ShardState)

Each trainer runs ``pull -> gradients (nodes.model.loss_and_grads) on a fixed
synthetic batch -> sleep compute_ms -> push``, exactly the loop of
``nodes/trainer.py`` minus the input queue (``--with-queue`` puts one back:
a feeder process pushes batches through a qpipe queue host and the trainers
``dequeue_many`` them). Sync cells aggregate all N gradients per step
(``replicas_to_aggregate = N``, no spare replica); async cells apply every
gradient as it arrives.

A cell runs a warm-up, then a measured window of fixed wall time. The rates
come from the PS itself: the parent asks every shard for
``ParameterServer.stats()`` when the window opens and when it closes, and
divides the difference in ``updates`` (PS versions) by the time between the
two answers. A *step* is one PS update: in sync mode one update averages the
gradients of all N replicas, in async mode it is one replica's gradient.

Columns:

``steps/s``        PS updates per second (shard 0; shards move in lockstep)
``samples/s``      gradients applied per second x batch size
``ideal``          sync: 1000 / compute_ms; async: N x 1000 / compute_ms
                   (``-`` with ``--compute-ms 0``: then the cell measures raw
                   coordination throughput, bounded by round trips and cores)
``ratio``          steps/s over ideal
``PS ms/upd``      the PS's ``busy_seconds`` over its updates (time spent
                   handling requests, the slowest shard)
``bytes/step``     bytes in plus out at all shards per update (headers included)

A second table splits one trainer step into its parts (gradient compute,
the simulated-compute sleep, push round trip, pull round trip including the
sync barrier) and gives CPU use over the window from /proc: the PS processes
(also as CPU ms per update, which unlike ``busy_seconds`` includes the poll
loop), the trainers, the whole machine, and *others* -- processes not of the
cell, whose load skews every number (the header warns when they used more
than a quarter of a core). This is what to look at when a ratio is low.

Acceptance (with ``--compute-ms > 0``, every wire dtype measured): sync with 4
trainers and async with 4 trainers each reach at least 0.85 of ideal.

Usage::

    python bench/training.py --compute-ms 20          # the acceptance run (~1.5 min)
    python bench/training.py --compute-ms 0           # raw coordination throughput
    python bench/training.py --quick --trainers 1     # a smoke run
    python bench/training.py --with-queue --shards 2 --json out.json

Loopback only (tcp://127.0.0.1 or ipc in a temporary directory). Every child
is stopped by its PID when a cell ends, also on error or interrupt, and asks
the kernel to kill it should the parent die (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing import connection as mp_connection
from typing import Any

try:
    import qpipe
except ImportError:  # run from a checkout without installing qpipe
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import qpipe

import numpy as np

from nodes import model
from qpipe.bench import (
    BenchmarkError,
    Children,
    choice,
    csv_list,
    format_target,
    machine_cpu,
    machine_info,
    median_rounds,
    or_dash,
    preamble,
    queue_host_body,
    run_main,
)
from qpipe.ps import WIRE_DTYPES, Optimizer, ParameterClient, ParameterServer, ShardState, assign_shards

MODES = ("sync", "async")
TRANSPORTS = ("tcp", "ipc")
DEFAULT_TRAINERS = (1, 2, 4)
DEFAULT_WIRES = ("float32", "float16")
DEFAULT_LAYERS = (64, 128, 10)
OP_TIMEOUT = 30.0  # seconds; no pull, push or dequeue of a healthy run comes near it
STARTUP_TIMEOUT = 60.0  # seconds for a child to start and report ready
STOP_TIMEOUT = 30.0  # seconds for the processes of a cell to finish after the window
N_BATCHES = 8  # distinct synthetic batches per trainer (cycled)
LR = 0.01

# Phases of a cell, in a shared integer the children read.
WAIT, WARMUP, MEASURE, STOP, ABORT = range(5)

_CTX = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class Cell:
    """One measurement."""

    mode: str
    trainers: int
    wire_dtype: str
    compute_ms: float
    shards: int
    batch_size: int
    with_queue: bool

    @property
    def label(self) -> str:
        q = "+queue" if self.with_queue else ""
        return f"{self.mode}/{self.trainers}T/{self.wire_dtype}/{self.compute_ms:g}ms/{self.shards}PS{q}"

    def ideal(self) -> float | None:
        """Steps (PS updates) per second if coordination were free; None without simulated compute."""
        if self.compute_ms <= 0:
            return None
        per_trainer = 1000.0 / self.compute_ms
        return per_trainer if self.mode == "sync" else self.trainers * per_trainer


@dataclass(frozen=True)
class Target:
    """Measured steps/s at least ``ratio`` x ideal for ``mode`` with ``trainers`` trainers."""

    mode: str
    trainers: int
    ratio: float


TARGETS = (Target("sync", 4, 0.85), Target("async", 4, 0.85))


@dataclass
class Options:
    modes: tuple[str, ...] = MODES
    trainers: tuple[int, ...] = DEFAULT_TRAINERS
    wire_dtypes: tuple[str, ...] = DEFAULT_WIRES
    compute_ms: float = 0.0
    shards: int = 1
    layers: tuple[int, ...] = DEFAULT_LAYERS
    batch_size: int = 32
    seconds: float = 3.0
    warmup: float = 1.0
    transport: str = "tcp"
    with_queue: bool = False
    repeat: int = 1


# ---------------------------------------------------------------------------
# Small helpers


def ideal_steps(mode: str, trainers: int, compute_ms: float) -> float | None:
    """Ideal PS updates/s: sync 1000/compute_ms, async trainers x 1000/compute_ms; None if compute_ms <= 0."""
    return Cell(mode, trainers, "float32", compute_ms, 1, 1, False).ideal()


def _proc_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process, from /proc (None where unavailable)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------
# Child processes (qpipe.bench.Children). Each talks to the parent over one Pipe
# end and sends ("ready", x), ("done", x) or ("error", traceback text).


def _ps_body(conn: mp_connection.Connection, phase: Any) -> None:
    job = conn.recv()
    layers, n_shards, shard = job["layers"], job["shards"], job["shard"]
    full = model.init_params(layers, seed=0)
    owners = assign_shards({n: a.shape for n, a in full.items()}, n_shards)
    mine = {n: np.ascontiguousarray(full[n]) for n in owners[shard]}
    state = ShardState(mine, Optimizer("sgd", lr=LR), mode=job["mode"],
                       replicas_to_aggregate=job["trainers"] if job["mode"] == "sync" else 1)
    server = ParameterServer(state, job["address"], expected_trainers=job["trainers"], client_timeout=OP_TIMEOUT,
                             meta={"layers": list(layers), "shards": owners})
    conn.send(("ready", server.address))
    # serve() returns once every trainer said bye (or, on abort, when the parent says so).
    server.serve(stop=lambda: phase.value >= ABORT)
    conn.send(("done", {"stats": server.stats(), "values": int(sum(a.size for a in mine.values()))}))


def _synthetic_batches(seed: int, batch_size: int, n_in: int, n_out: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch_size, n_in)).astype(np.float32),
             rng.integers(0, n_out, batch_size).astype(np.int64)) for _ in range(N_BATCHES)]


def _feeder_body(conn: mp_connection.Connection, phase: Any) -> None:
    job = conn.recv()
    batches = _synthetic_batches(1000, job["batch_size"], job["layers"][0], job["layers"][-1])
    sent = 0
    with qpipe.connect(job["address"]) as client:
        q = client.queue(job["queue"], timeout=OP_TIMEOUT)
        conn.send(("ready", None))
        while phase.value < STOP:
            try:
                q.enqueue_many(batches[sent % N_BATCHES], timeout=0.2)
            except qpipe.DeadlineExceededError:
                continue  # full: the trainers are slower than the feeder; look at the phase again
            except qpipe.QueueClosedError:
                break
            sent += 1
        with contextlib.suppress(qpipe.QueueError):
            q.close(cancel_pending_enqueues=True, timeout=OP_TIMEOUT)
    conn.send(("done", {"batches": sent}))


def _trainer_body(conn: mp_connection.Connection, phase: Any) -> None:
    job = conn.recv()
    name, compute_s, B = f"trainer/{job['index']}", job["compute_ms"] / 1000.0, job["batch_size"]
    layers = job["layers"]
    batches = _synthetic_batches(100 + job["index"], B, layers[0], layers[-1])
    client = qpipe.connect(job["queue_address"]) if job.get("queue_address") else None
    q = client.queue(job["queue"], timeout=OP_TIMEOUT) if client else None
    pc = ParameterClient(job["addresses"], name, wire_dtype=job["wire_dtype"], timeout=OP_TIMEOUT)
    keys = ("input", "grad", "sleep", "push", "pull")
    window = dict.fromkeys(keys, 0.0)
    steps = window_steps = dropped = 0
    loss = float("nan")
    try:
        pc.hello()
        sync = pc.mode == "sync"
        params = pc.pull(0)
        conn.send(("ready", None))
        while phase.value == WAIT:  # start together: no sync step is taken before every trainer said hello
            time.sleep(0.001)
        pc0 = time.perf_counter
        while phase.value < STOP:
            measuring = phase.value == MEASURE
            t0 = pc0()
            if q is not None:
                try:
                    x, y = q.dequeue_many(B, timeout=OP_TIMEOUT)
                except qpipe.OutOfRangeError:
                    break  # the feeder closed the queue: the cell is over
            else:
                x, y = batches[steps % N_BATCHES]
            t1 = pc0()
            lo, grads = model.loss_and_grads(params, x, y, np)
            t2 = pc0()
            if compute_s:
                time.sleep(compute_s)
            t3 = pc0()
            versions = list(pc.versions)
            replies = pc.push(grads, versions)
            t4 = pc0()
            params = pc.pull([v + 1 for v in versions] if sync else 0)
            t5 = pc0()
            dropped += sum(1 for r in replies if not r.get("accepted", True))
            steps += 1
            loss = float(lo)
            if measuring:
                window_steps += 1
                for k, a, b in zip(keys, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
                    window[k] += b - a
    finally:
        pc.bye()
        pc.close()
        if client is not None:
            client.close()
    conn.send(("done", {"steps": steps, "window_steps": window_steps, "window": window, "dropped": dropped,
                        "loss": loss, "bytes_sent": pc.bytes_sent, "bytes_received": pc.bytes_received,
                        "wait_seconds": pc.wait_seconds}))


# ---------------------------------------------------------------------------
# The parent: the children of one cell


class _Children(Children):
    """The child processes of one cell: one BLAS/OpenMP thread each, killed should this process die."""

    name = "qpipe-train-bench"
    die_with_parent = True
    threads = 1


def _snapshot(observer: ParameterClient, pids: dict[str, int]) -> dict[str, Any]:
    cpu0 = machine_cpu()
    ta = time.perf_counter()
    stats = observer.stats(timeout=OP_TIMEOUT)
    tb = time.perf_counter()
    return {"t": (ta + tb) / 2, "rtt": tb - ta, "stats": stats, "machine": cpu0,
            "cpu": {r: _proc_cpu_seconds(pid) for r, pid in pids.items()}}


def _hist_delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Staleness histogram of the pushes inside the window (shard 0)."""
    out = {k: v - a.get(k, 0) for k, v in b.items()}
    return {k: v for k, v in sorted(out.items(), key=lambda kv: int(kv[0])) if v}


def _delta(a: dict[str, Any], b: dict[str, Any], key: str) -> list[float]:
    return [float(y[key]) - float(x[key]) for x, y in zip(a["stats"], b["stats"])]


def _run_cell(cell: Cell, opts: Options, tmpdir: str, index: int) -> dict[str, Any]:
    children = _Children(cell.label)
    phase = _CTX.RawValue("i", WAIT)
    observer: ParameterClient | None = None
    ok = False
    try:
        # Parameter-server shards
        for s in range(cell.shards):
            children.spawn(f"ps{s}", _ps_body, phase)
        for s in range(cell.shards):
            addr = f"ipc://{tmpdir}/ps-{index}-{s}.sock" if opts.transport == "ipc" else "tcp://127.0.0.1:0"
            children.send(f"ps{s}", {"layers": list(opts.layers), "shards": cell.shards, "shard": s,
                                     "mode": cell.mode, "trainers": cell.trainers, "address": addr})
        addresses = [children.expect(f"ps{s}", "ready", STARTUP_TIMEOUT) for s in range(cell.shards)]
        # Optional input queue
        queue_job: dict[str, Any] = {}
        if cell.with_queue:
            children.spawn("host", queue_host_body,
                           f"ipc://{tmpdir}/q-{index}.sock" if opts.transport == "ipc" else "tcp://127.0.0.1:0")
            qaddr = children.expect("host", "ready", STARTUP_TIMEOUT)
            qname = f"batches-{index}"
            with qpipe.connect(qaddr) as c:
                c.fifo_queue(qname, capacity=max(64, 4 * cell.batch_size * cell.trainers),
                             dtypes=["float32", "int64"], shapes=[[opts.layers[0]], []], timeout=STARTUP_TIMEOUT)
            children.spawn("feeder", _feeder_body, phase)
            children.send("feeder", {"address": qaddr, "queue": qname, "batch_size": cell.batch_size,
                                     "layers": list(opts.layers)})
            children.expect("feeder", "ready", STARTUP_TIMEOUT)
            queue_job = {"queue_address": qaddr, "queue": qname}
        # Trainers
        for i in range(cell.trainers):
            children.spawn(f"trainer{i}", _trainer_body, phase)
            children.send(f"trainer{i}", {"index": i, "addresses": addresses, "wire_dtype": cell.wire_dtype,
                                          "compute_ms": cell.compute_ms, "batch_size": cell.batch_size,
                                          "layers": list(opts.layers), **queue_job})
        for i in range(cell.trainers):
            children.expect(f"trainer{i}", "ready", STARTUP_TIMEOUT)
        observer = ParameterClient(addresses, "bench/observer", role="evaluator", timeout=OP_TIMEOUT)
        pids = children.pids()
        phase.value = WARMUP
        children.watch(opts.warmup)
        phase.value = MEASURE
        s0 = _snapshot(observer, pids)
        children.watch(opts.seconds)
        s1 = _snapshot(observer, pids)
        phase.value = STOP
        observer.close()
        observer = None
        trainers = [children.expect(f"trainer{i}", "done", STOP_TIMEOUT) for i in range(cell.trainers)]
        shards = [children.expect(f"ps{s}", "done", STOP_TIMEOUT) for s in range(cell.shards)]
        feeder = children.expect("feeder", "done", STOP_TIMEOUT) if cell.with_queue else None
        if cell.with_queue:
            children.send("host", "stop")
            children.expect("host", "done", STOP_TIMEOUT)
        result = _result(cell, s0, s1, trainers, shards, feeder, pids)
        ok = True
        return result
    finally:
        if observer is not None:
            observer.close()
        phase.value = ABORT if not ok else max(phase.value, STOP)
        if not ok:
            for role in children.procs:
                if role == "host":
                    with contextlib.suppress(Exception):
                        children.send("host", "stop")
        children.stop(grace=5.0 if ok else 1.0)


def _result(cell: Cell, s0: dict[str, Any], s1: dict[str, Any], trainers: list[dict[str, Any]],
            shards: list[dict[str, Any]], feeder: dict[str, Any] | None, pids: dict[str, int]) -> dict[str, Any]:
    dt = s1["t"] - s0["t"]
    updates = _delta(s0, s1, "updates")
    if min(updates) <= 0:
        raise BenchmarkError(f"{cell.label}: no parameter update in the {dt:.2f} s window ({updates})")
    finals = [sh["stats"]["version"] for sh in shards]
    if len(set(finals)) != 1:
        raise BenchmarkError(f"{cell.label}: the shards ended at different versions {finals}; "
                             f"every push goes to every shard, so they must agree")
    for t in trainers:
        if not math.isfinite(t["loss"]):
            raise BenchmarkError(f"{cell.label}: a trainer's loss is {t['loss']} (the update diverged)")
    applied = _delta(s0, s1, "applied")[0]
    busy = _delta(s0, s1, "busy_seconds")
    nbytes_in = sum(_delta(s0, s1, "bytes_in"))
    nbytes_out = sum(_delta(s0, s1, "bytes_out"))
    steps_per_s = updates[0] / dt
    ideal = cell.ideal()
    # Where a trainer's step goes (means over the trainers' steps inside the window).
    wsteps = sum(t["window_steps"] for t in trainers)
    parts = {k: (1000.0 * sum(t["window"][k] for t in trainers) / wsteps if wsteps else None)
             for k in ("input", "grad", "sleep", "push", "pull")}
    cpu = {}
    for role in pids:
        a, b = s0["cpu"].get(role), s1["cpu"].get(role)
        cpu[role] = None if a is None or b is None else (b - a) / dt
    m0, m1 = s0["machine"], s1["machine"]
    machine_busy = None if m0 is None or m1 is None or m1[1] == m0[1] else (m1[0] - m0[0]) / (m1[1] - m0[1])
    cpus = os.cpu_count() or 1
    ours = [c for c in cpu.values() if c is not None]
    others = None if machine_busy is None or not ours else max(0.0, machine_busy * cpus - sum(ours))
    ps_cpu = [cpu.get(f"ps{s}") for s in range(cell.shards)]
    trainer_cpu = [cpu.get(f"trainer{i}") for i in range(cell.trainers)]
    return {
        **asdict(cell),
        "elapsed": dt,
        "updates": updates[0],
        "updates_per_shard": updates,
        "steps_per_s": steps_per_s,
        "samples_per_s": applied * cell.batch_size / dt,
        "gradients_per_s": applied / dt,
        "ideal": ideal,
        "ratio": None if ideal is None else steps_per_s / ideal,
        "ps_ms_per_update": 1000.0 * max(b / u for b, u in zip(busy, updates)),
        "ps_ms_per_update_per_shard": [1000.0 * b / u for b, u in zip(busy, updates)],
        # CPU time of the PS processes (all shards, from /proc) per update: includes the poll loop
        "ps_cpu_ms_per_update": (None if any(c is None for c in ps_cpu)
                                 else 1000.0 * sum(ps_cpu) * dt / updates[0]),
        "bytes_per_step": (nbytes_in + nbytes_out) / updates[0],
        "bytes_in_per_step": nbytes_in / updates[0],
        "bytes_out_per_step": nbytes_out / updates[0],
        "dropped_late": _delta(s0, s1, "dropped_late")[0],
        "dropped_stale": _delta(s0, s1, "dropped_stale")[0],
        "staleness": _hist_delta(s0["stats"][0]["staleness"], s1["stats"][0]["staleness"]),
        "trainer_ms": parts,
        "trainer_step_ms": (sum(v for v in parts.values() if v is not None) if wsteps else None),
        "trainer_window_steps": [t["window_steps"] for t in trainers],
        "ps_cpu": ps_cpu,
        "trainer_cpu": trainer_cpu,
        "machine_busy": machine_busy,
        "other_cpu": others,
        "stats_rtt_ms": 1000.0 * max(s0["rtt"], s1["rtt"]),
        "final_version": finals[0],
        "final_loss": [t["loss"] for t in trainers],
        "trainer_steps": [t["steps"] for t in trainers],
        "dropped_pushes": sum(t["dropped"] for t in trainers),
        "feeder_batches": None if feeder is None else feeder["batches"],
        "param_values": sum(sh["values"] for sh in shards),
        "pids": sorted(pids.values()),
    }


# ---------------------------------------------------------------------------
# The run as a whole


def _cells(opts: Options) -> Iterator[Cell]:
    for mode in opts.modes:
        for n in opts.trainers:
            for wd in opts.wire_dtypes:
                yield Cell(mode, n, wd, opts.compute_ms, opts.shards, opts.batch_size, opts.with_queue)


def check_options(opts: Options) -> None:
    """Raise ValueError for settings that cannot be measured."""
    for m in opts.modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for w in opts.wire_dtypes:
        if w not in WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {w!r}; choose from {', '.join(WIRE_DTYPES)}")
    if not opts.trainers or any(n < 1 for n in opts.trainers):
        raise ValueError(f"trainer counts must be >= 1, got {list(opts.trainers)}")
    if opts.shards < 1:
        raise ValueError(f"shards must be >= 1, got {opts.shards}")
    if len(opts.layers) < 2 or any(n < 1 for n in opts.layers):
        raise ValueError(f"layers must be at least two positive sizes, got {list(opts.layers)}")
    if opts.shards > 2 * (len(opts.layers) - 1):
        raise ValueError(f"{opts.shards} shards for {2 * (len(opts.layers) - 1)} parameter arrays: "
                         f"some shard would hold nothing")
    if opts.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {opts.batch_size}")
    if opts.compute_ms < 0:
        raise ValueError(f"compute_ms must be >= 0, got {opts.compute_ms}")
    if opts.seconds <= 0 or opts.warmup < 0:
        raise ValueError(f"seconds must be > 0 and warmup >= 0, got {opts.seconds} and {opts.warmup}")
    if opts.repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {opts.repeat}")
    if opts.transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {opts.transport!r}; choose from {', '.join(TRANSPORTS)}")


def evaluate(results: list[dict[str, Any]], compute_ms: float) -> list[dict[str, Any]]:
    """One entry per target and wire dtype measured: PASS, FAIL or SKIP (not measured / no simulated compute)."""
    out = []
    wires = list(dict.fromkeys(r["wire_dtype"] for r in results)) or ["float32"]
    for t in TARGETS:
        for wd in wires:
            entry = {**asdict(t), "wire_dtype": wd, "label": f"{t.mode} with {t.trainers} trainers, {wd} on the wire"}
            r = next((r for r in results if (r["mode"], r["trainers"], r["wire_dtype"]) == (t.mode, t.trainers, wd)),
                     None)
            if r is None or r["ratio"] is None:
                why = "needs --compute-ms > 0" if compute_ms <= 0 else "not measured in this run"
                entry.update(status="SKIP", measured=None, reason=why)
            else:
                entry.update(status="PASS" if r["ratio"] >= t.ratio else "FAIL", measured=r["ratio"],
                             steps_per_s=r["steps_per_s"], ideal=r["ideal"])
            out.append(entry)
    return out


def run(opts: Options, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every cell; return a JSON-ready report (machine, date, settings, results, targets).

    Raises
    ------
    BenchmarkError
        If a child process failed or hung or the counts do not add up; every
        child has been stopped by then.
    ValueError
        For settings that cannot be measured.
    """
    check_options(opts)
    machine = machine_info()
    tmpdir = tempfile.mkdtemp(prefix="qptb-")  # short: ipc paths are limited to 107 bytes
    try:
        results = median_rounds(list(_cells(opts)), opts.repeat,
                                lambda cell, index: _run_cell(cell, opts, tmpdir, index), "steps_per_s", progress)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    machine["loadavg_after"] = list(os.getloadavg())
    settings = asdict(opts)
    settings.update(lr=LR, optimizer="sgd", batches_per_trainer=N_BATCHES)
    return {
        "machine": machine,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "results": results,
        "targets": evaluate(results, opts.compute_ms),
    }


# ---------------------------------------------------------------------------
# Reporting


def format_table(report: dict[str, Any]) -> str:
    """The main table, the trainer-step breakdown, and one PASS/FAIL/SKIP line per target."""
    rs = report["results"]
    head = (f"{'mode':<5}  {'trainers':>8}  {'compute_ms':>10}  {'wire':<8}  {'steps/s':>8}  {'samples/s':>9}  "
            f"{'ideal':>6}  {'ratio':>5}  {'PS ms/upd':>9}  {'bytes/step':>10}")
    lines = [head, "-" * len(head)]
    for r in rs:
        lines.append(
            f"{r['mode']:<5}  {r['trainers']:>8}  {r['compute_ms']:>10g}  {r['wire_dtype']:<8}  "
            f"{r['steps_per_s']:>8,.1f}  {r['samples_per_s']:>9,.0f}  {or_dash(r['ideal'], '>6.0f')}  "
            f"{or_dash(r['ratio'], '>5.3f')}  {r['ps_ms_per_update']:>9.3f}  {r['bytes_per_step']:>10,.0f}")
    lines.append("")
    head2 = (f"{'mode':<5}  {'trainers':>8}  {'wire':<8}  {'step ms':>7}  {'input':>6}  {'grad':>6}  {'sleep':>6}  "
             f"{'push':>6}  {'pull':>6}  {'PS cpu':>6}  {'PS cpu ms/upd':>13}  {'trainers cpu':>12}  {'machine busy':>12}  "
             f"{'others':>6}")
    title = ("Where one trainer step goes (ms, mean over trainers; pull includes the sync barrier) "
             "and CPU use in the window\n(CPU in % of one core; machine busy in % of all cores; others = "
             "processes not of this cell)")
    lines += [title, head2, "-" * len(head2)]
    for r in rs:
        p = r["trainer_ms"]
        ps_cpu = sum(c for c in r["ps_cpu"] if c is not None) if any(c is not None for c in r["ps_cpu"]) else None
        tr_cpu = (sum(c for c in r["trainer_cpu"] if c is not None)
                  if any(c is not None for c in r["trainer_cpu"]) else None)
        lines.append(
            f"{r['mode']:<5}  {r['trainers']:>8}  {r['wire_dtype']:<8}  {or_dash(r['trainer_step_ms'], '>7.3f')}  "
            f"{or_dash(p['input'], '>6.3f')}  {or_dash(p['grad'], '>6.3f')}  {or_dash(p['sleep'], '>6.3f')}  "
            f"{or_dash(p['push'], '>6.3f')}  {or_dash(p['pull'], '>6.3f')}"
            f"  {or_dash(None if ps_cpu is None else 100 * ps_cpu, '>5.0f')}%"
            f"  {or_dash(r.get('ps_cpu_ms_per_update'), '>13.3f')}"
            f"  {or_dash(None if tr_cpu is None else 100 * tr_cpu, '>11.0f')}%"
            f"  {or_dash(None if r['machine_busy'] is None else 100 * r['machine_busy'], '>11.0f')}%"
            f"  {or_dash(None if r['other_cpu'] is None else 100 * r['other_cpu'], '>5.0f')}%")
    lines.append("")
    lines.extend(format_targets(report))
    return "\n".join(lines)


def format_targets(report: dict[str, Any]) -> list[str]:
    lines = []
    for t in report["targets"]:
        goal = f"target >= {t['ratio']:g} of ideal"
        if t["status"] == "SKIP":
            lines.append(format_target(t, f"{t['reason']} ({goal})"))
        else:
            lines.append(format_target(t, f"{t['steps_per_s']:.1f} steps/s = {t['measured']:.3f} of "
                                          f"ideal {t['ideal']:g} ({goal})"))
    return lines


def header(report: dict[str, Any]) -> str:
    s = report["settings"]
    others = [r["other_cpu"] for r in report["results"] if r.get("other_cpu") is not None]
    busy = (max(others) if others else 0.0) > 0.25
    rounds = f", median of {s['repeat']} rounds" if s["repeat"] > 1 else ""
    warning = f"; WARNING: other processes used up to {100 * max(others):.0f}% of a core during a window" if busy else ""
    return (
        preamble("qpipe data-parallel training", report, load_note=warning)
        + f"MLP {s['layers']}, batch {s['batch_size']}, sgd lr {s['lr']}, {s['shards']} PS shard(s) over "
        f"{s['transport']}, {'batches through a qpipe queue' if s['with_queue'] else 'fixed synthetic batches'}; "
        f"{s['seconds']:g} s per cell after {s['warmup']:g} s of warm-up"
        f"{rounds}; one process per PS shard and trainer.\n"
        f"steps/s = PS updates/s (sync: one update averages all N replicas; async: one per gradient); "
        f"ideal = 1000/compute_ms (sync) or N x 1000/compute_ms (async).\n"
    )


def _progress_line(r: dict[str, Any]) -> None:
    ratio = "" if r["ratio"] is None else f", {r['ratio']:.3f} of ideal"
    print(f"  {r['mode']:<5} {r['trainers']}T {r['wire_dtype']:<8} {r['compute_ms']:g} ms: "
          f"{r['steps_per_s']:>8,.1f} steps/s, {r['samples_per_s']:>9,.0f} samples/s{ratio}; "
          f"PS {r['ps_ms_per_update']:.3f} ms/update, {r['bytes_per_step']:,.0f} B/step",
          file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/training.py",
        description="Data-parallel training throughput through qpipe parameter servers: steps/s, samples/s, "
        "PS time and bytes per step for 1, 2 and 4 trainers, sync and async.")
    p.add_argument("--compute-ms", type=float, default=0.0,
                   help="simulated compute per trainer step, in ms (default 0; the acceptance run uses 20)")
    p.add_argument("--trainers", type=csv_list(int), default=DEFAULT_TRAINERS, help="trainer counts (default 1,2,4)")
    p.add_argument("--modes", type=csv_list(choice(MODES)), default=MODES, help="sync,async (default both)")
    p.add_argument("--wire", type=csv_list(choice(WIRE_DTYPES)), default=DEFAULT_WIRES,
                   help="wire dtypes (default float32,float16; bfloat16 also works)")
    p.add_argument("--shards", type=int, default=1, help="PS shard processes (default 1)")
    p.add_argument("--layers", type=csv_list(int), default=DEFAULT_LAYERS, help="MLP sizes (default 64,128,10)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per trainer step (default 32)")
    p.add_argument("--seconds", type=float, help="measured seconds per cell (default 3, --quick 0.5)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per cell (default 1, --quick 0.2)")
    p.add_argument("--transport", type=choice(TRANSPORTS), default="tcp",
                   help="tcp (127.0.0.1, default) or ipc (temporary directory)")
    p.add_argument("--with-queue", action="store_true",
                   help="feed the trainers batches through a qpipe queue host (a feeder process enqueues)")
    p.add_argument("--repeat", type=int, default=1, help="rounds; each cell reports its median (default 1)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 0.5 s cells")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if an acceptance target fails")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; 0 on success, 1 with ``--strict`` if a target failed, 2 if the benchmark failed."""
    args = _parser().parse_args(argv)
    opts = Options(
        modes=tuple(args.modes), trainers=tuple(args.trainers), wire_dtypes=tuple(args.wire),
        compute_ms=args.compute_ms, shards=args.shards, layers=tuple(args.layers), batch_size=args.batch_size,
        seconds=args.seconds if args.seconds is not None else (0.5 if args.quick else 3.0),
        warmup=args.warmup if args.warmup is not None else (0.2 if args.quick else 1.0),
        transport=args.transport, with_queue=args.with_queue, repeat=args.repeat)
    try:
        check_options(opts)
    except ValueError as e:
        _parser().error(str(e))
    return run_main("bench/training.py", lambda: run(opts, _progress_line),
                    lambda report: header(report) + "\n" + format_table(report),
                    command=" ".join(["python", "bench/training.py", *(sys.argv[1:] if argv is None else argv)]),
                    json_path=args.json, strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
