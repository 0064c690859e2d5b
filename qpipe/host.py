"""The queue host: named queues behind one ZeroMQ endpoint, on an asyncio (uvloop) loop.

:class:`QueueHost` owns the op table, the queues, the deadlines and the
delivery of replies. It runs as callbacks on one event loop: the ROUTER
socket's file descriptor is watched with ``loop.add_reader`` and drained
without blocking, every request is handled to completion in one step, and a
request that must wait is parked in its queue's waiter list with a loop
timer for its deadline. So no request ever delays another, and a timed-out
or cancelled request is withdrawn in the same step that would have served it.

Ops (the method names of the client API, plus a few for tools)::

    declare, spec, enqueue, enqueue_many, dequeue, dequeue_many, dequeue_up_to,
    close, size, is_closed, cancel, put_back, writer_done, ping, stats, list

``writer_done`` counts distinct writers of a queue (``{"writer": "reader/1",
"writers": 4}``) and closes the queue when the last one reports, so a queue
fed by several processes is closed exactly once, after all of them.

:class:`QueueServer` runs a host on its own loop in a background thread
(``start``/``stop`` or a ``with`` block) or in the calling thread
(``serve_forever``, as ``qpipe serve`` does).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Any, Callable

import numpy as np
import zmq

from . import wire
from .errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    MessageTooLargeError,
    NotFoundError,
    ProtocolError,
    QueueError,
    UnavailableError,
)
from .queues import DequeueRequest, EnqueueRequest, Queue, as_rows, make_queue
from .spec import QueueSpec, _compatible, _shape_str, batch_nbytes
from .transport import bind_router, default_context, recv_frames, send_frames
from .xp import settings

__all__ = ["QueueHost", "QueueServer"]

log = logging.getLogger("qpipe.host")

_Req = EnqueueRequest | DequeueRequest


class _Token:
    """Who is waiting for a request's reply, and its deadline timer."""

    __slots__ = ("ident", "req_id", "queue", "timer", "op", "max_reply")

    def __init__(self, ident: bytes, req_id: Any, queue: Queue, op: str) -> None:
        self.ident = ident
        self.req_id = req_id
        self.queue = queue
        self.timer: asyncio.TimerHandle | None = None
        self.op = op
        self.max_reply: int | None = None


