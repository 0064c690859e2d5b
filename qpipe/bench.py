"""Throughput of a qpipe queue host, measured against raw ZeroMQ PUSH/PULL.

Every cell of the benchmark runs the producer, the consumer and (for qpipe)
the queue host in separate processes, started with the ``spawn`` method::

    producer process --enqueue--> host process --dequeue--> consumer process   (qpipe)
    producer process --PUSH-------------------------------> consumer process   (raw)

Items are ``float32`` vectors (64 B, 4 KiB, 256 KiB and 4 MiB by default).
A cell runs for a fixed wall time after a warm-up; its rate counts the items
the *consumer* dequeued inside that window. Afterwards the producer stops and
closes the queue (raw: sends an empty end frame), the consumer drains what is
left, and the cell is checked: every item carries its sequence number in its
first element, the consumer checks that each number is the next one, the
first and last items are compared element by element with what was sent,
and the number of items enqueued must equal the number dequeued. Any
difference raises :class:`BenchmarkError`; a benchmark that loses items
fails loudly rather than reporting a rate.

Modes
-----
``single``
    One ``enqueue`` and one ``dequeue`` per item.
``batched``
    ``enqueue_many`` / ``dequeue_many`` with ``batch = max(1, min(1000,
    4 MiB // item size))`` items per message (see :func:`batch_for`).

The raw baseline sends one item per ZeroMQ message: a copying send below
pyzmq's copy threshold (64 KiB), a zero-copy send (with a ring of tracked
buffers, so that no buffer is rewritten while in flight) from there on. Its
high-water marks are set so that about as many items can be in flight as the
qpipe queue holds (see :func:`capacity_for`). The ratio printed for a cell is
qpipe items/s over raw *single-message* items/s for the same size and
transport, which is what the acceptance targets (:data:`TARGETS`) use.

Run it as ``qpipe bench`` or ``python bench/queue_throughput.py``; see
:func:`main` for the options and :func:`run` for the library entry point.

The last section of this module holds the harness that the other benchmarks in
``bench/`` share with this one: option parsers (:func:`choice`,
:func:`csv_list`), child processes stopped by their PID (:class:`Children`,
:func:`stop_processes`, :func:`die_with_parent`, :func:`blas_threads`), the
machine description and report preamble (:func:`machine_info`,
:func:`preamble`, :func:`format_target`), rounds with a median
(:func:`median_rounds`), and the command-line tail (:func:`run_main`: SIGTERM
as an interrupt, JSON, exit status).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import datetime
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing import connection as mp_connection
from typing import Any

import numpy as np
import zmq

import qpipe

__all__ = [
    "DEFAULT_SIZES",
    "MODES",
    "TARGETS",
    "THREAD_VARS",
    "TRANSPORTS",
    "BenchmarkError",
    "Cell",
    "Children",
    "Target",
    "batch_for",
    "blas_threads",
    "capacity_for",
    "choice",
    "csv_list",
    "die_with_parent",
    "format_target",
    "machine_cpu",
    "machine_info",
    "main",
    "median_rounds",
    "or_dash",
    "preamble",
    "queue_host_body",
    "run",
    "run_main",
    "sigterm_as_interrupt",
    "stop_processes",
]

KiB = 1 << 10
MiB = 1 << 20
DEFAULT_SIZES = (64, 4 * KiB, 256 * KiB, 4 * MiB)
QUICK_SIZES = (64, 256 * KiB)
MODES = ("single", "batched")
TRANSPORTS = ("ipc", "tcp")
MAX_BATCH = 1000
MESSAGE_BUDGET = 4 * MiB  # bytes of payload per batched message, at most (unless one item is larger)
QUEUE_BUDGET = 64 * MiB  # bytes of payload a queue (or the raw pipe) holds, at most
MAX_CAPACITY = 1000
MAX_MESSAGE_SIZE = 64 * MiB  # the host's limit; a batch is at most MESSAGE_BUDGET plus a header
OP_TIMEOUT = 30.0  # seconds; no single queue operation of a healthy run comes near it
STARTUP_TIMEOUT = 60.0  # seconds for a child process to start and report ready
MB = 1e6  # MB/s counts 10**6 bytes of item payload per second

_U32 = struct.Struct("<I")
_CTX = multiprocessing.get_context("spawn")


class BenchmarkError(RuntimeError):
    """Raised when a cell cannot be measured honestly, by this and every benchmark in ``bench/``.

    Examples: a child process died or reported an exception, an item was
    lost, duplicated or reordered, an item's data differs from what was sent,
    or a step did not finish within its bound.
    """


@dataclass(frozen=True)
class Cell:
    """One measurement: a system, a transport, an item size and a mode.

    Attributes
    ----------
    system : {"qpipe", "raw"}
        A qpipe queue host, or the raw PUSH/PULL baseline.
    transport : {"ipc", "tcp"}
        ``ipc://`` in a temporary directory, or ``tcp://127.0.0.1``.
    size : int
        Bytes of one item (a float32 vector of ``size // 4`` elements).
    mode : {"single", "batched"}
        One item per message, or ``batch`` items per message.
    batch : int
        Items per ``enqueue_many`` / ``dequeue_many`` (1 for ``single``).
    capacity : int
        Queue capacity in items (raw: the sum of send and receive high-water marks).
    """

    system: str
    transport: str
    size: int
    mode: str
    batch: int
    capacity: int

    @property
    def label(self) -> str:
        """A short name such as ``qpipe/ipc/4 MiB/batched``, for messages."""
        return f"{self.system}/{self.transport}/{format_size(self.size)}/{self.mode}"


@dataclass(frozen=True)
class Target:
    """An acceptance target: a qpipe cell's rate at least ``ratio`` times the raw baseline's.

    The baseline is raw PUSH/PULL with one item per message, same size and
    transport, measured in the same run.
    """

    size: int
    mode: str
    ratio: float
    unit: str  # "MB/s" or "items/s": for the message only, the ratio is the same
    transport: str = "ipc"

    @property
    def label(self) -> str:
        """A short name such as ``4 MiB single over ipc``."""
        return f"{format_size(self.size)} {self.mode} over {self.transport}"


TARGETS = (
    Target(4 * MiB, "single", 0.35, "MB/s"),
    Target(64, "batched", 3.0, "items/s"),
    Target(64, "single", 0.06, "items/s"),
)


@dataclass
class _Options:
    sizes: tuple[int, ...]
    transports: tuple[str, ...]
    modes: tuple[str, ...]
    seconds: float
    warmup: float
    repeat: int = 1


# ---------------------------------------------------------------------------
# Sizes, batches, payloads


def batch_for(size: int) -> int:
    """Items per batched message: 1000, or fewer so that a message stays within 4 MiB.

    >>> [batch_for(s) for s in (64, 4096, 262144, 4194304)]
    [1000, 1000, 16, 1]
    """
    return max(1, min(MAX_BATCH, MESSAGE_BUDGET // size))


def capacity_for(size: int, batch: int) -> int:
    """Queue capacity in items: room for two batches, else up to 1000 items or 64 MiB.

    >>> [capacity_for(s, 1) for s in (64, 4096, 262144, 4194304)]
    [1000, 1000, 256, 16]
    >>> capacity_for(64, 1000)
    2000
    """
    return max(2 * batch, min(MAX_CAPACITY, max(2, QUEUE_BUDGET // size)))


def format_size(size: int) -> str:
    """``64 B``, ``4 KiB``, ``256 KiB``, ``4 MiB``; other sizes in bytes."""
    for unit, scale in (("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def parse_size(text: str) -> int:
    """Parse ``64``, ``64B``, ``4K``, ``4KiB``, ``256KiB`` or ``4M`` / ``4MiB`` into bytes.

    Raises
    ------
    ValueError
        If the text is not a size, or the size is not a positive multiple of 4
        (items are float32 vectors).
    """
    t = text.strip().lower().replace(" ", "")
    scale = 1
    for suffix, s in (("mib", MiB), ("mb", MiB), ("m", MiB), ("kib", KiB), ("kb", KiB), ("k", KiB), ("b", 1)):
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], s
            break
    try:
        size = int(t) * scale
    except ValueError:
        raise ValueError(f"item size {text!r} is not a size; use e.g. 64, 4KiB, 256K or 4MiB") from None
    if size <= 0 or size % 4:
        raise ValueError(f"item size {text!r} is {size} bytes; it must be a positive multiple of 4 (float32 items)")
    return size


def _template(size: int) -> np.ndarray:
    # Element i holds float32(i), exact for i < 2**24; element 0 is overwritten
    # with the item's sequence number (as uint32 bits) before each send.
    return np.arange(size // 4, dtype=np.float32)


def _seq(buf: Any) -> int:
    return _U32.unpack_from(buf)[0]


def _intact(item: Any, seq: int, template: np.ndarray) -> bool:
    a = np.frombuffer(item, dtype=np.float32)
    return a.shape == template.shape and _seq(a) == seq and np.array_equal(a[1:], template[1:])


# ---------------------------------------------------------------------------
# Child processes (see Children below). Each one talks to the parent over one Pipe
# end: it sends ("ready", x), ("measured", x), ("done", x) or ("error", traceback text).


class _Window:
    """The consumer's clock: a warm-up, then a fixed measured window.

    ``tick(count)`` is called after every dequeue with the running item count;
    it returns True once, when the window closes.
    """

    def __init__(self, warmup: float, seconds: float) -> None:
        self.warmup, self.seconds = warmup, seconds
        self.warm_end = self.t0 = self.t1 = None
        self.n0 = self.n1 = 0

    def tick(self, count: int) -> bool:
        now = time.perf_counter()
        if self.warm_end is None:
            self.warm_end = now + self.warmup
        elif self.t0 is None:
            if now >= self.warm_end:
                self.t0, self.n0 = now, count
        elif self.t1 is None and now - self.t0 >= self.seconds:
            self.t1, self.n1 = now, count
            return True
        return False

    def report(self) -> dict[str, float]:
        return {"items": self.n1 - self.n0, "elapsed": self.t1 - self.t0}


def _sequence_error(label: str, got: int, want: int) -> BenchmarkError:
    return BenchmarkError(
        f"{label}: the consumer's item #{want} carries sequence number {got}: "
        f"items were lost, duplicated or reordered"
    )


def _check_sequence(label: str, xs: np.ndarray, n: int, ramp: np.ndarray, offsets: np.ndarray) -> int:
    """Check that the rows of ``xs`` carry sequence numbers n, n+1, ...; return the row count.

    ``ramp`` is ``arange(batch)`` and ``offsets`` scratch space of the same
    length, both uint32, so that the check allocates nothing.
    """
    seqs = xs[:, 0].view(np.uint32)
    k = len(seqs)
    np.subtract(seqs, ramp[:k], out=offsets[:k])  # all equal to n iff seqs == n, n+1, ...
    if not (offsets[:k] == n).all():
        bad = int(np.flatnonzero(offsets[:k] != n)[0])
        raise _sequence_error(label, int(seqs[bad]), n + bad)
    return k


def _qpipe_producer_body(conn: mp_connection.Connection, stop: Any) -> None:
    job = conn.recv()
    size, batch, mode = job["size"], job["batch"], job["mode"]
    template = _template(size)
    with qpipe.connect(job["address"]) as client:
        q = client.queue(job["queue"], timeout=OP_TIMEOUT)
        conn.send(("ready", None))
        seq = 0
        if mode == "single":
            item = template.copy()
            bits = item.view(np.uint32)
            # NOTE: rewriting the item in place is safe: enqueue returns only
            # after the host has received (and answered) the message.
            while not stop.value:
                bits[0] = seq
                q.enqueue(item, timeout=OP_TIMEOUT)
                seq += 1
        else:
            items = np.tile(template, (batch, 1))
            col = items.view(np.uint32)[:, 0]
            step = np.arange(batch, dtype=np.uint32)
            while not stop.value:
                np.add(step, seq, out=col)
                q.enqueue_many(items, timeout=OP_TIMEOUT)
                seq += batch
        q.close(timeout=OP_TIMEOUT)
    conn.send(("done", {"enqueued": seq}))


def _qpipe_consumer_body(conn: mp_connection.Connection) -> None:
    job = conn.recv()
    label, size, batch, mode = job["label"], job["size"], job["batch"], job["mode"]
    template = _template(size)
    window = _Window(job["warmup"], job["seconds"])
    first = last = None
    n = 0
    with qpipe.connect(job["address"]) as client:
        q = client.queue(job["queue"], timeout=OP_TIMEOUT)
        conn.send(("ready", None))
        if mode == "single":
            while True:
                try:
                    x = q.dequeue(timeout=OP_TIMEOUT)
                except qpipe.OutOfRangeError:
                    break
                s = _seq(x)
                if s != n:
                    raise _sequence_error(label, s, n)
                if n == 0:
                    first = x.copy()
                last = x
                n += 1
                if window.tick(n):
                    conn.send(("measured", window.report()))
        else:
            take = q.dequeue_many
            ramp = np.arange(batch, dtype=np.uint32)
            offsets = np.empty(batch, dtype=np.uint32)
            while True:
                try:
                    xs = take(batch, timeout=OP_TIMEOUT)
                except qpipe.OutOfRangeError:
                    if take == q.dequeue_up_to:
                        break
                    take = q.dequeue_up_to  # closed with < batch items left: take the rest
                    continue
                k = _check_sequence(label, xs, n, ramp, offsets)
                if n == 0:
                    first = xs[0].copy()
                last = xs[-1]
                n += k
                if window.tick(n):
                    conn.send(("measured", window.report()))
    conn.send(("done", _consumer_summary(n, first, last, template, window)))


def _consumer_summary(n: int, first: Any, last: Any, template: np.ndarray, window: _Window) -> dict[str, Any]:
    return {
        "dequeued": n,
        "first_intact": first is not None and _intact(first, 0, template),
        "last_intact": last is not None and _intact(last, n - 1, template),
        "window_closed": window.t1 is not None,
    }


def _raw_producer_body(conn: mp_connection.Connection, stop: Any) -> None:
    job = conn.recv()
    size, hwm = job["size"], job["hwm"]
    template = _template(size)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.sndhwm = hwm
    sock.sndtimeo = int(OP_TIMEOUT * 1000)
    sock.connect(job["address"])
    conn.send(("ready", None))
    seq = 0
    try:
        if size < zmq.COPY_THRESHOLD:
            buf = bytearray(template.tobytes())
            send, pack_into = sock.send, _U32.pack_into
            while not stop.value:
                pack_into(buf, 0, seq)
                send(buf)
                seq += 1
        else:
            # A zero-copy send returns before the bytes are written, so each
            # in-flight message gets its own buffer; one is reused only when its
            # tracker says ZeroMQ released it.
            ring = [template.copy() for _ in range(2 * hwm + 8)]
            trackers: list[Any] = [None] * len(ring)
            while not stop.value:
                j = seq % len(ring)
                t = trackers[j]
                if t is not None and not t.done:
                    t.wait(OP_TIMEOUT)
                ring[j].view(np.uint32)[0] = seq
                trackers[j] = sock.send(ring[j], copy=False, track=True)
                seq += 1
        sock.send(b"")  # end of stream
        conn.send(("sent", {"enqueued": seq}))
        # NOTE: stay connected until the consumer has everything. With the
        # consumer at its receive high-water mark, libzmq 4.3.5 can drop the
        # last messages of a peer that closes and exits, even with LINGER set.
        conn.recv()
    finally:
        sock.close(0)
        ctx.term()
    conn.send(("done", {}))


def _raw_consumer_body(conn: mp_connection.Connection) -> None:
    job = conn.recv()
    label, size, hwm = job["label"], job["size"], job["hwm"]
    template = _template(size)
    window = _Window(job["warmup"], job["seconds"])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.rcvhwm = hwm
    sock.linger = 0
    sock.rcvtimeo = int(OP_TIMEOUT * 1000)
    first = last = None
    n = 0
    try:
        sock.bind(job["bind"])
        conn.send(("ready", sock.last_endpoint.decode()))
        copy = size < zmq.COPY_THRESHOLD
        recv = sock.recv
        while True:
            try:
                msg = recv(copy=copy)
            except zmq.Again:
                raise BenchmarkError(
                    f"{label}: the consumer got no message for {OP_TIMEOUT:g} s after {n} items"
                ) from None
            if len(msg) == 0:
                break
            s = _seq(msg if copy else msg.buffer)
            if s != n:
                raise _sequence_error(label, s, n)
            if n == 0:
                first = bytes(msg)
            last = msg if copy else msg.buffer
            n += 1
            if window.tick(n):
                conn.send(("measured", window.report()))
    finally:
        sock.close()
        ctx.term()
    conn.send(("done", _consumer_summary(n, first, last, template, window)))


# ---------------------------------------------------------------------------
# The parent: start the children of one cell (a Children), drive them, check, stop them.


def _result(cell: Cell, window: dict[str, float], produced: dict[str, Any], consumed: dict[str, Any]) -> dict[str, Any]:
    if produced["enqueued"] != consumed["dequeued"]:
        raise BenchmarkError(
            f"{cell.label}: the producer enqueued {produced['enqueued']} items "
            f"but the consumer dequeued {consumed['dequeued']}"
        )
    if not (consumed["first_intact"] and consumed["last_intact"]):
        which = "first" if not consumed["first_intact"] else "last"
        raise BenchmarkError(f"{cell.label}: the {which} item's data differs from what was sent")
    items, elapsed = window["items"], window["elapsed"]
    rate = items / elapsed
    return {
        **asdict(cell),
        "items": items,
        "elapsed": elapsed,
        "items_per_s": rate,
        "mb_per_s": rate * cell.size / MB,
        "enqueued": produced["enqueued"],
        "dequeued": consumed["dequeued"],
        "conserved": True,
        "first_intact": True,
        "last_intact": True,
    }


def _run_qpipe_cell(cell: Cell, opts: _Options, tmpdir: str, index: int) -> dict[str, Any]:
    address = f"ipc://{tmpdir}/host-{index}.sock" if cell.transport == "ipc" else "tcp://127.0.0.1:0"
    children = Children(cell.label)
    stop = _CTX.RawValue("b", 0)
    ok = False
    try:
        children.spawn("host", queue_host_body, address, MAX_MESSAGE_SIZE)
        children.spawn("consumer", _qpipe_consumer_body)
        children.spawn("producer", _qpipe_producer_body, stop)
        address = children.expect("host", "ready", STARTUP_TIMEOUT)
        name = f"bench-{index}"
        n = cell.size // 4
        with qpipe.connect(address) as client:
            # Readiness: the first call succeeds only once the host is serving.
            q = client.fifo_queue(
                name, capacity=cell.capacity, dtypes=["float32"], shapes=[[n]], timeout=STARTUP_TIMEOUT
            )
            job = {
                "label": cell.label, "address": address, "queue": name, "size": cell.size,
                "mode": cell.mode, "batch": cell.batch, "warmup": opts.warmup, "seconds": opts.seconds,
            }
            children.send("consumer", job)
            children.send("producer", job)
            children.expect("consumer", "ready", STARTUP_TIMEOUT)
            children.expect("producer", "ready", STARTUP_TIMEOUT)
            window = children.expect("consumer", "measured", opts.warmup + opts.seconds + STARTUP_TIMEOUT)
            stop.value = 1
            produced = children.expect("producer", "done", STARTUP_TIMEOUT)
            consumed = children.expect("consumer", "done", STARTUP_TIMEOUT)
            left, closed = q.size(timeout=OP_TIMEOUT), q.is_closed(timeout=OP_TIMEOUT)
        if left or not closed:
            raise BenchmarkError(
                f"{cell.label}: the queue holds {left} items at the end (closed: {closed}); expected 0 and closed"
            )
        children.send("host", "stop")
        children.expect("host", "done", STARTUP_TIMEOUT)
        result = _result(cell, window, produced, consumed)
        ok = True
        return result
    finally:
        stop.value = 1
        children.stop(grace=5.0 if ok else 0.5)


def _run_raw_cell(cell: Cell, opts: _Options, tmpdir: str, index: int) -> dict[str, Any]:
    bind = f"ipc://{tmpdir}/raw-{index}.sock" if cell.transport == "ipc" else "tcp://127.0.0.1:0"
    hwm = max(1, cell.capacity // 2)
    children = Children(cell.label)
    stop = _CTX.RawValue("b", 0)
    ok = False
    try:
        children.spawn("consumer", _raw_consumer_body)
        children.spawn("producer", _raw_producer_body, stop)
        job = {"label": cell.label, "size": cell.size, "hwm": hwm, "warmup": opts.warmup, "seconds": opts.seconds}
        children.send("consumer", {**job, "bind": bind})
        endpoint = children.expect("consumer", "ready", STARTUP_TIMEOUT)
        children.send("producer", {**job, "address": endpoint})
        children.expect("producer", "ready", STARTUP_TIMEOUT)
        window = children.expect("consumer", "measured", opts.warmup + opts.seconds + STARTUP_TIMEOUT)
        stop.value = 1
        produced = children.expect("producer", "sent", STARTUP_TIMEOUT)
        consumed = children.expect("consumer", "done", STARTUP_TIMEOUT)
        children.send("producer", "exit")
        children.expect("producer", "done", STARTUP_TIMEOUT)
        result = _result(cell, window, produced, consumed)
        ok = True
        return result
    finally:
        stop.value = 1
        children.stop(grace=5.0 if ok else 0.5)


# ---------------------------------------------------------------------------
# The run as a whole


def _cells(opts: _Options) -> Iterator[Cell]:
    # Raw first, then qpipe, for each size: a size's cells run close together in time.
    for transport in opts.transports:
        for size in opts.sizes:
            yield Cell("raw", transport, size, "single", 1, capacity_for(size, 1))
            for mode in opts.modes:
                batch = 1 if mode == "single" else batch_for(size)
                yield Cell("qpipe", transport, size, mode, batch, capacity_for(size, batch))


def _evaluate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        q = _find(results, "qpipe", t.transport, t.size, t.mode)
        r = _find(results, "raw", t.transport, t.size, "single")
        entry = {**asdict(t), "label": t.label}
        if q is None or r is None:
            entry.update(status="SKIP", measured=None)
        else:
            measured = q["items_per_s"] / r["items_per_s"]
            entry.update(status="PASS" if measured >= t.ratio else "FAIL", measured=measured)
        out.append(entry)
    return out


def _find(results: list[dict[str, Any]], system: str, transport: str, size: int, mode: str) -> dict[str, Any] | None:
    for r in results:
        if (r["system"], r["transport"], r["size"], r["mode"]) == (system, transport, size, mode):
            return r
    return None


def run(
    sizes: Sequence[int] = DEFAULT_SIZES,
    transports: Sequence[str] = TRANSPORTS,
    modes: Sequence[str] = MODES,
    seconds: float = 1.5,
    warmup: float = 0.3,
    repeat: int = 1,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure every cell and return the results as a JSON-ready dict.

    Blocks until all cells ran, about ``repeat * (seconds + warmup + ~1 s of
    process start-up) * len(transports) * len(sizes) * (1 + len(modes))``
    seconds. Starts and stops its own child processes (spawn) and removes the
    temporary directory of its ipc sockets; uses only 127.0.0.1 for tcp.

    Parameters
    ----------
    sizes : sequence of int
        Item sizes in bytes, positive multiples of 4.
    transports : sequence of {"ipc", "tcp"}
    modes : sequence of {"single", "batched"}
        qpipe modes; the raw baseline is always measured, with single messages.
    seconds : float
        Length of each cell's measured window.
    warmup : float
        Time from a cell's first dequeued item to the start of its window.
    repeat : int
        Rounds: every cell is measured once per round, and its reported rate
        is the median of its rounds (``samples`` lists them all).
    progress : callable, optional
        Called with each measurement as soon as it is made.

    Returns
    -------
    dict
        ``machine`` (cpus, versions), ``date``, ``settings``, ``results`` (one
        dict per cell: the :class:`Cell` fields plus ``items``, ``elapsed``,
        ``items_per_s``, ``mb_per_s``, ``enqueued``, ``dequeued``,
        ``conserved`` and ``samples``, the items/s of every round) and
        ``targets`` (each with ``status`` PASS, FAIL or SKIP and the
        ``measured`` ratio).

    Raises
    ------
    BenchmarkError
        If any cell lost, duplicated or corrupted an item, or a child process
        failed or hung; every child process has been stopped by then.
    ValueError
        For an unknown transport or mode, or a bad size.
    """
    opts = _Options(tuple(sizes), tuple(transports), tuple(modes), float(seconds), float(warmup), int(repeat))
    _check_options(opts)
    cells = list(_cells(opts))
    machine = machine_info()
    tmpdir = tempfile.mkdtemp(prefix="qpipe-bench-")

    def measure(cell: Cell, index: int) -> dict[str, Any]:
        runner = _run_qpipe_cell if cell.system == "qpipe" else _run_raw_cell
        return runner(cell, opts, tmpdir, index)

    try:
        results = median_rounds(cells, opts.repeat, measure, "items_per_s", progress)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    machine["loadavg_after"] = list(os.getloadavg())
    return {
        "machine": machine,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {
            "sizes": list(opts.sizes),
            "transports": list(opts.transports),
            "modes": list(opts.modes),
            "seconds": opts.seconds,
            "warmup": opts.warmup,
            "repeat": opts.repeat,
            "mb": MB,
        },
        "results": results,
        "targets": _evaluate(results),
    }


def _check_options(opts: _Options) -> None:
    for t in opts.transports:
        if t not in TRANSPORTS:
            raise ValueError(f"unknown transport {t!r}; choose from {', '.join(TRANSPORTS)}")
    for m in opts.modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for s in opts.sizes:
        if s <= 0 or s % 4:
            raise ValueError(f"item size {s} must be a positive multiple of 4 bytes (float32 items)")
    if opts.repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {opts.repeat}")
    if opts.seconds <= 0 or opts.warmup < 0:
        raise ValueError(f"seconds must be > 0 and warmup >= 0, got {opts.seconds} and {opts.warmup}")


# ---------------------------------------------------------------------------
# Reporting


def format_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width text table, one row per qpipe cell, plus the target lines."""
    results = report["results"]
    head = (
        f"{'transport':<9}  {'size':>7}  {'mode':<7}  {'batch':>5}  {'capacity':>8}  "
        f"{'qpipe items/s':>13}  {'qpipe MB/s':>10}  {'raw items/s':>11}  {'raw MB/s':>8}  {'qpipe/raw':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if r["system"] != "qpipe":
            continue
        raw = _find(results, "raw", r["transport"], r["size"], "single")
        raw_items, raw_mb = (raw["items_per_s"], raw["mb_per_s"]) if raw else (float("nan"), float("nan"))
        lines.append(
            f"{r['transport']:<9}  {format_size(r['size']):>7}  {r['mode']:<7}  {r['batch']:>5}  {r['capacity']:>8}  "
            f"{r['items_per_s']:>13,.0f}  {r['mb_per_s']:>10,.1f}  {raw_items:>11,.0f}  {raw_mb:>8,.1f}  "
            f"{r['items_per_s'] / raw_items:>8.3f}x"
        )
    lines.append("")
    lines.extend(format_targets(report))
    return "\n".join(lines)


def format_targets(report: dict[str, Any]) -> list[str]:
    """One ``PASS`` / ``FAIL`` / ``SKIP`` line per acceptance target."""
    lines = []
    for t in report["targets"]:
        goal = f"target >= {t['ratio']:g}x raw single-message {t['unit']}"
        measured = "not measured in this run" if t["status"] == "SKIP" else f"{t['measured']:.3f}x"
        lines.append(format_target(t, f"{measured} ({goal})"))
    return lines


def _header(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    busy = max(m["loadavg_before"][0], m["loadavg_after"][0]) > 0.5 * (m["cpus"] or 1)
    rounds = f", median of {s['repeat']} rounds" if s["repeat"] > 1 else ""
    warning = " (WARNING: other processes were busy; rates are skewed)" if busy else ""
    return (
        preamble("qpipe queue throughput", report, numpy=False, load_note=warning)
        + f"{s['seconds']:g} s per cell after {s['warmup']:g} s of warm-up{rounds}; producer, consumer and host "
        f"in separate processes; MB = 10^6 bytes of payload.\n"
        f"raw = ZeroMQ PUSH/PULL, one item per message; qpipe/raw = qpipe items/s over raw items/s "
        f"(same size and transport).\n"
    )


def _progress_line(r: dict[str, Any]) -> None:
    print(
        f"  {r['system']:<5} {r['transport']:<3} {format_size(r['size']):>7} {r['mode']:<7} "
        f"batch {r['batch']:>4}: {r['items_per_s']:>12,.0f} items/s {r['mb_per_s']:>9,.1f} MB/s "
        f"({r['dequeued']} items, all accounted for)",
        file=sys.stderr,
        flush=True,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qpipe bench",
        description="Measure qpipe queue throughput against raw ZeroMQ PUSH/PULL "
        "(producer, consumer and queue host in separate processes).",
    )
    p.add_argument("--sizes", type=csv_list(parse_size), help="item sizes, e.g. 64,4KiB,256KiB,4MiB (the default)")
    p.add_argument("--transports", type=csv_list(choice(TRANSPORTS)), default=TRANSPORTS, help="ipc,tcp (default both)")
    p.add_argument("--modes", type=csv_list(choice(MODES)), default=MODES, help="single,batched (default both)")
    p.add_argument("--seconds", type=float, help="measured seconds per cell (default 1.5, --quick 0.25)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per cell (default 0.3, --quick 0.1)")
    p.add_argument("--repeat", type=int, default=1, help="rounds; each cell reports its median (default 1)")
    p.add_argument("--quick", action="store_true", help="a smoke run: short cells, sizes 64 B and 256 KiB")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if an acceptance target fails")
    return p



def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; return the exit status.

    Prints progress to stderr, then the table and one PASS/FAIL line per
    acceptance target to stdout.

    Returns
    -------
    int
        0 on success; 1 with ``--strict`` if a target failed; 2 if the
        benchmark itself failed (a lost or corrupted item, a crashed or hung
        child process), with the reason on stderr.
    """
    args = _parser().parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    seconds = args.seconds if args.seconds is not None else (0.25 if args.quick else 1.5)
    warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else 0.3)
    return run_main(
        "qpipe bench",
        lambda: run(sizes, args.transports, args.modes, seconds, warmup, args.repeat, _progress_line),
        lambda report: _header(report) + "\n" + format_table(report),
        command=" ".join(["qpipe", "bench", *argv] if argv is not None else ["python", *sys.argv]),
        json_path=args.json,
        strict=args.strict,
    )


