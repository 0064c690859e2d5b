"""Replicated serving: send queries to a shared request queue, get answers back by request id.

Several predictor replicas dequeue from one request queue, so whichever replica
is free takes the next query (natural load balancing). A query carries its own
id and the name of the caller's private reply queue; the replica that served it
enqueues ``(id, probabilities)`` there. :class:`ServingClient` is that caller::

    with ServingClient("tcp://127.0.0.1:5555", "requests") as sc:
        probs = sc.predict(x, timeout=5.0)            # one query, shape (classes,)
        batch = sc.predict_many(xs)                   # one enqueue_many, shape (n, classes)
        fut = sc.submit(x)                            # a Future; fut.latency when answered
        stats = sc.run_load(xs, concurrency=16, duration=10.0)
        print(stats.summary())                        # queries/s, p50, p99, timeouts, ...

Queues
------
The request queue is part of the topology (e.g. ``topologies/serving.toml``)
and holds ``(id int64, reply_to string, x float32[...])``; the client reads
its spec from the host and takes the input shape and dtype from it. Each
client declares its own reply queue, ``replies-<random hex>`` (FIFO,
``(id int64, probs float32[classes])``) on the same queue host, drains it from
one receiver thread, and closes it when the client closes: a replica that
answers afterwards gets ``QueueClosedError`` instead of filling a queue nobody
reads.

Matching answers
----------------
Ids are drawn from a per-client counter that starts at a random offset, so a
reply queue reused by name never matches an old answer to a new query. An
answer is delivered only to the query with its id that is still waiting; an
answer for a query that already timed out or failed is counted as ``late``,
one for an id this client never sent as ``unknown``. Neither is ever handed to
another query. A query's latency runs from just before its enqueue (or, under
:meth:`ServingClient.run_load` with a ``rate``, from its scheduled send time,
so a slow sender does not hide queueing) to the moment the receiver took its
answer from the reply queue.

Only the public client API (:func:`qpipe.connect` and queue handles) is used.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import math
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .client import Client, Queue, connect
from .errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    OutOfRangeError,
    QueueError,
)
from .inputs import CsvDecoder

__all__ = ["LoadStats", "PendingQuery", "ServingClient", "read_csv_inputs", "request_spec_problem"]

DEFAULT_TIMEOUT = 30.0
REPLY_CAPACITY = 4096
MAX_SUBMIT_BATCH = 256  # queries per enqueue_many under load
_EXPIRED_MEMORY = 1 << 16  # ids of timed-out queries remembered, to count their answers as late
_RECEIVER_POLL = 0.1  # longest a receiver waits before checking deadlines and the stop flag


def request_spec_problem(queue: Queue) -> str | None:
    """Why ``queue`` cannot be a request queue, or ``None`` when it can.

    A request queue holds ``(id int64 [], reply_to string [], x <float> [...])``.
    """
    dts, shapes = queue.dtypes, queue.shapes
    want = "(id int64 [], reply_to string [], x float32 [...])"
    if len(dts) != 3:
        return f"queue {queue.name!r} has {len(dts)} components {list(dts)}; a request queue holds {want}"
    if dts[0] != "int64" or dts[1] != "string" or np.dtype(dts[2]).kind != "f":
        return f"queue {queue.name!r} holds {list(dts)}; a request queue holds {want}"
    if shapes is None:
        return f"queue {queue.name!r} has no shapes; give it shapes = [[], [], [D]] as a request queue"
    if tuple(shapes[0]) != () or tuple(shapes[1]) != ():
        return f"queue {queue.name!r}: id and reply_to must be scalars (shapes [] and []), got {list(shapes[:2])}"
    if any(d is None for d in shapes[2]):
        return f"queue {queue.name!r}: the input shape {list(shapes[2])} must be fully known"
    return None


class PendingQuery(concurrent.futures.Future):
    """A query on its way: a :class:`concurrent.futures.Future` of its probabilities.

    ``result(timeout)`` returns the answer (``float32[classes]``) or raises
    :class:`~qpipe.DeadlineExceededError` once the query's own deadline passed
    without an answer (set by :meth:`ServingClient.submit`), or the error that
    stopped the query from being sent. ``id`` is the request id; ``latency`` is
    the seconds from send to answer, set before the result.
    """

    def __init__(self, rid: int, sent: float, deadline: float) -> None:
        super().__init__()
        self.id = rid
        self.sent = sent
        self.deadline = deadline
        self.latency: float | None = None

    def cancel(self) -> bool:
        """A sent query cannot be withdrawn: always ``False`` (its deadline ends it)."""
        return False


@dataclass
class LoadStats:
    """What one :meth:`ServingClient.run_load` measured.

    ``queries_per_s`` counts answered queries over ``seconds``, the time from
    the first send to the last query settled (answered, timed out or failed).
    Latencies are over answered queries, in milliseconds (``nan`` when none).
    ``late`` and ``unknown`` count answers that arrived during the run for
    queries that had timed out, or for ids this client never sent.
    """

    sent: int = 0
    answered: int = 0
    timeouts: int = 0
    errors: int = 0
    late: int = 0
    unknown: int = 0
    seconds: float = 0.0
    queries_per_s: float = 0.0
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    mean_ms: float = math.nan
    concurrency: int | None = None
    rate: float | None = None
    first_error: str | None = None
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def as_dict(self, latencies: bool = False) -> dict[str, Any]:
        """The numbers as a JSON-friendly dict (``latencies_ms`` only when asked)."""
        d = asdict(self)
        if not latencies:
            d.pop("latencies_ms")
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

    def summary(self) -> str:
        """One line: ``answered 2000/2000 in 10.1 s: 198.3 queries/s; latency p50 ... ms``."""
        line = (f"answered {self.answered}/{self.sent} in {self.seconds:.2f} s: {self.queries_per_s:,.1f} queries/s; "
                f"latency p50 {self.p50_ms:.2f} ms, p90 {self.p90_ms:.2f} ms, p99 {self.p99_ms:.2f} ms, "
                f"max {self.max_ms:.2f} ms")
        bad = [f"{k} {v}" for k, v in (("timeouts", self.timeouts), ("errors", self.errors), ("late", self.late),
                                       ("unknown", self.unknown)) if v]
        return line + ("; " + ", ".join(bad) if bad else "")

    @classmethod
    def from_queries(cls, queries: Sequence[PendingQuery], t_start: float, t_end: float, **extra: Any) -> LoadStats:
        lat = [q.latency for q in queries if q.latency is not None]
        errors = [q.exception(0) if q.done() else DeadlineExceededError(f"query {q.id} never settled")
                  for q in queries if q.latency is None]
        timeouts = sum(1 for e in errors if isinstance(e, DeadlineExceededError))
        failed = [e for e in errors if not isinstance(e, DeadlineExceededError)]
        ms = np.asarray(lat, dtype=np.float64) * 1e3
        seconds = max(t_end - t_start, 1e-9)
        st = cls(sent=len(queries), answered=len(lat), timeouts=timeouts, errors=len(failed), seconds=seconds,
                 queries_per_s=len(lat) / seconds, latencies_ms=ms.tolist(),
                 first_error=f"{type(failed[0]).__name__}: {failed[0]}" if failed else None, **extra)
        if len(ms):
            st.p50_ms, st.p90_ms, st.p99_ms = (float(v) for v in np.percentile(ms, [50, 90, 99]))
            st.max_ms, st.mean_ms = float(ms.max()), float(ms.mean())
        return st


class ServingClient:
    """A caller of a replicated model: queries out through a shared queue, answers back by id.

    Thread-safe: any number of threads may call :meth:`predict`,
    :meth:`submit` and friends at once; one receiver thread per client takes
    the answers from the client's reply queue.

    Parameters
    ----------
    address : str
        The queue host holding the request queue, e.g. ``"tcp://127.0.0.1:5555"``.
    request_queue : str
        Its name (``"requests"`` in ``topologies/serving.toml``). Must hold
        ``(id int64, reply_to string, x float[...])``.
    reply_queue : str, optional
        The name of this client's reply queue (default ``replies-<random hex>``).
        It must not be shared with another live client.
    classes : int
        Length of an answer's probability vector (default 10).
    timeout : float
        Default deadline of a query, in seconds, from its send to its answer
        (default 30). Also bounds the enqueue of a query into a full request queue.
    reply_capacity : int
        Capacity of the reply queue (default 4096); keep it above the number of
        queries in flight, or replicas block on answering.
    liveness : float, optional
        Seconds without any answer from the host before calls fail with
        :class:`~qpipe.UnavailableError` (default ``QPIPE_LIVENESS``).

    Raises
    ------
    NotFoundError
        When the host has no queue ``request_queue``.
    InvalidArgumentError
        When it does not hold requests, or the reply queue exists with another spec.
    UnavailableError
        When the host does not answer.
    """

    def __init__(self, address: str, request_queue: str = "requests", *, reply_queue: str | None = None,
                 classes: int = 10, timeout: float = DEFAULT_TIMEOUT, reply_capacity: int = REPLY_CAPACITY,
                 liveness: float | None = None) -> None:
        self.timeout = _positive(timeout, "timeout")
        self._client: Client = connect(address, timeout=self.timeout if math.isfinite(self.timeout) else None,
                                       liveness=liveness)
        self.address = self._client.address
        try:
            self._requests = self._client.queue(request_queue)
            problem = request_spec_problem(self._requests)
            if problem:
                raise InvalidArgumentError(problem)
            self.input_shape: tuple[int, ...] = tuple(self._requests.shapes[2])
            self.input_dtype = np.dtype(self._requests.dtypes[2])
            self.classes = int(classes)
            self.reply_name = reply_queue or f"replies-{uuid.uuid4().hex[:16]}"
            self._replies = self._client.fifo_queue(self.reply_name, int(reply_capacity), ["int64", "float32"],
                                                    [[], [self.classes]], names=["id", "probs"])
        except BaseException:
            self._client.close()
            raise
        self._reply_to = self.reply_name.encode()
        self._ids = itertools.count(secrets.randbelow(1 << 62) + 1)
        self._lock = threading.Lock()
        self._pending: dict[int, PendingQuery] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._expired: OrderedDict[int, None] = OrderedDict()
        self._counts = {"sent": 0, "answered": 0, "timeouts": 0, "errors": 0, "late": 0, "unknown": 0}
        self._broken: BaseException | None = None
        self._stop = threading.Event()
        self._closed = False
        self._receiver = threading.Thread(target=self._receive, name=f"serving-replies {self.reply_name}",
                                          daemon=True)
        self._receiver.start()

    # -- lifecycle ----------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Close the reply queue, deliver answers already in it, fail the queries still waiting, disconnect.

        Queries still waiting fail with ``RuntimeError``. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._replies.close(timeout=min(timeout, 2.0))
        except QueueError:
            self._stop.set()  # host gone or queue already closed: stop polling instead
        self._receiver.join(timeout)
        self._stop.set()
        self._receiver.join(1.0)
        with self._lock:
            left = list(self._pending.values())
            self._pending.clear()
            for q in left:
                self._remember_expired(q.id)
        for q in left:
            q.set_exception(RuntimeError(f"ServingClient for {self.address} was closed with query {q.id} waiting"))
        self._client.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<ServingClient {self.address} requests={self._requests.name!r} replies={self.reply_name!r}"
                f"{' closed' if self._closed else ''}>")

    # -- queries ------------------------------------------------------------------------

    def submit(self, x: Any, timeout: float | None = None) -> PendingQuery:
        """Send one query and return at once with its :class:`PendingQuery`.

        Blocks only while the request queue is full (at most ``timeout``).
        ``timeout`` (default: the client's) is the query's deadline from now;
        after it (within about 0.1 s) the query fails with
        :class:`~qpipe.DeadlineExceededError` and a later answer is counted as late.
        """
        return self.submit_many(self._input(x)[None], timeout)[0]

    def submit_many(self, xs: Any, timeout: float | None = None, *,
                    sent: Sequence[float] | None = None) -> list[PendingQuery]:
        """Send a batch of queries with one ``enqueue_many``; one :class:`PendingQuery` each.

        ``sent`` (``time.perf_counter()`` values, one per query) backdates each
        query's send time, from which its latency and deadline count.
        Raises ``InvalidArgumentError`` (nothing sent) when ``xs`` is not a
        batch of inputs; send failures are reported through the futures.
        """
        xs = self._inputs(xs)
        n = len(xs)
        t = self.timeout if timeout is None else _positive(timeout, "timeout")
        with self._lock:
            self._check_usable()
            now = time.perf_counter()
            starts = [now] * n if sent is None else [float(s) for s in sent]
            ids = [next(self._ids) for _ in range(n)]
            queries = [PendingQuery(rid, s, s + t) for rid, s in zip(ids, starts)]
            for q in queries:
                self._pending[q.id] = q
                heapq.heappush(self._deadlines, (q.deadline, q.id))
            self._counts["sent"] += n
        if not n:
            return queries
        budget = max(0.0, min(q.deadline for q in queries) - time.perf_counter())
        try:
            self._requests.enqueue_many((np.asarray(ids, dtype=np.int64), [self._reply_to] * n, xs),
                                        timeout=budget if math.isfinite(budget) else None)
        except DeadlineExceededError as e:
            # The request queue stayed full past the deadline: these queries timed out
            # (any that got in are answered later and counted as late).
            self._settle(queries, DeadlineExceededError(
                f"request queue {self._requests.name!r} stayed full for {budget:.3f} s; {n} query(ies) "
                f"not sent in time ({e})"), "timeouts")
        except QueueError as e:
            self._settle(queries, e, "errors")
        return queries

    def predict(self, x: Any, timeout: float | None = None) -> np.ndarray:
        """One query: blocks until its answer, a ``float32[classes]`` array of probabilities.

        Raises :class:`~qpipe.DeadlineExceededError` when no answer came within
        ``timeout`` seconds (default: the client's), or the
        :class:`~qpipe.QueueError` that stopped the query from being sent.
        """
        q = self.submit(x, timeout)
        return self._wait(q)

    def predict_many(self, xs: Any, timeout: float | None = None) -> np.ndarray:
        """A batch of queries sent with one ``enqueue_many``; blocks until all are answered.

        Returns ``float32[n, classes]`` in the order of ``xs``, whichever replicas
        answered and in whatever order. Raises
        :class:`~qpipe.DeadlineExceededError` (saying how many were answered)
        when some got no answer within ``timeout``.
        """
        queries = self.submit_many(xs, timeout)
        out = np.empty((len(queries), self.classes), dtype=np.float32)
        missing = []
        for i, q in enumerate(queries):
            try:
                out[i] = self._wait(q)
            except DeadlineExceededError:
                missing.append(i)
        if missing:
            raise DeadlineExceededError(
                f"{len(queries) - len(missing)} of {len(queries)} queries answered within their deadline; "
                f"no answer for rows {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        return out

    def run_load(self, xs: Any, *, concurrency: int | None = 1, rate: float | None = None,
                 duration: float | None = None, n: int | None = None,
                 timeout: float | None = None) -> LoadStats:
        """Generate load from the rows of ``xs`` (cycled) and measure queries/s and latency.

        Closed loop (``rate=None``): keep ``concurrency`` queries outstanding,
        sending the next as soon as one settles. Open loop (``rate`` queries
        per second): send on schedule whatever the answers do, with latency
        counted from each query's scheduled time; ``concurrency`` then caps
        the queries in flight (``None``: no cap). Stops sending after ``n``
        queries or ``duration`` seconds (default: one pass over ``xs``), then
        waits for the queries in flight to settle (each within ``timeout``).

        Returns a :class:`LoadStats`. Blocks the calling thread for the whole run.
        """
        xs = self._inputs(xs)
        if not len(xs):
            raise ValueError("run_load needs at least one input row")
        if concurrency is not None and (isinstance(concurrency, bool) or int(concurrency) < 1):
            raise ValueError(f"concurrency must be an integer >= 1 or None, got {concurrency!r}")
        if concurrency is None and rate is None:
            raise ValueError("run_load needs a concurrency (closed loop) or a rate (open loop), or both")
        rate = None if rate is None else _positive(rate, "rate")
        duration = None if duration is None else _positive(duration, "duration")
        if n is None and duration is None:
            n = len(xs)
        slots = threading.Semaphore(int(concurrency)) if concurrency is not None else None
        queries: list[PendingQuery] = []
        settled = threading.Condition()
        state = {"done": 0, "last": 0.0}

        def on_done(q: concurrent.futures.Future) -> None:
            with settled:
                state["done"] += 1
                state["last"] = max(state["last"], time.perf_counter())
                settled.notify_all()
            if slots is not None:
                slots.release()

        before = self.counters()
        t0 = time.perf_counter()
        end = None if duration is None else t0 + duration
        i = 0
        while n is None or i < n:
            room = MAX_SUBMIT_BATCH if n is None else min(MAX_SUBMIT_BATCH, n - i)
            sent = None
            if rate is not None:
                due = t0 + i / rate
                now = time.perf_counter()
                if end is not None and due >= end:
                    break
                if due > now:
                    time.sleep(due - now)
                now = time.perf_counter()
                room = min(room, max(1, int((now - t0) * rate) - i + 1))
            elif end is not None and time.perf_counter() >= end:
                break
            if slots is not None:
                if not _acquire(slots, end):
                    break
                k = 1
                while k < room and slots.acquire(blocking=False):
                    k += 1
            else:
                k = room
            if rate is not None:
                sent = [t0 + (i + j) / rate for j in range(k)]
            rows = xs[np.arange(i, i + k) % len(xs)]
            batch = self.submit_many(rows, timeout, sent=sent)
            queries.extend(batch)
            for q in batch:
                q.add_done_callback(on_done)
            i += k
        t = self.timeout if timeout is None else timeout
        with settled:
            settled.wait_for(lambda: state["done"] >= len(queries), t + 5.0 if math.isfinite(t) else None)
        after = self.counters()
        t_end = state["last"] if queries else time.perf_counter()
        return LoadStats.from_queries(queries, t0, t_end, late=after["late"] - before["late"],
                                      unknown=after["unknown"] - before["unknown"],
                                      concurrency=concurrency, rate=rate)

    def counters(self) -> dict[str, int]:
        """Totals since the client started: ``sent``, ``answered``, ``timeouts``, ``errors``, ``late``, ``unknown``."""
        with self._lock:
            return dict(self._counts, pending=len(self._pending))

    def wait_ready(self, servers: int = 1, timeout: float = 60.0) -> None:
        """Block until at least ``servers`` dequeues wait on the request queue (replicas are up).

        A start-up check, meant for an idle request queue: polls the host's
        statistics every 50 ms. Raises :class:`~qpipe.DeadlineExceededError`
        after ``timeout`` seconds, saying how many were waiting.
        """
        deadline = time.monotonic() + timeout
        waiting = 0
        while True:
            st = self._client.stats(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            waiting = st["queues"].get(self._requests.name, {}).get("waiting_dequeues", 0)
            if waiting >= servers:
                return
            if time.monotonic() >= deadline:
                raise DeadlineExceededError(
                    f"request queue {self._requests.name!r} on {self.address}: {waiting} of {servers} "
                    f"server(s) waiting after {timeout:g} s; are the predictor replicas running?")
            time.sleep(0.05)

    # -- machinery ----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"ServingClient for {self.address} is closed")
        if self._broken is not None:
            raise RuntimeError(f"ServingClient for {self.address} stopped receiving answers: "
                               f"{type(self._broken).__name__}: {self._broken}") from self._broken

    def _input(self, x: Any) -> np.ndarray:
        a = np.asarray(x)
        if a.shape != self.input_shape:
            raise InvalidArgumentError(f"request queue {self._requests.name!r}: an input has shape "
                                       f"{list(self.input_shape)}, got {list(a.shape)}")
        return a

    def _inputs(self, xs: Any) -> np.ndarray:
        a = np.asarray(xs)
        if a.ndim != len(self.input_shape) + 1 or a.shape[1:] != self.input_shape:
            raise InvalidArgumentError(f"request queue {self._requests.name!r}: a batch of inputs has shape "
                                       f"[n, {', '.join(map(str, self.input_shape))}], got {list(a.shape)}")
        if a.dtype != self.input_dtype:
            a = a.astype(self.input_dtype)  # NOTE: float64 rows from a CSV are cast here, as the queue would
        return a

    def _wait(self, q: PendingQuery) -> np.ndarray:
        # The receiver settles every query by its deadline; the extra wait only guards a dead receiver.
        left = max(0.0, q.deadline - time.perf_counter()) + 5.0 if math.isfinite(q.deadline) else None
        try:
            return q.result(left)
        except concurrent.futures.TimeoutError:
            raise DeadlineExceededError(f"query {q.id}: no answer and the receiver did not report") from None

    def _remember_expired(self, rid: int) -> None:
        self._expired[rid] = None
        if len(self._expired) > _EXPIRED_MEMORY:
            self._expired.popitem(last=False)

    def _settle(self, queries: Sequence[PendingQuery], error: BaseException, counter: str) -> None:
        failed = []
        with self._lock:
            for q in queries:
                if self._pending.pop(q.id, None) is not None:
                    self._remember_expired(q.id)
                    failed.append(q)
            self._counts[counter] += len(failed)
        for q in failed:
            q.set_exception(error)

    def _expire(self, now: float) -> float:
        """Fail queries past their deadline; return seconds until the next deadline (capped)."""
        due = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, rid = heapq.heappop(self._deadlines)
                q = self._pending.pop(rid, None)
                if q is not None:
                    self._remember_expired(rid)
                    due.append(q)
            self._counts["timeouts"] += len(due)
            nxt = self._deadlines[0][0] - now if self._deadlines else _RECEIVER_POLL
        for q in due:
            q.set_exception(DeadlineExceededError(
                f"query {q.id}: no answer on reply queue {self.reply_name!r} within "
                f"{q.deadline - q.sent:.3f} s"))
        return min(max(nxt, 0.001), _RECEIVER_POLL)

    def _deliver(self, ids: np.ndarray, probs: np.ndarray, now: float) -> None:
        done = []
        with self._lock:
            for rid, p in zip(ids.tolist(), probs):
                q = self._pending.pop(rid, None)
                if q is None:
                    self._counts["late" if rid in self._expired else "unknown"] += 1
                    continue
                q.latency = now - q.sent
                done.append((q, p))
            self._counts["answered"] += len(done)
        for q, p in done:
            q.set_result(p)

    def _receive(self) -> None:
        q = self._replies
        try:
            while not self._stop.is_set():
                wait = self._expire(time.perf_counter())
                try:
                    rid, probs = q.dequeue(timeout=wait)
                except DeadlineExceededError:
                    continue
                ids, ps = np.asarray([rid], dtype=np.int64), probs[None]
                if self._pending:
                    # More answers are expected: take whatever else is there in one go
                    # (only this receiver dequeues, so the size cannot shrink meanwhile).
                    more = q.size()
                    if more:
                        mids, mps = q.dequeue_many(more)
                        ids, ps = np.concatenate([ids, mids]), np.concatenate([ps, mps])
                self._deliver(ids, ps, time.perf_counter())
        except OutOfRangeError:
            pass  # closed by close() and drained
        except QueueError as e:
            if not self._closed:
                self._broken = e
                with self._lock:
                    waiting = list(self._pending.values())
                self._settle(waiting, e, "errors")


def read_csv_inputs(path: str, width: int, *, columns: str | None = None, label: str | None = "label",
                    delimiter: str = ",") -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Read query inputs (and labels, if there is a label column) from a CSV file with a header.

    Parameters
    ----------
    path : str
        The CSV file; its first line names the columns.
    width : int
        Numbers per input (the request queue's input size, e.g. 64).
    columns : str, optional
        Which columns make an input: ``"START:STOP"`` (0-based header
        positions, STOP excluded) or comma-separated header names. Default:
        the first ``width`` columns other than the label column.
    label : str or None
        The label column, used when the header has it (default ``"label"``).

    Returns
    -------
    xs : float32 array, shape (n, width)
    labels : int64 array of shape (n,), or None without a label column
    names : the input columns used

    Raises
    ------
    ValueError
        When the file lacks the columns or a row does not parse (``DecodeError``
        names the file, line and column).
    """
    with open(path, encoding="utf-8") as f:
        header = [h.strip() for h in f.readline().rstrip("\r\n").split(delimiter)]
    use_label = label if label and label in header else None
    if columns is None:
        names = [h for h in header if h != use_label][:width]
    elif ":" in columns and "," not in columns:
        try:
            a, b = (int(t) if t.strip() else None for t in columns.split(":"))
        except ValueError:
            raise ValueError(f"columns {columns!r}: write START:STOP with integers, e.g. 0:{width}") from None
        names = header[slice(a, b)]
    else:
        names = [c.strip() for c in columns.split(",") if c.strip()]
        missing = [c for c in names if c not in header]
        if missing:
            raise ValueError(f"{path}: the header has no column {missing[0]!r} (columns {columns!r})")
    if len(names) != width:
        raise ValueError(f"{path}: {len(names)} input column(s) selected, but an input has {width} numbers; "
                         f"pick them with columns=START:STOP")
    decl = {n: "float32" for n in names}
    comps: list[Any] = [names]
    if use_label:
        decl[use_label] = "int64"
        comps.append(use_label)
    items = CsvDecoder(decl, components=comps, delimiter=delimiter).read_all(path)
    return items[0], (items[1] if use_label else None), names


def _positive(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{what} must be a number of seconds > 0, got {v!r}" if what in ("timeout", "duration")
                         else f"{what} must be a number > 0, got {v!r}")
    return float(v)


def _acquire(sem: threading.Semaphore, end: float | None) -> bool:
    """Take a permit, giving up (False) once ``end`` (a ``perf_counter`` time) passed."""
    if end is None:
        sem.acquire()
        return True
    while True:
        left = end - time.perf_counter()
        if left <= 0:
            return False
        if sem.acquire(timeout=min(left, 0.1)):
            return True
