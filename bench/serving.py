"""Replicated serving throughput: queries/s with 1, 2 and 4 predictor replicas sharing one request queue.

Every cell starts, as separate processes, exactly what ``qpipe run`` would for
a serving topology (a generated copy of ``topologies/serving.toml``)::

    queue host (qpipe node FILE qh)
        requests  <-- enqueue_many (id, reply_to, x) --  load generator (this process,
        replies-*  -- (id, probs) -->                     qpipe.serving.ServingClient)
    R predictor replicas (qpipe node FILE predictor --replica i), dequeue_up_to(1)
        from "requests", sleep delay_ms (simulated compute), answer into reply_to

The model is trained once, before the cells, and loaded by every replica
(``params.model``). A cell waits until all R replicas wait on the request queue,
checks correctness (every test row once through the replicas, compared with a
forward pass computed here: max |difference| <= 1e-5), runs a warm-up, then a
measured closed-loop window: ``concurrency`` queries always in flight (default
16, so 4 replicas have 4 queued each), the next sent as soon as one is
answered. ``queries/s`` counts the answers in the window over its length. Then
the request queue is closed, the replicas drain it and exit, and their
``served`` counts show how the queue balanced the load. Any timed-out query,
any answer for an unknown or expired id, a wrong answer, or a replica that
fails raises :class:`BenchmarkError`: the benchmark fails loudly rather than
report a rate.

Columns: ``ideal`` = R x 1000 / delay_ms (every replica busy all the time);
``ratio`` = queries/s over ideal; ``speed-up`` = queries/s over the 1-replica
cell's; ``served`` = requests per replica over the whole cell (check, warm-up
and window); ``busy`` = CPU use of the whole machine in the window.

Acceptance (PASS/FAIL, in one run): 4 replicas with 20 ms of simulated compute
reach at least 3.2x the queries/s of 1 replica. Sleep-based compute runs in
parallel even on 2 cores; what is left for the CPUs is the queue traffic
(4 queue operations per query) and the forward passes.

The ensemble aggregator's added latency per request is measured too (see
:func:`aggregator_latency`): this process plays the feeder and 3 members
around a real aggregator process and compares the time from the last
member's answer to the aggregator's decision with one direct queue hop.

Usage::

    python bench/serving.py                      # acceptance run: 1, 2, 4 replicas, 20 ms (~1 min)
    python bench/serving.py --quick              # smoke run
    python bench/serving.py --replicas 1,4 --delay-ms 5 --concurrency 32 --seconds 10 --json out.json

Loopback only (``tcp://127.0.0.1``, port 0). Every child is stopped by its PID
when a cell ends, also on error or interrupt, and asks the kernel to kill it
should this process die (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import qpipe
except ImportError:  # run from a checkout without installing qpipe
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import qpipe

import numpy as np
import zmq

from nodes import model
from qpipe.bench import BenchmarkError, format_target, machine_cpu, or_dash, preamble, run_main
from qpipe.launcher import child_env
from qpipe.runtime import READY_PREFIX, RESULT_PREFIX
from qpipe.serving import LoadStats, ServingClient, read_csv_inputs
from qpipe.topology import load as load_topology

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "topologies" / "data" / "digits"
DEFAULT_REPLICAS = (1, 2, 4)
DEFAULT_DELAY_MS = 20.0
DEFAULT_CONCURRENCY = 16
TARGET_REPLICAS, TARGET_SPEEDUP = 4, 3.2
STARTUP_TIMEOUT = 60.0  # seconds for the queue host and the replicas to come up
STOP_TIMEOUT = 20.0  # seconds for the replicas to drain and exit once the request queue is closed
QUERY_TIMEOUT = 30.0  # seconds; no query of a healthy cell comes near it
CHECK_ATOL = 1e-5


@dataclass(frozen=True)
class Options:
    replicas: tuple[int, ...] = DEFAULT_REPLICAS
    delay_ms: float = DEFAULT_DELAY_MS
    concurrency: int = DEFAULT_CONCURRENCY
    batch_size: int = 1
    seconds: float = 5.0
    warmup: float = 1.0
    aggregator_requests: int = 300  # 0: do not measure the aggregator


# ---------------------------------------------------------------------------
# Model, topology, processes


def train_model(directory: Path) -> tuple[dict[str, np.ndarray], float]:
    """Train the digits MLP once (a few epochs; a second or so) and save it for the replicas."""
    from nodes.solo_trainer import train_from_table

    table = {
        "train": str(DIGITS / "train-*.csv"),
        "components": [{"name": "image", "columns": "0:64", "dtype": "float32"},
                       {"name": "label", "columns": "label", "dtype": "int64"}],
        "hidden": [128], "epochs": 10, "lr": 0.3, "seed": 0, "input_scale": 0.0625,
    }
    params, meta = train_from_table(table, Path, np, "bench/serving.py")
    model.save_model(directory, params, meta)
    return params, float(meta["input_scale"])


def topology_text(replicas: int, delay_ms: float, batch_size: int, model_dir: Path) -> str:
    """A serving topology: one queue host on port 0, the request queue, R predictor replicas."""
    return f"""# Generated by bench/serving.py