# ---------------------------------------------------------------------------
# Harness helpers shared by the benchmarks in bench/
#
# bench/training.py, bench/serving.py and bench/model_parallel.py import these,
# so that every benchmark parses lists, starts and stops its child processes,
# heads its report and picks its exit status in the same way.

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def choice(choices: Sequence[str]) -> Callable[[str], str]:
    """An argparse ``type``: one of ``choices``, matched case-insensitively.

    The parser raises ValueError for anything else (argparse reports it as a
    usage error; :func:`csv_list` passes its message on).

    >>> choice(("ipc", "tcp"))(" TCP")
    'tcp'
    """

    def parse(text: str) -> str:  # NOTE: argparse names this function ("invalid parse value")
        t = text.strip().lower()
        if t not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return t

    return parse


def csv_list(parse: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    """An argparse ``type``: a comma-separated list, each stripped item read by ``parse``.

    Empty items are skipped. A ValueError from ``parse`` becomes an
    ``argparse.ArgumentTypeError`` with the same message.

    >>> csv_list(int)("1, 2,,4")
    (1, 2, 4)
    """

    def parse_list(text: str) -> tuple[Any, ...]:
        try:
            return tuple(parse(x.strip()) for x in text.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse_list


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises KeyboardInterrupt, as SIGINT does.

    SIGTERM would otherwise end the process without running the ``finally``
    blocks that stop the children. Only the main thread can set signal
    handlers; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def machine_info() -> dict[str, Any]:
    """CPU count, platform, Python, NumPy, pyzmq and libzmq versions, and ``loadavg_before``.

    ``loadavg_before`` is ``os.getloadavg()`` now; a benchmark adds
    ``loadavg_after`` when it ends. Other processes on the machine skew every
    number, and the load says whether there were any.
    """
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "loadavg_before": list(os.getloadavg()),
    }


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None where unavailable.

    The busy share of a window is the difference of two readings' busy over
    that of their totals.
    """
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return float(total - idle), float(total)


def die_with_parent(parent: int) -> None:
    """Make a child process end with its parent; call it first thing in the child.

    On Linux the kernel sends the child SIGKILL when the parent dies
    (``PR_SET_PDEATHSIG``), since a parent killed by SIGKILL runs no
    ``finally`` block. Exits at once if ``parent`` (the parent's PID, passed
    down) is already gone.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


@contextlib.contextmanager
def blas_threads(n: int, names: Sequence[str] = THREAD_VARS) -> Iterator[None]:
    """Inside the block, the environment variables ``names`` say ``n`` BLAS/OpenMP threads.

    Child processes started inside inherit them (spawned children copy
    ``os.environ``); the old values are restored on exit. Not thread-safe:
    it changes this process's environment.
    """
    old = {k: os.environ.get(k) for k in names}
    os.environ.update({k: str(n) for k in names})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop_processes(procs: Iterable[multiprocessing.process.BaseProcess], grace: float) -> None:
    """Join every process; SIGTERM, then SIGKILL, each still running ``grace`` seconds from now.

    Blocks for at most ``grace`` seconds, plus ``2 * grace`` for each process
    still running then. Each is stopped by its own PID, never by name.
    """
    procs = list(procs)
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            p.terminate()
            p.join(grace)
        if p.exitcode is None:
            p.kill()
            p.join(grace)


def _child(
    role: str, body: Callable[..., None], parent: int | None, conn: mp_connection.Connection, *args: Any
) -> None:
    if parent is not None:
        die_with_parent(parent)
    try:
        body(conn, *args)
    except BaseException:  # report everything, including KeyboardInterrupt, then exit non-zero
        with contextlib.suppress(Exception):
            conn.send(("error", f"{role} (pid {os.getpid()}) failed:\n{traceback.format_exc()}"))
        raise SystemExit(1) from None
    finally:
        conn.close()


def queue_host_body(conn: mp_connection.Connection, address: str, max_message_size: int | None = None) -> None:
    """A :class:`Children` body: a ``qpipe.QueueServer`` on ``address`` until the parent says ``"stop"``.

    Sends ``("ready", bound address)``, then ``("done", {})`` once stopped.
    """
    server = qpipe.QueueServer(address, max_message_size=max_message_size)
    server.start()
    try:
        conn.send(("ready", server.address))
        conn.recv()  # the parent's "stop"; EOF if the parent died
    except EOFError:
        pass
    finally:
        server.stop()
    conn.send(("done", {}))


class Children:
    """The child processes of one cell, started with ``spawn``; :meth:`stop` joins or kills each by its PID.

    A child runs ``body(conn, *args)`` and talks to the parent over its Pipe
    end ``conn``: it sends ``(kind, payload)`` tuples, such as ``("ready",
    x)`` and ``("done", x)``; if ``body`` raises, the child sends ``("error",
    traceback text)`` and exits with status 1. Messages from all children are
    read as they come and kept per child, so waiting for one child never loses
    another's message, and an error from any child fails the cell at once.

    Subclasses may set the class attributes: ``name`` (the processes' name
    prefix), ``die_with_parent`` (children ask the kernel to kill them should
    the parent die, see :func:`die_with_parent`) and ``threads`` (BLAS/OpenMP
    threads per child, see :func:`blas_threads`; None leaves the environment
    alone). Not thread-safe: one thread drives a cell.
    """

    name = "qpipe-bench"
    die_with_parent = False
    threads: int | None = None

    def __init__(self, label: str) -> None:
        self.label = label
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        self.conns: dict[str, mp_connection.Connection] = {}
        self.inbox: dict[str, collections.deque[tuple[str, Any]]] = {}
        self.eof: set[str] = set()
        self.finished: set[str] = set()  # roles whose exit (code 0) is expected

    def spawn(self, role: str, body: Callable[..., None], *args: Any) -> None:
        """Start ``body(conn, *args)`` in a new process known as ``role``; returns once it has started."""
        parent_end, child_end = _CTX.Pipe()
        parent = os.getpid() if self.die_with_parent else None
        p = _CTX.Process(
            target=_child, args=(role, body, parent, child_end, *args), name=f"{self.name}-{role}", daemon=True
        )
        with blas_threads(self.threads) if self.threads is not None else contextlib.nullcontext():
            p.start()
        child_end.close()
        self.procs[role], self.conns[role] = p, parent_end
        self.inbox[role] = collections.deque()

    def pids(self) -> dict[str, int]:
        """role -> PID of every child started."""
        return {r: p.pid for r, p in self.procs.items()}

    def send(self, role: str, obj: Any) -> None:
        """Send ``obj`` (pickled) to the child ``role``."""
        self.conns[role].send(obj)

    def _drain(self) -> None:
        for role, conn in self.conns.items():
            while role not in self.eof and conn.poll():
                try:
                    msg = conn.recv()
                except EOFError:
                    self.eof.add(role)
                    break
                if msg[0] == "error":
                    raise BenchmarkError(f"{self.label}: {msg[1]}")
                self.inbox[role].append(msg)

    def _check_exits(self, waiting_for: str) -> set[str]:
        exited = {r for r, p in self.procs.items() if p.exitcode is not None}
        self._drain()  # whatever a child sent before exiting is in its pipe by now
        for r in exited:
            code = self.procs[r].exitcode
            if code != 0 or (r not in self.finished and not self.inbox[r]):
                raise BenchmarkError(f"{self.label}: the {r} process (pid {self.procs[r].pid}) exited with code "
                                     f"{code} while the benchmark waited for {waiting_for}")
        return exited

    def expect(self, role: str, kind: str, timeout: float) -> Any:
        """Wait for ``role`` to send ``(kind, payload)``; return the payload.

        Blocks for at most ``timeout`` seconds.

        Raises
        ------
        BenchmarkError
            If any child reports an error, exits with a non-zero code or exits
            before sending ``"done"``; if ``role`` exits without sending
            ``kind`` or sends something else first; or after ``timeout``
            seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            # Exit codes first: whatever a child sent before exiting is in its pipe by then.
            exited = {r for r, p in self.procs.items() if p.exitcode is not None}
            self._drain()
            if self.inbox[role]:
                got, payload = self.inbox[role].popleft()
                if got != kind:
                    raise BenchmarkError(f"{self.label}: expected {kind!r} from the {role} process, got {got!r}")
                if kind == "done":
                    self.finished.add(role)
                return payload
            for r in exited:
                code = self.procs[r].exitcode
                if code != 0 or r == role or (r not in self.finished and not self.inbox[r]):
                    raise BenchmarkError(
                        f"{self.label}: the {r} process (pid {self.procs[r].pid}) exited with code {code} "
                        f"while the benchmark waited for {kind!r} from the {role} process"
                    )
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchmarkError(f"{self.label}: no {kind!r} from the {role} process within {timeout:g} s")
            waitables: list[Any] = [c for r, c in self.conns.items() if r not in self.eof]
            waitables += [p.sentinel for r, p in self.procs.items() if r not in exited]
            mp_connection.wait(waitables, left)

    def watch(self, seconds: float) -> None:
        """Sleep ``seconds``; raise BenchmarkError at once if a child reports an error or exits early."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for c in self.conns.values():
                if c.poll():
                    self._drain()  # raises on an error; keeps anything else
                    break
            if any(p.exitcode is not None for p in self.procs.values()):
                self._check_exits("the measured window to end")
            time.sleep(min(left, 0.05))

    def stop(self, grace: float) -> None:
        """Join every child; SIGTERM, then SIGKILL, any still running ``grace`` seconds from now."""
        stop_processes(self.procs.values(), grace)
        for c in self.conns.values():
            c.close()
        for p in self.procs.values():
            p.close()


def median_rounds(
    cells: Sequence[Any],
    repeat: int,
    measure: Callable[[Any, int], dict[str, Any]],
    rate: str,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every cell once per round, ``repeat`` rounds; return each cell's median round.

    ``measure(cell, index)`` returns one measurement; ``index`` counts the
    measurements from 0 (for unique socket paths and queue names). Rounds
    interleave the cells, so that a burst of load from elsewhere hits one
    round of each. ``progress`` is called with every measurement. Each
    result is the cell's median round by ``result[rate]``, with ``samples``:
    the ``rate`` of every round, in order.
    """
    samples: dict[Any, list[dict[str, Any]]] = {c: [] for c in cells}
    index = 0
    for _ in range(repeat):
        for cell in cells:
            result = measure(cell, index)
            index += 1
            samples[cell].append(result)
            if progress is not None:
                progress(result)
    results = []
    for cell in cells:
        runs = sorted(samples[cell], key=lambda r: r[rate])
        results.append({**runs[(len(runs) - 1) // 2], "samples": [r[rate] for r in samples[cell]]})
    return results


def or_dash(value: float | None, fmt: str) -> str:
    """``format(value, fmt)``, or a ``-`` of the same width and alignment for None (a table cell).

    >>> or_dash(None, ">6.1f"), or_dash(2.0, ">6.1f")
    ('     -', '   2.0')
    """
    if value is None:
        m = re.match(r"([<>^]?)(\d*)", fmt)
        return format("-", f"{m.group(1) or '>'}{m.group(2)}")
    return format(value, fmt)


def preamble(title: str, report: dict[str, Any], *, numpy: bool = True, load_note: str = "") -> str:
    """The first three lines of a report, each ending in a newline.

    What and when (``title``, ``report["date"]``), the machine's CPUs and
    versions (``report["machine"]`` as from :func:`machine_info`; NumPy's
    unless ``numpy`` is False), the command that ran, and the 1-minute load
    average before and after, followed by ``load_note`` (a warning, say).
    """
    m = report["machine"]
    numpy_version = f"numpy {m['numpy']}, " if numpy else ""
    return (
        f"{title}, {report['date']}, {m['cpus']} CPUs, python {m['python']}, {numpy_version}"
        f"pyzmq {m['pyzmq']} / libzmq {m['libzmq']}\n"
        f"command: {report.get('command', '?')}\n"
        f"1-minute load average {m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after{load_note}\n"
    )


def format_target(target: dict[str, Any], detail: str) -> str:
    """One acceptance line: ``PASS  label: detail`` (or FAIL, SKIP: ``target["status"]``)."""
    return f"{target['status']}  {target['label']}: {detail}"


def run_main(
    prog: str,
    measure: Callable[[], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    *,
    command: str,
    json_path: str | None = None,
    strict: bool = False,
) -> int:
    """The end of a benchmark's ``main``: measure, print the report, save it, return the exit status.

    Blocks while ``measure()`` runs, with SIGTERM raising KeyboardInterrupt
    (see :func:`sigterm_as_interrupt`) so that its ``finally`` blocks stop
    every child. Then sets ``report["command"] = command``, prints
    ``render(report)`` to stdout and, with ``json_path``, writes the report
    there as indented JSON.

    Returns
    -------
    int
        0 on success; 1 with ``strict`` if a target's status is FAIL; 2 if
        ``measure`` raised :class:`BenchmarkError` (``prog: FAILED: reason``
        on stderr); 130 if interrupted (SIGINT or SIGTERM).
    """
    try:
        with sigterm_as_interrupt():
            report = measure()
    except BenchmarkError as e:
        print(f"{prog}: FAILED: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; child processes stopped", file=sys.stderr)
        return 130
    report["command"] = command
    print(render(report))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if strict and any(t["status"] == "FAIL" for t in report["targets"]):
        return 1
    return 0
