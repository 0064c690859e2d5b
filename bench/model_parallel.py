"""Model parallelism: time and bytes per training step, unsliced against three ways of slicing.

Every sliced cell runs the real node code (``nodes.model_slice.run_slice`` /
``run_driver`` around the programs of ``nodes/slicing.py``) in **separate
processes** started with ``spawn``: one driver and K slice processes, each
with one BLAS/OpenMP thread, talking through one qpipe queue host
(``qpipe.QueueServer`` on ``tcp://127.0.0.1:0``, running in a thread of this
parent process, as ``qpipe run`` runs a queue-host process). The driver feeds
``--warmup + --steps`` synthetic batches (fixed seed) of ``--batch`` rows.

Cells (``--layers`` default ``256-4096-4096-4096-10``, float32):

``unsliced 1t / 2t``     one process, no queues: ``nodes.model.loss_and_grads`` + SGD,
                         with 1 or 2 BLAS threads (the machine has 2 cores)
``vertical K=1``         the queue machinery with nothing split: one slice + driver
                         (what the driver hop and the queue host cost by themselves)
``vertical K``           each slice owns 1/K of the units of every layer
``pipeline K M``         K stages of whole layers, M micro-batches per step (GPipe)
``blocks K``             block-diagonal hidden layers (a *different*, sparser model)
``blocks K, 1 proc``     the same block model, all K slices run one after another in
                         one process (``nodes.slicing.simulate``): how much of the
                         block model's speed is less arithmetic rather than parallelism

Columns: ``ms/step`` is the median over the measured steps of the time between
two consecutive loss values at the driver (with ``--repeat``, the fastest round:
other work on a shared machine only ever slows a round down); ``speed-up`` is unsliced 1t divided
by it; ``MB/step`` is every message's bytes counted once (items' header and
payload, as the nodes report in ``summary.json``: ``total_bytes_per_step``);
``slice MB/step`` the most any one slice sends plus receives; ``wait`` the
slices' mean share of training time spent inside queue calls; ``GFLOP/step``
the arithmetic of one step (multiply-adds x 2, forward and backward).

Usage::

    python bench/model_parallel.py                    # the full table (~3 min on 2 cores)
    python bench/model_parallel.py --repeat 3         # best of 3 interleaved rounds
    python bench/model_parallel.py --quick            # a smaller network, a smoke run
    python bench/model_parallel.py --json out.json

Loopback only. Every child is stopped by its PID when a cell ends (also on error
or interrupt) and asks the kernel to kill it should the parent die.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qpipe.bench import blas_threads, die_with_parent, stop_processes

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_CTX = multiprocessing.get_context("spawn")
WAIT = 120.0  # bound on one cell


def _batches(layers: list[int], batch: int, n: int, dtype: str) -> list[tuple[Any, Any]]:
    import numpy as np

    rng = np.random.default_rng(1)
    return [(rng.standard_normal((batch, layers[0])).astype(dtype), rng.integers(0, layers[-1], batch))
            for _ in range(n)]


def _send(conn: Any, value: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(value).encode())  # NOTE: JSON, never pickle, even between local processes


# ---------------------------------------------------------------------------
# Child processes


def _child_endpoint(parent: int, conn: Any, address: str, cfg_kw: dict[str, Any], me: int, args: dict[str, Any]) -> None:
    die_with_parent(parent)
    import qpipe
    from nodes import slicing
    from nodes.model_slice import Link, run_driver, run_slice

    cfg = slicing.SliceConfig(**cfg_kw)
    k, dtype = cfg.slices, args["dtype"]
    try:
        with qpipe.connect(address, timeout=WAIT) as client:
            qs = {e: client.fifo_queue(f"to-{e}", capacity=64, dtypes=["int64", dtype]) for e in range(k + 1)}
            link = Link(me, qs[me], {e: q for e, q in qs.items() if e != me}, dtype)
            if me < k:
                s = run_slice(cfg, me, link, seed=0, dtype=dtype)
                _send(conn, {"ok": True, "stats": s.to_array().tolist()})
                return
            data = _batches(list(cfg.layers), args["batch"], args["warmup"] + args["steps"], dtype)
            marks: list[float] = []

            def on_note(note: Any) -> None:
                if note.what == "loss":
                    marks.append(time.perf_counter())

            t0 = time.perf_counter()
            _, stats = run_driver(cfg, link, data, on_note=on_note)
            times = [b - a for a, b in zip([t0, *marks], marks)][args["warmup"]:]
            _send(conn, {"ok": True, "times": times, "stats": {str(e): s.to_array().tolist() for e, s in stats.items()}})
    except Exception as e:  # reported by the parent
        _send(conn, {"ok": False, "error": f"{type(e).__name__}: {e}"})


def _child_local(parent: int, conn: Any, cfg_kw: dict[str, Any] | None, args: dict[str, Any]) -> None:
    """Unsliced (cfg_kw None) or the block model simulated in one process."""
    die_with_parent(parent)
    import numpy as np

    from nodes import model, slicing
    from qpipe.ps import Optimizer

    try:
        layers, dtype = args["layers"], args["dtype"]
        data = _batches(layers, args["batch"], args["warmup"] + args["steps"], dtype)
        times = []
        if cfg_kw is None:
            params = model.init_params(layers, 0, dtype)
            opt = Optimizer("sgd", lr=0.01)
            for x, y in data:
                t = time.perf_counter()
                _, grads = model.loss_and_grads(params, x, y, np)
                opt.apply(params, grads)
                times.append(time.perf_counter() - t)
        else:
            cfg = slicing.SliceConfig(**cfg_kw)
            p0 = slicing.init_params(cfg, 0, dtype)
            marks: list[float] = []
            t0 = time.perf_counter()
            # NOTE: simulate() runs every program in turn in this process; time the loss notes.
            programs = {j: slicing.slice_program(cfg, j, slicing.split_params(cfg, p0, j)) for j in range(cfg.slices)}
            del p0
            programs[cfg.slices] = _timed(slicing.driver_program(cfg, data), marks)
            slicing.run_programs(programs)
            times = [b - a for a, b in zip([t0, *marks], marks)]
        _send(conn, {"ok": True, "times": times[args["warmup"]:]})
    except Exception as e:  # reported by the parent
        _send(conn, {"ok": False, "error": f"{type(e).__name__}: {e}"})


def _timed(program: Any, marks: list[float]) -> Any:
    """Pass a program's operations through, noting the time of each loss note."""
    value = None
    while True:
        try:
            op = program.send(value)
        except StopIteration as stop:
            return stop.value
        if getattr(op, "what", None) == "loss":
            marks.append(time.perf_counter())
        value = yield op