[pipeline]
name = "bench-serving"
default_timeout = {QUERY_TIMEOUT}

[queue_hosts.qh]
port = 0

[queues.requests]
kind = "fifo"
capacity = 1024
dtypes = ["int64", "string", "float32"]
shapes = [[], [], [64]]
names = ["id", "reply_to", "image"]
external = true

[nodes.predictor]
kind = "predictor"
replicas = {replicas}
reads = ["requests"]
[nodes.predictor.params]
model = {json.dumps(str(model_dir))}
delay_ms = {float(delay_ms)}
batch_size = {batch_size}
"""


def _pdeathsig() -> None:  # in the child, between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Child:
    """One ``python -m qpipe.cli node ...`` process; its output lines are collected by a thread."""

    def __init__(self, label: str, args: list[str], env: dict[str, str]) -> None:
        self.label = label
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.address: str | None = None
        self.results: dict[str, Any] = {}
        self.popen = subprocess.Popen([sys.executable, "-m", "qpipe.cli", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, text=True,
                                      start_new_session=True, preexec_fn=_pdeathsig)
        self._pump = threading.Thread(target=self._read, name=f"pump {label}", daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.rstrip("\n")
            if line.startswith(READY_PREFIX):
                self.address = line[len(READY_PREFIX):].strip()
                self.ready.set()
            elif line.startswith(RESULT_PREFIX):
                with contextlib.suppress(ValueError):
                    self.results.update(json.loads(line[len(RESULT_PREFIX):]))
            else:
                self.lines.append(line)
        self.ready.set()

    def tail(self, n: int = 15) -> str:
        return "\n    ".join(self.lines[-n:]) or "(no output)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s, to this process by its PID; waits for it."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.popen.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5.0)
        self._pump.join(2.0)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


# ---------------------------------------------------------------------------
# One cell


def run_cell(opts: Options, replicas: int, workdir: Path, model_dir: Path, check: tuple[np.ndarray, np.ndarray],
             xs: np.ndarray) -> dict[str, Any]:
    """Start a queue host and ``replicas`` predictors, check answers, measure, stop; return the numbers."""
    topo_path = workdir / f"serving-{replicas}.toml"
    topo_path.write_text(topology_text(replicas, opts.delay_ms, opts.batch_size, model_dir))
    topo = load_topology(topo_path)
    children: list[_Child] = []
    try:
        host = _Child("qh", ["node", str(topo_path), "qh"], child_env(topo, None, 0, {}, workdir))
        children.append(host)
        if not host.ready.wait(STARTUP_TIMEOUT) or host.address is None:
            raise BenchmarkError(f"queue host did not come up within {STARTUP_TIMEOUT:g} s:\n    {host.tail()}")
        addresses = {"qh": host.address}
        preds = [_Child(f"predictor/{i}", ["node", str(topo_path), "predictor", "--replica", str(i)],
                        child_env(topo, "predictor", i, addresses, workdir)) for i in range(replicas)]
        children.extend(preds)
        with ServingClient(host.address, "requests", timeout=QUERY_TIMEOUT) as sc:
            try:
                sc.wait_ready(replicas, timeout=STARTUP_TIMEOUT)
            except qpipe.DeadlineExceededError as e:
                dead = [p for p in preds if p.popen.poll() is not None]
                more = f"; {dead[0].label} exited:\n    {dead[0].tail()}" if dead else ""
                raise BenchmarkError(f"{replicas} replica(s): {e}{more}") from None
            xc, want = check
            got = sc.predict_many(xc)
            err = float(np.abs(got - want).max())
            if err > CHECK_ATOL:
                raise BenchmarkError(f"{replicas} replica(s): answers differ from the local forward pass by "
                                     f"up to {err:.3g} (> {CHECK_ATOL:g})")
            sc.run_load(xs, concurrency=opts.concurrency, duration=opts.warmup)
            cpu0 = machine_cpu()
            stats = sc.run_load(xs, concurrency=opts.concurrency, duration=opts.seconds)
            cpu1 = machine_cpu()
            counters = sc.counters()
            _check_stats(replicas, stats, counters)
        with qpipe.connect(host.address, timeout=5.0) as c:
            c.queue("requests").close()  # as the last writer's end would: the replicas drain it and exit
        deadline = time.monotonic() + STOP_TIMEOUT
        for p in preds:
            try:
                rc = p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchmarkError(f"{p.label} did not exit within {STOP_TIMEOUT:g} s of the request queue "
                                     f"closing:\n    {p.tail()}") from None
            if rc != 0:
                raise BenchmarkError(f"{p.label} exited with status {rc}:\n    {p.tail()}")
            p._pump.join(2.0)
        served = [int(p.results.get("served", -1)) for p in preds]
        dropped = sum(int(p.results.get("dropped_answers", 0)) for p in preds)
        if dropped:
            raise BenchmarkError(f"{replicas} replica(s): {dropped} answers dropped by the replicas")
        if sum(served) != counters["sent"]:
            raise BenchmarkError(f"{replicas} replica(s): the replicas served {sum(served)} requests but the "
                                 f"client sent {counters['sent']}")
        busy = None
        if cpu0 and cpu1 and cpu1[1] > cpu0[1]:
            busy = (cpu1[0] - cpu0[0]) / (cpu1[1] - cpu0[1])
        ideal = replicas * 1000.0 / opts.delay_ms if opts.delay_ms > 0 else None
        return {
            "replicas": replicas, "delay_ms": opts.delay_ms, "concurrency": opts.concurrency,
            "batch_size": opts.batch_size, "queries_per_s": stats.queries_per_s, "ideal": ideal,
            "ratio": None if ideal is None else stats.queries_per_s / ideal,
            "p50_ms": stats.p50_ms, "p90_ms": stats.p90_ms, "p99_ms": stats.p99_ms, "max_ms": stats.max_ms,
            "answered": stats.answered, "seconds": stats.seconds, "served": served, "machine_busy": busy,
            "check_max_abs_diff": err, "check_rows": len(xc),
        }
    finally:
        for c in reversed(children):
            c.stop()


def _check_stats(replicas: int, stats: LoadStats, counters: dict[str, int]) -> None:
    bad = {k: counters[k] for k in ("timeouts", "errors", "late", "unknown") if counters[k]}
    if bad or stats.answered != stats.sent or counters["pending"]:
        raise BenchmarkError(f"{replicas} replica(s): queries not answered cleanly: {bad or ''} "
                             f"answered {stats.answered} of {stats.sent}, {counters['pending']} pending; "
                             f"first error: {stats.first_error}")


# ---------------------------------------------------------------------------
# The whole run


def run(opts: Options, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every cell; return the report (settings, machine, results, targets, aggregator)."""
    load0 = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="qpipe-bench-serving-"))
    try:
        params, scale = train_model(workdir / "model")
        xs, _, _ = read_csv_inputs(str(DIGITS / "test.csv"), 64)
        want = np.asarray(model.probabilities(params, xs * np.float32(scale), np), dtype=np.float32)
        results = []
        for r in opts.replicas:
            res = run_cell(opts, r, workdir, workdir / "model", (xs, want), xs)
            results.append(res)
            if progress:
                progress(res)
        if opts.aggregator_requests:
            agg = aggregator_latency(workdir, opts.aggregator_requests)
        else:
            agg = {"status": "not measured", "reason": "--aggregator-requests 0"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = next((r["queries_per_s"] for r in results if r["replicas"] == 1), None)
    for r in results:
        r["speedup"] = None if not base else r["queries_per_s"] / base
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "loadavg_before": load0,
                    "loadavg_after": os.getloadavg()},
        "settings": {"replicas": list(opts.replicas), "delay_ms": opts.delay_ms, "concurrency": opts.concurrency,
                     "batch_size": opts.batch_size, "seconds": opts.seconds, "warmup": opts.warmup},
        "results": results,
        "targets": targets(opts, results),
        "aggregator": agg,
    }