class QueueHost:
    """Serves queue requests arriving on a bound ROUTER socket; drive it from one loop.

    Parameters
    ----------
    sock : zmq.Socket
        A bound ROUTER socket (see :func:`qpipe.transport.bind_router`).
    loop : asyncio.AbstractEventLoop
        The loop whose thread owns ``sock``.
    max_message_size : int
        Largest request accepted, in bytes; larger ones get a
        :class:`MessageTooLargeError` reply.
    """

    def __init__(self, sock: zmq.Socket, loop: asyncio.AbstractEventLoop, max_message_size: int) -> None:
        self.sock = sock
        self.loop = loop
        self.max_message_size = max_message_size
        self.queues: dict[str, Queue] = {}
        self._waiting: dict[tuple[bytes, Any], tuple[Queue, _Req]] = {}
        self._writers_done: dict[str, set[str]] = {}
        self.requests = 0
        self.bad_requests = 0
        self.undeliverable = 0
        self._ops: dict[str, Callable[[bytes, Any, dict[str, Any], list[np.ndarray]], None]] = {
            "declare": self._declare,
            "spec": self._spec,
            "enqueue": self._enqueue,
            "enqueue_many": self._enqueue,
            "dequeue": self._dequeue,
            "dequeue_many": self._dequeue,
            "dequeue_up_to": self._dequeue,
            "close": self._close,
            "size": self._size,
            "is_closed": self._is_closed,
            "cancel": self._cancel,
            "put_back": self._put_back,
            "writer_done": self._writer_done,
            "ping": self._ping,
            "stats": self._stats,
            "list": self._list,
        }
        self._fd = sock.getsockopt(zmq.FD)
        loop.add_reader(self._fd, self._drain)
        # NOTE: ZeroMQ's FD is edge-triggered; messages that arrived before
        # add_reader would never wake us, so drain once now.
        loop.call_soon(self._drain)

    # -- socket ---------------------------------------------------------------------

    def _drain(self) -> None:
        sock = self.sock
        while True:
            try:
                frames = recv_frames(sock, block=False)
            except zmq.Again:
                return
            except zmq.ZMQError:
                if sock.closed:
                    return
                raise
            self._handle(frames)

    def _send(self, ident: bytes, header: dict[str, Any], arrays: list[np.ndarray] = ()) -> bool:
        frames = wire.encode(header, arrays)
        try:
            send_frames(self.sock, [ident, *frames], copy=len(frames) == 1, block=False)
            return True
        except zmq.ZMQError as e:
            if e.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                self.undeliverable += 1
                return False
            raise

    def _error(self, ident: bytes, req_id: Any, exc: QueueError) -> None:
        self._send(ident, wire.error_header(req_id, exc))

    def shutdown(self) -> None:
        """Fail every waiting request with :class:`UnavailableError` and stop reading."""
        try:
            self.loop.remove_reader(self._fd)
        except Exception:  # the loop may be closing already
            pass
        for (ident, req_id), (queue, req) in list(self._waiting.items()):
            token: _Token = req.token
            if token.timer is not None:
                token.timer.cancel()
            self._error(ident, req_id, UnavailableError(
                f"queue host is shutting down; {token.op} on queue {queue.name!r} was not served"))
        self._waiting.clear()

    # -- dispatch -------------------------------------------------------------------

    def _handle(self, frames: list[Any]) -> None:
        self.requests += 1
        if len(frames) < 2:
            self.bad_requests += 1
            return  # nothing to answer: a ROUTER always gets the identity, so this is empty
        ident = frames[0].bytes
        req_id = None
        try:
            header, arrays = wire.decode(frames[1:], self.max_message_size)
            req_id = header.get("id")
            if req_id is not None and (isinstance(req_id, bool) or not isinstance(req_id, (int, str))):
                bad, req_id = req_id, None
                raise ProtocolError(f"request id must be an integer or a string, got {type(bad).__name__}")
            op = header.get("op")
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ProtocolError(f"unknown op {op!r}; expected one of {', '.join(sorted(self._ops))}")
            handler(ident, req_id, header, arrays)
        except QueueError as e:
            self.bad_requests += 1
            if req_id is None:
                # The header may have decoded partially; best effort to echo an id.
                try:
                    h = wire.decode_header(frames[1])
                    req_id = h.get("id")
                except QueueError:
                    pass
            self._error(ident, req_id, e)
        except Exception as e:  # a bug: answer, log, keep serving
            self.bad_requests += 1
            log.exception("queue host failed on a request")
            self._error(ident, req_id, InternalError(f"queue host failed: {type(e).__name__}: {e}"))

    def _queue(self, header: dict[str, Any]) -> Queue:
        name = header.get("queue")
        if not isinstance(name, str):
            raise ProtocolError(f"request needs a queue name string, got {name!r}")
        q = self.queues.get(name)
        if q is None:
            raise NotFoundError(
                f"queue {name!r} does not exist on this host; declare it first (known: "
                f"{', '.join(sorted(self.queues)) or 'none'})")
        return q

    @staticmethod
    def _timeout(header: dict[str, Any]) -> float | None:
        t = header.get("timeout")
        if t is None:
            return None
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t != t:
            raise InvalidArgumentError(f"timeout must be a number of seconds or None, got {t!r}")
        return max(0.0, float(t))

    # -- ops ------------------------------------------------------------------------

    def _declare(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[Any]) -> None:
        name = header.get("queue")
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"queue name must be a non-empty string, got {name!r}")
        spec = QueueSpec.from_wire(header.get("spec"), queue=name)
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = make_queue(name, spec)
        elif q.spec != spec:
            raise InvalidArgumentError(
                f"queue {name!r} already exists as {q.spec.describe()}"
                f"{'' if q.spec.seed == spec.seed else f' seed={q.spec.seed}'}; "
                f"it cannot be declared again as {spec.describe()}"
                f"{'' if q.spec.seed == spec.seed else f' seed={spec.seed}'}")
        self._reply_spec(ident, req_id, q)

    def _spec(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[Any]) -> None:
        self._reply_spec(ident, req_id, self._queue(header))

    def _reply_spec(self, ident: bytes, req_id: Any, q: Queue) -> None:
        self._send(ident, {"id": req_id, "ok": True, "spec": q.spec.to_wire(),
                           "max_message_size": self.max_message_size})

    def _enqueue(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        q = self._queue(header)
        op = header["op"]
        timeout = self._timeout(header)
        block = self._block(q, op, arrays, op == "enqueue_many")
        req = EnqueueRequest(block, None, op)
        self._submit(ident, req_id, q, req, timeout, q.enqueue)

    @staticmethod
    def _block(q: Queue, op: str, arrays: list[np.ndarray], many: bool) -> list[np.ndarray]:
        """Check a peer's arrays against the queue's spec; return them as a block of rows."""
        spec = q.spec
        if len(arrays) != spec.arity:
            raise InvalidArgumentError(
                f"queue {q.name!r}: {op} got {len(arrays)} components, the queue takes {spec.arity}")
        dts = q.np_dtypes
        n = None
        block = []
        for c, a in enumerate(arrays):
            if a.dtype != dts[c]:
                raise InvalidArgumentError(
                    f"queue {q.name!r}: component {c} must be {spec.dtypes[c]}, got "
                    f"{'string' if a.dtype == object else a.dtype.name}")
            if many:
                if a.ndim == 0:
                    raise InvalidArgumentError(f"queue {q.name!r}: enqueue_many component {c} has no batch dimension")
                if n is None:
                    n = a.shape[0]
                elif a.shape[0] != n:
                    raise InvalidArgumentError(
                        f"queue {q.name!r}: batch components disagree on the batch size ({n} and {a.shape[0]})")
                row = a.shape[1:]
            else:
                row = a.shape
                a = a.reshape((1, *a.shape))
            if not _compatible(row, spec.shape(c)):
                raise InvalidArgumentError(
                    f"queue {q.name!r}: component {c} has shape {_shape_str(row)}, the queue expects "
                    f"{_shape_str(spec.shape(c))}")
            block.append(a)
        return block

    def _dequeue(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[Any]) -> None:
        q = self._queue(header)
        op = header["op"]
        timeout = self._timeout(header)
        if op == "dequeue":
            req = DequeueRequest(None)
        else:
            n = header.get("n")
            if isinstance(n, bool) or not isinstance(n, int):
                raise InvalidArgumentError(f"queue {q.name!r}: {op} needs an integer n, got {n!r}")
            req = DequeueRequest(n, up_to=op == "dequeue_up_to")
        limit = header.get("max_reply")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidArgumentError(f"max_reply must be a positive integer, got {limit!r}")
        self._submit(ident, req_id, q, req, timeout, q.dequeue, limit)

    def _submit(self, ident: bytes, req_id: Any, q: Queue, req: _Req, timeout: float | None,
                step: Callable[[Any], list], max_reply: int | None = None) -> None:
        token = _Token(ident, req_id, q, req.op)
        token.max_reply = max_reply
        req.token = token
        done = step(req)
        waiting = True
        for r, _ in done:
            if r is req:
                waiting = False
                break
        if waiting:
            if timeout is not None and timeout <= 0:
                done += q.cancel(req, self._deadline_error(q, req, 0.0))
            else:
                self._waiting[(ident, req_id)] = (q, req)
                if timeout is not None:
                    token.timer = self.loop.call_later(timeout, self._expire, q, req, timeout)
        self._deliver(q, done)

    def _deadline_error(self, q: Queue, req: _Req, timeout: float) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"queue {q.name!r}: {req.op} timed out after {timeout:g} s "
            f"(size {q.size()}, capacity {q.capacity}{', closed' if q.closed else ''})"
            f"{Queue.describe_progress(req)}")

    def _expire(self, q: Queue, req: _Req, timeout: float) -> None:
        req.token.timer = None
        self._deliver(q, q.cancel(req, self._deadline_error(q, req, timeout)))
        self._drain()

    def _deliver(self, q: Queue, done: list) -> None:
        # Replies may fail (client gone): undelivered rows go back to the
        # queue, which may complete other requests, hence the work list.
        while done:
            more: list = []
            for req, outcome in done:
                token: _Token = req.token
                if token is None:
                    continue
                self._waiting.pop((token.ident, token.req_id), None)
                if token.timer is not None:
                    token.timer.cancel()
                    token.timer = None
                if isinstance(outcome, QueueError):
                    self._error(token.ident, token.req_id, outcome)
                elif isinstance(req, EnqueueRequest):
                    self._send(token.ident, {"id": token.req_id, "ok": True, "n": outcome})
                elif token.max_reply is not None and batch_nbytes(outcome) + 4096 > token.max_reply:
                    # The client could not receive it (ZeroMQ would drop the connection
                    # and the rows with it): refuse, and keep the rows.
                    rows = as_rows(req.op, outcome)
                    more += q.put_back(rows)
                    self._error(token.ident, token.req_id, MessageTooLargeError(
                        f"queue {q.name!r}: the {req.op} reply would be {batch_nbytes(outcome)} bytes, more than "
                        f"this client accepts ({token.max_reply}); the rows stay in the queue"))
                else:
                    try:
                        sent = self._send(token.ident, {"id": token.req_id, "ok": True}, outcome)
                    except Exception as e:  # a bug; keep the rows and the other replies
                        log.exception("queue host could not send a %s reply on %r", req.op, q.name)
                        self._error(token.ident, token.req_id,
                                    InternalError(f"queue host failed to send the reply: {type(e).__name__}: {e}"))
                        sent = False
                    if not sent:
                        rows = as_rows(req.op, outcome)
                        log.warning("reply to %s on queue %r was not delivered; %d rows put back",
                                    req.op, q.name, rows[0].shape[0])
                        more += q.put_back(rows)
            done = more

    def _close(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[Any]) -> None:
        q = self._queue(header)
        cancel = bool(header.get("cancel_pending_enqueues", False))
        done = q.close(cancel)
        self._send(ident, {"id": req_id, "ok": True})
        self._deliver(q, done)

    def _size(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[Any]) -> None:
        self._send(ident, {"id": req_id, "ok": True, "size": self._queue(header).size()})

    def _is_closed(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[Any]) -> None:
        self._send(ident, {"id": req_id, "ok": True, "closed": self._queue(header).closed})

    def _cancel(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[Any]) -> None:
        # A client gave up on request `target`; withdraw it if it still waits.
        target = header.get("target")
        entry = self._waiting.get((ident, target))
        if entry is not None:
            q, req = entry
            self._deliver(q, q.cancel(req, DeadlineExceededError(
                f"queue {q.name!r}: {req.op} cancelled by the client{Queue.describe_progress(req)}")))
        self._send(ident, {"id": req_id, "ok": True, "cancelled": entry is not None})

    def _put_back(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        # Rows a client received for a request it had already abandoned.
        # NOTE: put_back restores rows that were in the queue, so it ignores
        # capacity and closing, as the in-host put-back of an undeliverable reply does.
        q = self._queue(header)
        block = self._block(q, "put_back", arrays, True)
        self._send(ident, {"id": req_id, "ok": True})
        if block[0].shape[0]:
            self._deliver(q, q.put_back(block))

    def _writer_done(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[Any]) -> None:
        q = self._queue(header)
        writer, writers = header.get("writer"), header.get("writers")
        if not isinstance(writer, str) or isinstance(writers, bool) or not isinstance(writers, int) or writers < 1:
            raise InvalidArgumentError(
                f"queue {q.name!r}: writer_done needs a writer name and a writer count >= 1, "
                f"got {writer!r} and {writers!r}")
        done = self._writers_done.setdefault(q.name, set())
        done.add(writer)
        closing = len(done) >= writers and not q.closed
        completions = q.close(False) if closing else []
        self._send(ident, {"id": req_id, "ok": True, "closed": closing, "done": len(done)})
        if closing:
            log.info("queue %r closed: all %d writers are done", q.name, writers)
        self._deliver(q, completions)

    def _ping(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[Any]) -> None:
        self._send(ident, {"id": req_id, "ok": True, "time": time.time()})

    def _stats(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[Any]) -> None:
        self._send(ident, {"id": req_id, "ok": True, "stats": self.stats()})

    def _list(self, ident: bytes, req_id: Any, header: dict[str, Any], arrays: list[Any]) -> None:
        self._send(ident, {"id": req_id, "ok": True,
                           "queues": {n: q.spec.to_wire() for n, q in self.queues.items()}})

    def stats(self) -> dict[str, Any]:
        """Counters for the host and every queue (a msgpack-friendly dict)."""
        return {
            "requests": self.requests,
            "bad_requests": self.bad_requests,
            "undeliverable": self.undeliverable,
            "queues": {n: q.stats() for n, q in self.queues.items()},
        }


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        log.warning("uvloop is not installed; the queue host runs on asyncio's default loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class QueueServer:
    """A queue host on its own event loop: ``with qpipe.QueueServer("tcp://127.0.0.1:0") as s: ...``.

    Parameters
    ----------
    address : str
        Endpoint to bind: ``tcp://HOST:PORT`` (port 0 picks a free port),
        ``ipc://PATH`` or ``inproc://NAME`` (same process, default context).
    max_message_size : int, optional
        Largest request the host accepts, in bytes (default
        ``QPIPE_MAX_MESSAGE_SIZE`` or 1 GiB). Larger requests are answered
        with :class:`qpipe.MessageTooLargeError`; frames over twice the limit
        make ZeroMQ drop the connection before buffering them.
    context : zmq.Context, optional
        ZeroMQ context (default: the process's shared one).
    queues : dict of str to QueueSpec, optional
        Queues to declare before the first request is served.

    Attributes
    ----------
    address : str
        The bound endpoint, with the real port; valid once started.
    """

    def __init__(self, address: str, *, max_message_size: int | None = None,
                 context: zmq.Context | None = None, queues: dict[str, QueueSpec] | None = None) -> None:
        self.requested_address = address
        self._initial_queues = dict(queues or {})
        self.max_message_size = int(max_message_size or settings().max_message_size)
        if self.max_message_size < 1024:
            raise InvalidArgumentError(f"max_message_size must be at least 1024 bytes, got {max_message_size}")
        self._ctx = context or default_context()
        self.address: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host: QueueHost | None = None
        self._started = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> QueueServer:
        """Bind and start serving in a background thread; returns once the socket is bound.

        Raises :class:`InvalidArgumentError` when the address cannot be bound
        and ``RuntimeError`` when the server was already started.
        """
        if self._thread is not None:
            raise RuntimeError(f"QueueServer({self.requested_address!r}) is already started")
        self._thread = threading.Thread(target=self._run, name=f"qpipe-host {self.requested_address}",
                                        daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"queue host {self.requested_address!r} did not start within {timeout} s")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def serve_forever(self, ready: Callable[[str], None] | None = None) -> None:
        """Serve in the calling thread until :meth:`stop`, SIGINT or SIGTERM.

        ``ready(address)`` is called once the socket is bound.
        """
        if self._thread is not None:
            raise RuntimeError(f"QueueServer({self.requested_address!r}) is already started")
        self._thread = threading.current_thread()
        self._run(ready=ready, signals=threading.current_thread() is threading.main_thread())
        if self._error is not None:
            raise self._error

    def _run(self, ready: Callable[[str], None] | None = None, signals: bool = False) -> None:
        loop = self._loop = _new_loop()
        sock = None
        try:
            sock, self.address = bind_router(self._ctx, self.requested_address, 2 * self.max_message_size)
            self._host = QueueHost(sock, loop, self.max_message_size)
            for name, spec in self._initial_queues.items():
                self._host.queues[name] = make_queue(name, spec)
            if signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, loop.stop)
        except BaseException as e:
            self._error = e
            self._started.set()
            if sock is not None:
                sock.close(0)
            loop.close()
            return
        self._started.set()
        if ready is not None:
            ready(self.address)
        try:
            if not self._stopping:
                loop.run_forever()
        finally:
            self._host.shutdown()
            sock.close(0)
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and release the socket; waiting requests fail with :class:`UnavailableError`.

        Safe to call twice and from any thread.
        """
        self._stopping = True
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass  # loop already closed
        if thread is not threading.current_thread() and thread.is_alive():
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"queue host {self.address!r} did not stop within {timeout} s")

    def __enter__(self) -> QueueServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """The host's counters, read safely from another thread."""
        host, loop = self._host, self._loop
        if host is None or loop is None or loop.is_closed():
            raise RuntimeError("QueueServer is not running")
        fut: Any = asyncio.run_coroutine_threadsafe(_call(host.stats), loop)
        return fut.result(timeout)

    def __repr__(self) -> str:
        return f"QueueServer({self.address or self.requested_address!r})"


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()