# ---------------------------------------------------------------------------
# Cells


class _Children:
    """Started child processes; :meth:`stop` joins each, then terminates or kills it by its PID."""

    def __init__(self) -> None:
        self.procs: list[Any] = []

    def start(self, target: Any, *args: Any) -> Any:
        parent_conn, child_conn = _CTX.Pipe()
        p = _CTX.Process(target=target, args=(os.getpid(), child_conn, *args), daemon=True)
        p.start()
        child_conn.close()
        self.procs.append(p)
        return parent_conn

    def stop(self) -> None:
        stop_processes(self.procs, grace=5.0)
        self.procs = []


def _recv(conn: Any, what: str) -> dict[str, Any]:
    if not conn.poll(WAIT):
        raise TimeoutError(f"{what}: no answer within {WAIT:g} s")
    msg = json.loads(conn.recv_bytes())
    if msg.get("ok") is False:
        raise RuntimeError(f"{what} failed: {msg['error']}")
    return msg


def flops_per_step(cfg_kw: dict[str, Any] | None, layers: list[int], batch: int) -> float:
    """Multiply-adds x 2 of one step (forward, and backward's two products per layer)."""
    from nodes import slicing

    if cfg_kw and cfg_kw["scheme"] == "blocks":
        masks = slicing.block_mask(layers, cfg_kw["slices"])
        weights = sum(float(m.sum()) for m in masks.values())
    else:
        weights = sum(float(a * b) for a, b in itertools.pairwise(layers))
    return 2 * 3 * batch * weights