def targets(opts: Options, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The acceptance line: PASS/FAIL, or SKIP when the run did not measure it as specified."""
    label = f"{TARGET_REPLICAS} replicas vs 1 at 20 ms simulated compute"
    by = {r["replicas"]: r for r in results}
    if 1 not in by or TARGET_REPLICAS not in by:
        return [{"label": label, "status": "SKIP", "reason": "1 and 4 replicas not both measured"}]
    if opts.delay_ms != DEFAULT_DELAY_MS:
        return [{"label": label, "status": "SKIP", "reason": f"run with --delay-ms {opts.delay_ms:g}, not 20"}]
    s = by[TARGET_REPLICAS]["queries_per_s"] / by[1]["queries_per_s"]
    return [{"label": label, "status": "PASS" if s >= TARGET_SPEEDUP else "FAIL", "measured": s,
             "target": TARGET_SPEEDUP, "qps_1": by[1]["queries_per_s"],
             "qps_4": by[TARGET_REPLICAS]["queries_per_s"]}]


def aggregator_topology(members: int) -> str:
    """The aggregator alone: its labels and prediction queues are fed by this process, which plays the members."""
    preds = "".join(f"""
[queues.pred_m{i}]
kind = "fifo"
capacity = 64
dtypes = ["int64", "float32"]
shapes = [[], [10]]
names = ["id", "probs"]
external = true
""" for i in range(members))
    reads = ", ".join(['"labels"'] + [f'"pred_m{i}"' for i in range(members)])
    return f"""# Generated by bench/serving.py
[pipeline]
name = "bench-aggregator"
default_timeout = {QUERY_TIMEOUT}

[queue_hosts.qh]
port = 0

[queues.labels]
kind = "fifo"
capacity = 64
dtypes = ["int64", "int64"]
shapes = [[], []]
names = ["id", "label"]
external = true
{preds}
[queues.direct]
kind = "fifo"
capacity = 64
dtypes = ["int64", "float32"]
shapes = [[], [10]]
names = ["id", "probs"]
external = true

[queues.decisions]
kind = "fifo"
capacity = 64
dtypes = ["int64", "int64", "int32"]
shapes = [[], [], []]
names = ["id", "class", "n_members"]
external = true

[nodes.aggregator]
kind = "aggregator"
reads = [{reads}]
writes = ["decisions"]
[nodes.aggregator.params]
labels_queue = "labels"
timeout = 5.0
"""


def aggregator_latency(workdir: Path, requests: int, members: int = 3) -> dict[str, Any]:
    """The ensemble aggregator's added latency per request, one request at a time.

    This process plays the feeder and ``members`` members: for request i it
    enqueues ``(i, label)`` and the first ``members - 1`` answers, then times
    from just before the last member's answer is enqueued to the moment the
    aggregator's decision ``(i, class, n_members)`` is dequeued from its output
    queue. The baseline is the same pair of calls without an aggregator: one
    answer enqueued into a queue and dequeued from it (the path an answer takes
    from a member straight to its caller). Added latency = via aggregator minus
    direct (medians), with the two measured alternately. Every
    decision is checked: the right id, all members counted, the class of the
    mean probabilities.
    """
    if not (REPO / "nodes" / "aggregator.py").exists():
        return {"status": "not measured", "reason": "nodes/aggregator.py does not exist"}
    topo_path = workdir / "aggregator.toml"
    topo_path.write_text(aggregator_topology(members))
    topo = load_topology(topo_path)
    rng = np.random.default_rng(0)
    children: list[_Child] = []
    try:
        host = _Child("qh", ["node", str(topo_path), "qh"], child_env(topo, None, 0, {}, workdir))
        children.append(host)
        if not host.ready.wait(STARTUP_TIMEOUT) or host.address is None:
            raise BenchmarkError(f"queue host did not come up within {STARTUP_TIMEOUT:g} s:\n    {host.tail()}")
        agg = _Child("aggregator", ["node", str(topo_path), "aggregator"],
                     child_env(topo, "aggregator", 0, {"qh": host.address}, workdir))
        children.append(agg)
        with qpipe.connect(host.address, timeout=QUERY_TIMEOUT) as c:
            labels = c.queue("labels")
            preds = [c.queue(f"pred_m{i}") for i in range(members)]
            direct, decisions = c.queue("direct"), c.queue("decisions")
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while True:  # every reader thread of the aggregator waits on its queue
                st = c.stats()["queues"]
                if all(st[q]["waiting_dequeues"] >= 1 for q in ["labels", *(f"pred_m{i}" for i in range(members))]):
                    break
                if agg.popen.poll() is not None or time.monotonic() > deadline:
                    raise BenchmarkError(f"the aggregator did not start reading its queues:\n    {agg.tail()}")
                time.sleep(0.05)
            via, base = [], []
            warm = max(10, requests // 10)
            for i in range(warm + requests):
                probs = rng.dirichlet(np.ones(10), size=members).astype(np.float32)
                want = int(probs.astype(np.float64).mean(axis=0).argmax())
                labels.enqueue((i, want))
                for m in range(members - 1):
                    preds[m].enqueue((i, probs[m]))
                t0 = time.perf_counter()
                preds[-1].enqueue((i, probs[-1]))
                rid, cls, n = decisions.dequeue(timeout=10.0)
                t1 = time.perf_counter()
                if (int(rid), int(cls), int(n)) != (i, want, members):
                    raise BenchmarkError(f"aggregator: decision {(int(rid), int(cls), int(n))} for request {i}, "
                                         f"expected {(i, want, members)}")
                t2 = time.perf_counter()
                direct.enqueue((i, probs[-1]))
                rid2, _ = direct.dequeue(timeout=10.0)
                t3 = time.perf_counter()
                if int(rid2) != i:
                    raise BenchmarkError(f"direct queue returned id {int(rid2)} for {i}")
                if i >= warm:
                    via.append(t1 - t0)
                    base.append(t3 - t2)
            labels.close()
        try:
            rc = agg.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"the aggregator did not end within {STOP_TIMEOUT:g} s of its labels queue "
                                 f"closing:\n    {agg.tail()}") from None
        agg._pump.join(2.0)
        if rc != 0:
            raise BenchmarkError(f"the aggregator exited with status {rc}:\n    {agg.tail()}")
    finally:
        for ch in reversed(children):
            ch.stop()
    v, b = np.asarray(via) * 1e3, np.asarray(base) * 1e3
    r = agg.results
    return {
        "status": "measured", "members": members, "requests": requests,
        "via_p50_ms": float(np.median(v)), "via_p99_ms": float(np.percentile(v, 99)),
        "direct_p50_ms": float(np.median(b)), "direct_p99_ms": float(np.percentile(b, 99)),
        "added_p50_ms": float(np.median(v) - np.median(b)),
        "internal_p50_ms": r.get("latency_ms_p50"), "internal_p99_ms": r.get("latency_ms_p99"),
        "answered": r.get("answered"), "late": r.get("late_predictions"),
    }


# ---------------------------------------------------------------------------
# Output


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        *preamble("qpipe replicated serving", report).splitlines(),
        f"simulated compute {s['delay_ms']:g} ms per query, predictor batch_size {s['batch_size']}, "
        f"{s['concurrency']} queries in flight (closed loop), {s['seconds']:g} s per cell after {s['warmup']:g} s "
        f"of warm-up; one process per replica and for the queue host; tcp://127.0.0.1",
        "",
    ]
    head = (f"{'replicas':>8}  {'queries/s':>9}  {'ideal':>6}  {'ratio':>5}  {'speed-up':>8}  {'p50 ms':>7}  "
            f"{'p90 ms':>7}  {'p99 ms':>7}  {'max ms':>7}  {'busy':>5}  served per replica")
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        lines.append(
            f"{r['replicas']:>8}  {r['queries_per_s']:>9,.1f}  {or_dash(r['ideal'], '>6.0f')}  "
            f"{or_dash(r['ratio'], '>5.3f')}  {or_dash(r['speedup'], '>7.2f')}x  {r['p50_ms']:>7.2f}  "
            f"{r['p90_ms']:>7.2f}  {r['p99_ms']:>7.2f}  {r['max_ms']:>7.2f}  "
            f"{or_dash(None if r['machine_busy'] is None else 100 * r['machine_busy'], '>4.0f')}%  "
            f"{' '.join(str(n) for n in r['served'])}")
    lines.append("")
    lines.append("answers checked against a local forward pass on " + ", ".join(
        f"{r['check_rows']} rows (max |diff| {r['check_max_abs_diff']:.1e})" for r in report["results"][:1])
        + " in every cell; no query timed out, none answered late or to an unknown id")
    agg = report["aggregator"]
    if agg["status"] == "measured":
        lines += [
            "",
            f"ensemble aggregator ({agg['members']} members played by this process, {agg['requests']} requests one "
            f"at a time; latency from the last member's answer to the decision dequeued):",
            f"  via aggregator  p50 {agg['via_p50_ms']:.2f} ms  p99 {agg['via_p99_ms']:.2f} ms",
            f"  direct (1 hop)  p50 {agg['direct_p50_ms']:.2f} ms  p99 {agg['direct_p99_ms']:.2f} ms",
            f"  added           p50 {agg['added_p50_ms']:.2f} ms (difference of the medians; the p99s are noise "
            f"of a shared machine)",
            f"  the aggregator's own log, label seen -> decided: p50 {agg['internal_p50_ms']} ms, "
            f"p99 {agg['internal_p99_ms']} ms",
        ]
    else:
        lines.append(f"aggregator added latency: {agg['status']} ({agg['reason']})")
    lines.append("")
    for t in report["targets"]:
        if t["status"] == "SKIP":
            lines.append(format_target(t, t["reason"]))
        else:
            lines.append(format_target(t, f"{t['qps_4']:.1f} / {t['qps_1']:.1f} queries/s = "
                                          f"{t['measured']:.2f}x (target >= {t['target']:g}x)"))
    return "\n".join(lines)


def _progress(r: dict[str, Any]) -> None:
    print(f"  {r['replicas']} replica(s): {r['queries_per_s']:,.1f} queries/s, p50 {r['p50_ms']:.1f} ms, "
          f"p99 {r['p99_ms']:.1f} ms, served {r['served']}", file=sys.stderr, flush=True)


def _ints(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"replica counts must be integers >= 1, got {text!r}")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/serving.py",
        description="Replicated serving through one shared qpipe request queue: queries/s and latency "
                    "percentiles with 1, 2 and 4 predictor replicas and simulated compute per query.")
    p.add_argument("--replicas", type=_ints, default=DEFAULT_REPLICAS, help="replica counts (default 1,2,4)")
    p.add_argument("--delay-ms", type=float, default=DEFAULT_DELAY_MS,
                   help="simulated compute per query in ms (default 20, as the acceptance target)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="queries in flight (default 16)")
    p.add_argument("--batch-size", type=int, default=1, help="predictor batch_size (default 1)")
    p.add_argument("--seconds", type=float, help="measured seconds per cell (default 5, --quick 1)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per cell (default 1, --quick 0.3)")
    p.add_argument("--aggregator-requests", type=int,
                   help="requests for the aggregator latency measurement (default 300, --quick 50; 0 skips it)")
    p.add_argument("--quick", action="store_true", help="a smoke run: short cells")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if the acceptance target fails")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; 0 on success, 1 with ``--strict`` if the target failed, 2 if the benchmark failed."""
    args = _parser().parse_args(argv)
    if args.concurrency < 1 or args.batch_size < 1 or args.delay_ms < 0:
        _parser().error("--concurrency and --batch-size must be >= 1 and --delay-ms >= 0")
    opts = Options(replicas=args.replicas, delay_ms=args.delay_ms, concurrency=args.concurrency,
                   batch_size=args.batch_size,
                   seconds=args.seconds if args.seconds is not None else (1.0 if args.quick else 5.0),
                   warmup=args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0),
                   aggregator_requests=(args.aggregator_requests if args.aggregator_requests is not None
                                        else (50 if args.quick else 300)))
    return run_main("bench/serving.py", lambda: run(opts, _progress), format_report,
                    command=" ".join(["python", "bench/serving.py", *(sys.argv[1:] if argv is None else argv)]),
                    json_path=args.json, strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
