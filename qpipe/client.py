"""Clients of a queue host: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both share :class:`_ClientBase` and :class:`_QueueBase`, which do everything
that needs no I/O: check an item against the queue's spec *before* anything
is sent, build request headers, decode replies and raise the mapped error.
The two flavours add only the lines that move frames.

Deadlines belong to the host: a blocking call sends its timeout, the host
withdraws the request when it expires and answers
:class:`~qpipe.DeadlineExceededError`, leaving the queue unchanged. The
client's own timer is slightly longer and only guards a dead transport; when
it fires the client tells the host to cancel the request and, should rows
arrive for it later, sends them back (so a late reply loses nothing). While a
call waits, the client pings the host; after ``liveness`` seconds without
any answer it raises :class:`~qpipe.UnavailableError`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from . import wire
from .errors import (
    InvalidArgumentError,
    MessageTooLargeError,
    NoReplyError,
    QueueError,
    UnavailableError,
    error_from_code,
)
from .queues import as_rows
from .spec import ItemChecker, QueueSpec
from .transport import check_address, connect_dealer, default_context, recv_frames, send_frames
from .xp import settings

__all__ = ["AsyncClient", "AsyncQueue", "Client", "Queue", "aconnect", "connect"]

log = logging.getLogger("qpipe.client")


class _Default:
    def __repr__(self) -> str:
        return "<client default>"


DEFAULT: Any = _Default()
_COPY_THRESHOLD = 1 << 16
_DEQUEUE_OPS = ("dequeue", "dequeue_many", "dequeue_up_to")


def _send_nowait(sock: zmq.Socket, frames: list[Any]) -> bool:
    """Send without blocking (a socket whose connection dropped would block forever)."""
    try:
        zmq.Socket.send_multipart(sock, frames, flags=zmq.NOBLOCK, copy=True)
        return True
    except zmq.Again:
        return False


def _grace(timeout: float) -> float:
    # How much longer than the host's deadline the client waits for its reply.
    return 0.25 + 0.05 * timeout


class _ClientBase:
    """I/O-free part of a client: settings, request ids, headers, reply decoding."""

    def __init__(self, address: str, timeout: float | None, liveness: float | None,
                 max_message_size: int | None) -> None:
        env = settings()
        self.address = check_address(address)
        self.timeout = env.timeout if timeout is DEFAULT else timeout
        self.liveness = float(liveness or env.liveness)
        # Until the host tells us its limit (in every spec reply), check against ours.
        self.max_message_size = int(max_message_size or env.max_message_size)
        self._host_limit: int | None = None
        self._inproc = self.address.startswith("inproc://")
        self._ids = itertools.count(1)
        self._closed = False

    def _timeout(self, timeout: Any) -> float | None:
        t = self.timeout if timeout is DEFAULT else timeout
        if t is None:
            return None
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t != t or t < 0:
            raise InvalidArgumentError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
        return float(t)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} for {self.address} is closed")

    def _frames(self, op: str, fields: dict[str, Any], arrays: Sequence[np.ndarray]) -> tuple[int, list[Any], bool]:
        self._check_open()
        req_id = next(self._ids)
        header = {"op": op, "id": req_id}
        header.update(fields)
        if op in _DEQUEUE_OPS:
            header["max_reply"] = self.max_message_size  # larger replies come back as an error
        frames = wire.encode(header, arrays)
        size = wire.frames_nbytes(frames) if arrays else len(frames[0])
        limit = self._host_limit or self.max_message_size
        if size > limit:
            raise MessageTooLargeError(
                f"queue {fields.get('queue')!r}: {op} message of {size} bytes exceeds the queue host's "
                f"maximum message size of {limit} bytes (QueueServer(max_message_size=...))")
        # NOTE: over inproc a zero-copy send would let the queued item share memory
        # with the caller's array (same process), so inproc always copies.
        return req_id, frames, size < _COPY_THRESHOLD or self._inproc

    def _result(self, header: dict[str, Any]) -> dict[str, Any]:
        if "error" in header:
            raise error_from_code(header.get("error"), str(header.get("message", "")))
        limit = header.get("max_message_size")
        if type(limit) is int:
            self._host_limit = limit
        return header

    def _no_reply(self, op: str, queue: Any, waited: float, liveness: bool) -> QueueError:
        what = f"{op} on queue {queue!r}" if queue is not None else op
        if liveness:
            return UnavailableError(
                f"queue host {self.address} has not answered for {waited:.1f} s during {what}; "
                "it may be down or unreachable")
        return NoReplyError(
            f"no reply from queue host {self.address} to {what} within {waited:.2f} s; "
            "the host may be down, unreachable or overloaded")

    def _cancel_frames(self, target: int) -> list[Any]:
        """Ask the host to withdraw request ``target`` (we gave up waiting for it)."""
        return [wire.encode({"op": "cancel", "id": next(self._ids), "target": target})[0]]

    def _put_back_frames(self, op: str, queue: Any, header: dict[str, Any],
                         arrays: list[np.ndarray]) -> list[Any] | None:
        """Frames returning the rows of a dequeue reply nobody will consume; None if it carried none."""
        if op not in _DEQUEUE_OPS or not header.get("ok") or not arrays:
            return None
        return wire.encode({"op": "put_back", "id": next(self._ids), "queue": queue}, as_rows(op, arrays))


class _QueueBase:
    """I/O-free part of a queue handle: item checks and result shaping."""

    def __init__(self, name: str, spec: QueueSpec) -> None:
        self.name = name
        self.spec = spec
        self._checker = ItemChecker(spec, name)
        self._arity = spec.arity

    @property
    def dtypes(self) -> tuple[str, ...]:
        """Component dtype names."""
        return self.spec.dtypes

    @property
    def shapes(self) -> tuple[Any, ...] | None:
        """Component shapes (``None`` entries: unknown dimensions)."""
        return self.spec.shapes

    @property
    def names(self) -> tuple[str, ...] | None:
        return self.spec.names

    def _shape_result(self, arrays: list[np.ndarray]) -> Any:
        if len(arrays) != self._arity:
            raise QueueError(f"queue {self.name!r}: reply has {len(arrays)} components, expected {self._arity}")
        return arrays[0] if self._arity == 1 else tuple(arrays)

    @staticmethod
    def _n(n: Any, op: str) -> int:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"{op}: n must be an integer, got {type(n).__name__}")
        if n < 0:
            raise InvalidArgumentError(f"{op}: n must be >= 0, got {n}")
        return int(n)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.spec.describe()}>"


# -- blocking -----------------------------------------------------------------------------


class Client(_ClientBase):
    """A blocking client of one queue host; thread-safe (each thread gets its own socket).

    Create with :func:`connect`. Connecting never blocks: ZeroMQ connects in
    the background, so the first call waits for the host to come up (bounded
    by its timeout and by ``liveness``).

    Parameters
    ----------
    address : str
        The host's endpoint, e.g. ``"tcp://127.0.0.1:5555"``.
    timeout : float or None, optional
        Default timeout in seconds of every blocking call that does not pass
        its own (default ``QPIPE_TIMEOUT``, else wait forever).
    liveness : float, optional
        Seconds without any answer from the host before a waiting call
        raises :class:`~qpipe.UnavailableError` (default ``QPIPE_LIVENESS``, 10).
    max_message_size : int, optional
        Largest message this client sends or receives, in bytes.
    context : zmq.Context, optional
        ZeroMQ context (default: the process's shared one, needed for inproc://).
    """

    def __init__(self, address: str, *, timeout: float | None = DEFAULT, liveness: float | None = None,
                 max_message_size: int | None = None, context: zmq.Context | None = None) -> None:
        super().__init__(address, timeout, liveness, max_message_size)
        self._ctx = context or default_context()
        self._local = threading.local()
        self._sockets: list[tuple[threading.Thread, zmq.Socket]] = []
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Close every socket of this client. Calls made afterwards raise ``RuntimeError``."""
        with self._lock:
            self._closed = True
            for _, s in self._sockets:
                s.close(0)
            self._sockets.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _socket(self) -> zmq.Socket:
        state = self._local.__dict__
        sock = state.get("sock")
        if sock is None or sock.closed:
            with self._lock:
                self._check_open()
                # Sockets of threads that have ended are closed here, so a program
                # that calls from many short-lived threads does not leak them.
                alive = []
                for t, s in self._sockets:
                    if t.is_alive():
                        alive.append((t, s))
                    else:
                        s.close(0)
                sock = connect_dealer(self._ctx, self.address, 2 * self.max_message_size)
                alive.append((threading.current_thread(), sock))
                self._sockets = alive
            state["sock"] = sock
            state["abandoned"] = {}
        return sock

    # -- the one I/O path -----------------------------------------------------------------

    def _call(self, op: str, fields: dict[str, Any], arrays: Sequence[np.ndarray] = (),
              timeout: float | None = None) -> tuple[dict[str, Any], list[np.ndarray]]:
        req_id, frames, small = self._frames(op, fields, arrays)
        sock = self._socket()
        send_frames(sock, frames, copy=small)
        start = now = time.monotonic()
        guard = None if timeout is None else start + timeout + _grace(timeout)
        last_rx = start
        pinged = False
        beat = self.liveness / 3
        abandoned: dict[int, tuple[str, Any]] = self._local.abandoned
        while True:
            wait = beat if guard is None else min(beat, max(0.0, guard - now))
            if sock.poll(int(wait * 1000) + 1, zmq.POLLIN):
                header, out = wire.decode(recv_frames(sock), None)
                now = last_rx = time.monotonic()
                pinged = False
                rid = header.get("id")
                if rid == req_id:
                    return self._result(header), out
                if rid in abandoned:
                    self._late_reply(sock, abandoned.pop(rid), header, out)
                continue
            now = time.monotonic()
            if guard is not None and now >= guard:
                self._abandon(sock, req_id, op, fields.get("queue"))
                raise self._no_reply(op, fields.get("queue"), now - start, liveness=False)
            if now - last_rx >= self.liveness:
                self._abandon(sock, req_id, op, fields.get("queue"))
                raise self._no_reply(op, fields.get("queue"), now - last_rx, liveness=True)
            if not pinged and now - last_rx >= beat:
                _send_nowait(sock, [wire.encode({"op": "ping", "id": next(self._ids)})[0]])
                pinged = True

    def _abandon(self, sock: zmq.Socket, req_id: int, op: str, queue: Any) -> None:
        self._local.abandoned[req_id] = (op, queue)
        if op in _DEQUEUE_OPS or op in ("enqueue", "enqueue_many"):
            _send_nowait(sock, self._cancel_frames(req_id))

    def _late_reply(self, sock: zmq.Socket, what: tuple[str, Any], header: dict[str, Any],
                    arrays: list[np.ndarray]) -> None:
        frames = self._put_back_frames(*what, header, arrays)
        if frames is not None:
            _send_nowait(sock, frames)

    # -- declarations -------------------------------------------------------------------

    def _declare(self, name: str, spec: QueueSpec, timeout: Any) -> Queue:
        header, _ = self._call("declare", {"queue": name, "spec": spec.to_wire()}, (), self._timeout(timeout))
        return Queue(self, name, QueueSpec.from_wire(header["spec"], name))

    def fifo_queue(self, name: str, capacity: int, dtypes: Sequence[Any], shapes: Sequence[Any] | None = None,
                   names: Sequence[str] | None = None, *, timeout: Any = DEFAULT) -> Queue:
        """Declare (or join) a FIFO queue on the host and return its handle.

        Declaring is idempotent by name; a different spec for an existing
        name raises :class:`~qpipe.InvalidArgumentError`.
        """
        return self._declare(name, QueueSpec.make("fifo", capacity, dtypes, shapes, names=names, queue=name),
                             timeout)

    def shuffle_queue(self, name: str, capacity: int, min_after_dequeue: int, dtypes: Sequence[Any],
                      shapes: Sequence[Any] | None = None, seed: int | None = None,
                      names: Sequence[str] | None = None, *, timeout: Any = DEFAULT) -> Queue:
        """Declare (or join) a random-shuffle queue; see :meth:`fifo_queue`.

        Dequeues take random rows and leave at least ``min_after_dequeue`` rows
        until the queue is closed. ``seed`` makes the order reproducible.
        """
        return self._declare(name, QueueSpec.make("shuffle", capacity, dtypes, shapes, min_after_dequeue,
                                                  seed, names, queue=name), timeout)

    def padding_queue(self, name: str, capacity: int, dtypes: Sequence[Any], shapes: Sequence[Any],
                      names: Sequence[str] | None = None, *, timeout: Any = DEFAULT) -> Queue:
        """Declare (or join) a padding FIFO queue; ``None`` dimensions are zero-padded per batch."""
        return self._declare(name, QueueSpec.make("padding", capacity, dtypes, shapes, names=names, queue=name),
                             timeout)

    def queue(self, name: str, *, timeout: Any = DEFAULT) -> Queue:
        """A handle to an existing queue, with its spec fetched from the host.

        Raises :class:`~qpipe.NotFoundError` when the host has no such queue.
        """
        header, _ = self._call("spec", {"queue": name}, (), self._timeout(timeout))
        return Queue(self, name, QueueSpec.from_wire(header["spec"], name))

    def ping(self, *, timeout: Any = DEFAULT) -> float:
        """Round-trip to the host; returns the seconds it took."""
        t = time.perf_counter()
        self._call("ping", {}, (), self._timeout(timeout))
        return time.perf_counter() - t

    def stats(self, *, timeout: Any = DEFAULT) -> dict[str, Any]:
        """The host's counters and every queue's size, totals and waiters."""
        return self._call("stats", {}, (), self._timeout(timeout))[0]["stats"]

    def list_queues(self, *, timeout: Any = DEFAULT) -> dict[str, QueueSpec]:
        """Every queue the host holds, by name."""
        qs = self._call("list", {}, (), self._timeout(timeout))[0]["queues"]
        return {n: QueueSpec.from_wire(s, n) for n, s in qs.items()}

    def __repr__(self) -> str:
        return f"<Client {self.address}{' closed' if self._closed else ''}>"


class Queue(_QueueBase):
    """A handle to a queue on a host, for blocking calls; thread-safe.

    Every blocking call takes ``timeout`` in seconds (``None``: wait forever;
    omitted: the client's default). On expiry it raises
    :class:`~qpipe.DeadlineExceededError` and the queue is unchanged (an
    ``enqueue_many`` keeps the rows it already inserted and says how many).
    """

    def __init__(self, client: Client, name: str, spec: QueueSpec) -> None:
        super().__init__(name, spec)
        self.client = client

    def enqueue(self, item: Any, timeout: Any = DEFAULT) -> None:
        """Add one item; blocks while the queue is full.

        ``item`` is a tuple or list with one array-like per component (a bare
        array or scalar for a one-component queue). Raises
        :class:`~qpipe.InvalidArgumentError` (before sending) for a wrong
        arity, dtype or shape, :class:`~qpipe.QueueClosedError` when the queue
        is closed, :class:`~qpipe.DeadlineExceededError` on timeout.
        """
        c = self.client
        c._call("enqueue", {"queue": self.name, "timeout": c._timeout(timeout)},
                self._checker.check_item(item), c._timeout(timeout))

    def enqueue_many(self, items: Any, timeout: Any = DEFAULT) -> None:
        """Add a batch (each component has a leading batch dimension) as room appears.

        Not all-or-nothing: a batch larger than the capacity works, rows going
        in as consumers make room. Raises as :meth:`enqueue`.
        """
        arrays, _ = self._checker.check_batch(items)
        c = self.client
        c._call("enqueue_many", {"queue": self.name, "timeout": c._timeout(timeout)}, arrays, c._timeout(timeout))

    def dequeue(self, timeout: Any = DEFAULT) -> Any:
        """Remove and return one item; blocks while the queue is empty.

        Returns a tuple of arrays (the bare array for a one-component queue).
        Raises :class:`~qpipe.OutOfRangeError` when the queue is closed and
        empty, :class:`~qpipe.DeadlineExceededError` on timeout.
        """
        c = self.client
        t = c._timeout(timeout)
        return self._shape_result(c._call("dequeue", {"queue": self.name, "timeout": t}, (), t)[1])

    def dequeue_many(self, n: int, timeout: Any = DEFAULT) -> Any:
        """Remove ``n`` items and return them stacked along a new leading dimension.

        Blocks until ``n`` items arrived (``n`` may exceed the capacity).
        Raises :class:`~qpipe.OutOfRangeError` when the queue is closed with
        fewer than ``n`` items left (they stay in the queue).
        """
        c = self.client
        t = c._timeout(timeout)
        n = self._n(n, "dequeue_many")
        return self._shape_result(c._call("dequeue_many", {"queue": self.name, "n": n, "timeout": t}, (), t)[1])

    def dequeue_up_to(self, n: int, timeout: Any = DEFAULT) -> Any:
        """As :meth:`dequeue_many`, except that once the queue is closed it returns what is left (≥ 1)."""
        c = self.client
        t = c._timeout(timeout)
        n = self._n(n, "dequeue_up_to")
        return self._shape_result(c._call("dequeue_up_to", {"queue": self.name, "n": n, "timeout": t}, (), t)[1])

    def close(self, cancel_pending_enqueues: bool = False, timeout: Any = DEFAULT) -> None:
        """Close the queue: later enqueues fail; dequeues drain what is left, then fail.

        Waiting enqueues are still honoured unless ``cancel_pending_enqueues``.
        Raises :class:`~qpipe.QueueClosedError` if already closed (without cancel).
        """
        c = self.client
        c._call("close", {"queue": self.name, "cancel_pending_enqueues": bool(cancel_pending_enqueues)},
                (), c._timeout(timeout))

    def size(self, timeout: Any = DEFAULT) -> int:
        """Number of items in the queue now."""
        c = self.client
        return c._call("size", {"queue": self.name}, (), c._timeout(timeout))[0]["size"]

    def is_closed(self, timeout: Any = DEFAULT) -> bool:
        """Whether the queue is closed."""
        c = self.client
        return c._call("is_closed", {"queue": self.name}, (), c._timeout(timeout))[0]["closed"]


def connect(address: str, **kwargs: Any) -> Client:
    """Return a blocking :class:`Client` of the queue host at ``address`` (see :class:`Client`)."""
    return Client(address, **kwargs)


# -- asyncio ------------------------------------------------------------------------------


class AsyncClient(_ClientBase):
    """An asyncio client of one queue host; use it from the loop that created it.

    Create with ``await qpipe.aconnect(address)``. Same methods as
    :class:`Client`, as coroutines. Any number of coroutines may wait on it at
    once; cancelling one withdraws its request on the host (rows that were
    already on their way are sent back).
    """

    def __init__(self, address: str, *, timeout: float | None = DEFAULT, liveness: float | None = None,
                 max_message_size: int | None = None, context: zmq.Context | None = None) -> None:
        super().__init__(address, timeout, liveness, max_message_size)
        actx = zmq.asyncio.Context.shadow((context or default_context()).underlying)
        self._sock = connect_dealer(actx, self.address, 2 * self.max_message_size)
        self._pending: dict[int, tuple[asyncio.Future, str, Any]] = {}
        self._abandoned: dict[int, tuple[str, Any]] = {}
        self._reader: asyncio.Task | None = None
        self._last_rx = time.monotonic()

    async def aclose(self) -> None:
        """Close the socket; waiting calls fail with ``RuntimeError``."""
        self.close()

    def close(self, timeout: float = 2.0) -> None:
        """Close the socket; calls still waiting fail with ``RuntimeError``.

        Requests still waiting on the host are withdrawn first (cancel, then
        up to ``timeout`` seconds for the host's answers; rows that were
        already on their way are sent back), so closing loses no item.
        """
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
        pending = dict(self._pending)
        self._pending.clear()
        for fut, _, _ in pending.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"AsyncClient for {self.address} was closed"))
        waiting = {rid: (op, q) for rid, (_, op, q) in pending.items() if op in _DEQUEUE_OPS}
        if waiting:
            self._withdraw(waiting, timeout)
        self._sock.close(0)

    def _withdraw(self, waiting: dict[int, tuple[str, Any]], timeout: float) -> None:
        # A blocking view of the same socket: the reader task is gone, and the
        # host routes replies by this socket's identity.
        sock = zmq.Socket.shadow(self._sock.underlying)
        for rid in waiting:
            _send_nowait(sock, self._cancel_frames(rid))
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            if not sock.poll(max(1, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
                break
            try:
                header, arrays = wire.decode(sock.recv_multipart(copy=False), None)
            except QueueError:
                continue
            what = waiting.pop(header.get("id"), None)
            frames = None if what is None else self._put_back_frames(*what, header, arrays)
            if frames is not None:
                _send_nowait(sock, frames)
        if waiting:
            log.warning("AsyncClient for %s closed with %d request(s) the host did not confirm withdrawn",
                        self.address, len(waiting))
        sock.setsockopt(zmq.LINGER, int(timeout * 1000))  # let the put_backs go out

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _read(self) -> None:
        sock = self._sock
        beat = self.liveness / 3
        pinged = False
        while True:
            if not await sock.poll(int(beat * 1000) + 1, zmq.POLLIN):
                now = time.monotonic()
                if not self._pending:
                    self._last_rx = now
                    continue
                if now - self._last_rx >= self.liveness:
                    waited = now - self._last_rx
                    for rid, (fut, op, queue) in list(self._pending.items()):
                        if not fut.done():
                            fut.set_exception(self._no_reply(op, queue, waited, liveness=True))
                        self._forget(rid, op, queue)
                    self._pending.clear()
                    continue
                if not pinged:
                    await sock.send(wire.encode({"op": "ping", "id": next(self._ids)})[0])
                    pinged = True
                continue
            frames = await sock.recv_multipart(copy=False)
            self._last_rx = time.monotonic()
            pinged = False
            try:
                header, arrays = wire.decode(frames, None)
            except QueueError:
                continue
            rid = header.get("id")
            entry = self._pending.pop(rid, None)
            if entry is not None:
                fut = entry[0]
                if not fut.done():
                    fut.set_result((header, arrays))
                    continue
                self._abandoned[rid] = entry[1:]
            what = self._abandoned.pop(rid, None)
            frames = None if what is None else self._put_back_frames(*what, header, arrays)
            if frames is not None:
                await sock.send_multipart(frames, copy=False)

    def _forget(self, rid: int, op: str, queue: Any) -> None:
        self._abandoned[rid] = (op, queue)
        if op in _DEQUEUE_OPS or op in ("enqueue", "enqueue_many"):
            _send_nowait(self._sock, self._cancel_frames(rid))

    async def _call(self, op: str, fields: dict[str, Any], arrays: Sequence[np.ndarray] = (),
                    timeout: float | None = None) -> tuple[dict[str, Any], list[np.ndarray]]:
        req_id, frames, small = self._frames(op, fields, arrays)
        if self._reader is None or self._reader.done():
            if self._reader is not None and self._reader.done() and not self._reader.cancelled():
                exc = self._reader.exception()
                if exc is not None:
                    raise RuntimeError(f"AsyncClient reader for {self.address} failed: {exc!r}") from exc
            self._last_rx = time.monotonic()
            self._reader = asyncio.get_running_loop().create_task(self._read())
        fut = asyncio.get_running_loop().create_future()
        self._pending[req_id] = (fut, op, fields.get("queue"))
        if len(self._pending) == 1:  # the liveness clock starts with the first waiting call
            self._last_rx = time.monotonic()
        await self._sock.send_multipart(frames, copy=small)
        start = time.monotonic()
        try:
            if timeout is None:
                header, out = await fut
            else:
                header, out = await asyncio.wait_for(asyncio.shield(fut), timeout + _grace(timeout))
        except asyncio.TimeoutError:
            self._pending.pop(req_id, None)
            self._forget(req_id, op, fields.get("queue"))
            raise self._no_reply(op, fields.get("queue"), time.monotonic() - start, liveness=False) from None
        except asyncio.CancelledError:
            if self._pending.pop(req_id, None) is not None and not self._closed:
                self._forget(req_id, op, fields.get("queue"))
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                # Served but not consumed: send the rows back.
                header, out = fut.result()
                frames = self._put_back_frames(op, fields.get("queue"), header, out)
                if frames is not None and not self._closed:
                    self._sock.send_multipart(frames, copy=False)
            raise
        return self._result(header), out

    # -- declarations (as Client) ---------------------------------------------------------

    async def _declare(self, name: str, spec: QueueSpec, timeout: Any) -> AsyncQueue:
        header, _ = await self._call("declare", {"queue": name, "spec": spec.to_wire()}, (), self._timeout(timeout))
        return AsyncQueue(self, name, QueueSpec.from_wire(header["spec"], name))

    async def fifo_queue(self, name: str, capacity: int, dtypes: Sequence[Any],
                         shapes: Sequence[Any] | None = None, names: Sequence[str] | None = None,
                         *, timeout: Any = DEFAULT) -> AsyncQueue:
        """Declare (or join) a FIFO queue; see :meth:`Client.fifo_queue`."""
        return await self._declare(name, QueueSpec.make("fifo", capacity, dtypes, shapes, names=names, queue=name),
                                   timeout)

    async def shuffle_queue(self, name: str, capacity: int, min_after_dequeue: int, dtypes: Sequence[Any],
                            shapes: Sequence[Any] | None = None, seed: int | None = None,
                            names: Sequence[str] | None = None, *, timeout: Any = DEFAULT) -> AsyncQueue:
        """Declare (or join) a random-shuffle queue; see :meth:`Client.shuffle_queue`."""
        return await self._declare(name, QueueSpec.make("shuffle", capacity, dtypes, shapes, min_after_dequeue,
                                                        seed, names, queue=name), timeout)

    async def padding_queue(self, name: str, capacity: int, dtypes: Sequence[Any], shapes: Sequence[Any],
                            names: Sequence[str] | None = None, *, timeout: Any = DEFAULT) -> AsyncQueue:
        """Declare (or join) a padding FIFO queue; see :meth:`Client.padding_queue`."""
        return await self._declare(name, QueueSpec.make("padding", capacity, dtypes, shapes, names=names,
                                                        queue=name), timeout)

    async def queue(self, name: str, *, timeout: Any = DEFAULT) -> AsyncQueue:
        """A handle to an existing queue; see :meth:`Client.queue`."""
        header, _ = await self._call("spec", {"queue": name}, (), self._timeout(timeout))
        return AsyncQueue(self, name, QueueSpec.from_wire(header["spec"], name))

    async def ping(self, *, timeout: Any = DEFAULT) -> float:
        t = time.perf_counter()
        await self._call("ping", {}, (), self._timeout(timeout))
        return time.perf_counter() - t

    async def stats(self, *, timeout: Any = DEFAULT) -> dict[str, Any]:
        return (await self._call("stats", {}, (), self._timeout(timeout)))[0]["stats"]

    async def list_queues(self, *, timeout: Any = DEFAULT) -> dict[str, QueueSpec]:
        qs = (await self._call("list", {}, (), self._timeout(timeout)))[0]["queues"]
        return {n: QueueSpec.from_wire(s, n) for n, s in qs.items()}

    def __repr__(self) -> str:
        return f"<AsyncClient {self.address}{' closed' if self._closed else ''}>"


class AsyncQueue(_QueueBase):
    """A queue handle for :class:`AsyncClient`; the methods of :class:`Queue`, as coroutines."""

    def __init__(self, client: AsyncClient, name: str, spec: QueueSpec) -> None:
        super().__init__(name, spec)
        self.client = client

    async def enqueue(self, item: Any, timeout: Any = DEFAULT) -> None:
        """See :meth:`Queue.enqueue`."""
        c = self.client
        t = c._timeout(timeout)
        await c._call("enqueue", {"queue": self.name, "timeout": t}, self._checker.check_item(item), t)

    async def enqueue_many(self, items: Any, timeout: Any = DEFAULT) -> None:
        """See :meth:`Queue.enqueue_many`."""
        arrays, _ = self._checker.check_batch(items)
        c = self.client
        t = c._timeout(timeout)
        await c._call("enqueue_many", {"queue": self.name, "timeout": t}, arrays, t)

    async def dequeue(self, timeout: Any = DEFAULT) -> Any:
        """See :meth:`Queue.dequeue`."""
        c = self.client
        t = c._timeout(timeout)
        return self._shape_result((await c._call("dequeue", {"queue": self.name, "timeout": t}, (), t))[1])

    async def dequeue_many(self, n: int, timeout: Any = DEFAULT) -> Any:
        """See :meth:`Queue.dequeue_many`."""
        c = self.client
        t = c._timeout(timeout)
        n = self._n(n, "dequeue_many")
        return self._shape_result((await c._call("dequeue_many", {"queue": self.name, "n": n, "timeout": t}, (), t))[1])

    async def dequeue_up_to(self, n: int, timeout: Any = DEFAULT) -> Any:
        """See :meth:`Queue.dequeue_up_to`."""
        c = self.client
        t = c._timeout(timeout)
        n = self._n(n, "dequeue_up_to")
        return self._shape_result(
            (await c._call("dequeue_up_to", {"queue": self.name, "n": n, "timeout": t}, (), t))[1])

    async def close(self, cancel_pending_enqueues: bool = False, timeout: Any = DEFAULT) -> None:
        """See :meth:`Queue.close`."""
        c = self.client
        await c._call("close", {"queue": self.name, "cancel_pending_enqueues": bool(cancel_pending_enqueues)},
                      (), c._timeout(timeout))

    async def size(self, timeout: Any = DEFAULT) -> int:
        """See :meth:`Queue.size`."""
        c = self.client
        return (await c._call("size", {"queue": self.name}, (), c._timeout(timeout)))[0]["size"]

    async def is_closed(self, timeout: Any = DEFAULT) -> bool:
        """See :meth:`Queue.is_closed`."""
        c = self.client
        return (await c._call("is_closed", {"queue": self.name}, (), c._timeout(timeout)))[0]["closed"]


async def aconnect(address: str, **kwargs: Any) -> AsyncClient:
    """Return an :class:`AsyncClient` of the queue host at ``address`` (see :class:`Client`)."""
    return AsyncClient(address, **kwargs)