def run_cell(name: str, kind: str, cfg_kw: dict[str, Any] | None, args: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    import qpipe
    from nodes.model_slice import LinkStats

    kids = _Children()
    row: dict[str, Any] = {"cell": name, "gflop": flops_per_step(cfg_kw, args["layers"], args["batch"]) / 1e9}
    try:
        if kind == "local":
            with blas_threads(args.get("threads", 1), THREAD_VARS):
                conn = kids.start(_child_local, cfg_kw, args)
            msg = _recv(conn, name)
            row.update(ms=1e3 * statistics.median(msg["times"]), total_mb=0.0, slice_mb=0.0, wait=None)
            return row
        with qpipe.QueueServer("tcp://127.0.0.1:0") as server:
            k = cfg_kw["slices"]
            with blas_threads(1, THREAD_VARS):
                conns = [kids.start(_child_endpoint, server.address, cfg_kw, e, args) for e in range(k + 1)]
            # NOTE: the first (warm-up) step also waits for the slices to build their parameters.
            done = _recv(conns[k], f"{name} driver")
            for j in range(k):
                _recv(conns[j], f"{name} slice {j}")
        stats = {int(e): LinkStats.from_array(np.array(v)) for e, v in done["stats"].items()}
        slices = [stats[j] for j in range(k)]
        row.update(
            ms=1e3 * statistics.median(done["times"]),
            total_mb=sum(s.per_step(s.bytes_sent) for s in stats.values()) / 1e6,
            slice_mb=max(s.per_step(s.bytes_sent + s.bytes_received) for s in slices) / 1e6,
            wait=sum(s.wait_fraction for s in slices) / k,
        )
        return row
    finally:
        kids.stop()


def cells(args: dict[str, Any], ks: list[int]) -> list[tuple[str, str, dict[str, Any] | None, dict[str, Any]]]:
    layers = args["layers"]
    out: list[tuple[str, str, dict[str, Any] | None, dict[str, Any]]] = [
        ("unsliced 1t", "local", None, args),
        ("unsliced 2t", "local", None, {**args, "threads": 2}),
        ("vertical K=1", "queues", {"scheme": "vertical", "layers": layers, "slices": 1, "lr": 0.01}, args),
    ]
    for k in ks:
        out.append((f"vertical K={k}", "queues", {"scheme": "vertical", "layers": layers, "slices": k, "lr": 0.01}, args))
    for k in ks:
        for m in args["micro_batches"]:
            out.append((f"pipeline K={k} M={m}", "queues",
                        {"scheme": "pipeline", "layers": layers, "slices": k, "lr": 0.01, "micro_batches": m}, args))
    for k in ks:
        out.append((f"blocks K={k}", "queues", {"scheme": "blocks", "layers": layers, "slices": k, "lr": 0.01}, args))
    for k in ks:
        out.append((f"blocks K={k}, 1 proc", "local", {"scheme": "blocks", "layers": layers, "slices": k, "lr": 0.01}, args))
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    base = next((r["ms"] for r in rows if r["cell"] == "unsliced 1t"), None)
    head = f"{'cell':<22} {'ms/step':>8} {'speed-up':>8} {'MB/step':>8} {'slice MB/step':>13} {'wait':>6} {'GFLOP/step':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        wait = "-" if r["wait"] is None else f"{100 * r['wait']:.0f}%"
        speed = f"{base / r['ms']:.2f}x" if base else "-"
        lines.append(f"{r['cell']:<22} {r['ms']:>8.1f} {speed:>8} {r['total_mb']:>8.2f} {r['slice_mb']:>13.2f} "
                     f"{wait:>6} {r['gflop']:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="256-4096-4096-4096-10", help="layer sizes, e.g. 256-4096-4096-4096-10")
    ap.add_argument("--batch", type=int, default=64, help="rows per step (default 64)")
    ap.add_argument("--micro-batches", default="2,4", help="pipeline micro-batches per step, one cell each (default 2,4)")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per cell (default 6)")
    ap.add_argument("--warmup", type=int, default=2, help="steps before measuring (default 2)")
    ap.add_argument("--slices", default="2,4", help="slice counts (default 2,4)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all cells; each cell reports its fastest round")
    ap.add_argument("--only", default="", help="run only cells whose name contains this text")
    ap.add_argument("--quick", action="store_true", help="a small network and 3 steps (a smoke run)")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args(argv)
    layers = [int(v) for v in (("64-256-256-256-10" if a.quick else a.layers).split("-"))]
    args = {"layers": layers, "batch": a.batch, "micro_batches": [int(v) for v in a.micro_batches.split(",")], "steps": 3 if a.quick else a.steps,
            "warmup": 1 if a.quick else a.warmup, "dtype": a.dtype}
    ks = [int(v) for v in a.slices.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model parallelism: layers {layers}, batch {a.batch}, {a.dtype}, {args['steps']} measured steps "
          f"after {args['warmup']}; {os.cpu_count()} cores, load average {load:.2f}", flush=True)
    todo = [c for c in cells(args, ks) if not a.only or a.only in c[0]]
    rounds: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in todo}
    for r in range(a.repeat):
        # NOTE: rounds interleave the cells, so a burst of load from elsewhere hits one round of each.
        for name, kind, cfg_kw, cell_args in todo:
            t = time.monotonic()
            row = run_cell(name, kind, cfg_kw, cell_args)
            rounds[name].append(row)
            print(f"  round {r + 1}: {name}: {row['ms']:.1f} ms/step ({time.monotonic() - t:.1f} s, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
    rows = []
    for name, rs in rounds.items():
        row = min(rs, key=lambda x: x["ms"])  # NOTE: on a shared machine the fastest round has the least noise
        rows.append({**row, "rounds_ms": [round(x["ms"], 1) for x in rs]})
    print()
    print(format_table(rows))
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.2f} -> {load_end:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"layers": layers, "batch": a.batch, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
