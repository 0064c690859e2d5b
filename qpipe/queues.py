# Pure state machines: no I/O, no event loop, no clock. The host drives them.
"""FIFO, random-shuffle and padding FIFO queues with TensorFlow's semantics.

A queue holds items (tuples of arrays) and two lists of waiting requests, one
for enqueues and one for dequeues, each served strictly in arrival order.
Every step (:meth:`Queue.enqueue`, :meth:`Queue.dequeue`, :meth:`Queue.close`,
:meth:`Queue.cancel`, :meth:`Queue.put_back`) returns the requests it
*completed*, as ``(request, outcome)`` pairs where the outcome is the result
or a :class:`~qpipe.errors.QueueError`; a request not in the list is still
waiting. The host adds deadlines by calling :meth:`Queue.cancel`, which
removes the request in the same step and leaves the queue as it was.

Items are stored as *blocks*: one array per component sharing a leading
batch dimension, so an ``enqueue_many`` of 1000 rows is one block and a
``dequeue_many(1000)`` that lines up with it returns the arrays it came in,
without copying.

Semantics (TensorFlow's, with its data-loss cases fixed):

* ``enqueue_many`` inserts rows as room appears, so a batch larger than the
  capacity works; ``dequeue_many(n)`` collects rows as they arrive, so
  ``n > capacity`` works too. While it waits, the rows it collected are out of
  the queue (``size()`` does not count them), as in TensorFlow.
* A dequeue that can no longer be satisfied (queue closed, no enqueue waiting,
  too few rows) fails with :class:`OutOfRangeError` and puts what it collected
  back at the front, in order; ``dequeue_up_to`` instead returns what it has
  (at least one row).
* ``close(cancel_pending_enqueues=True)`` fails the waiting enqueues with
  :class:`QueueClosedError`; rows they already inserted stay.
* A shuffle queue keeps ``min_after_dequeue`` rows after every dequeue until
  it is closed.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, OutOfRangeError, QueueClosedError, QueueError
from .spec import QueueSpec, pad_stack

__all__ = ["DequeueRequest", "EnqueueRequest", "Queue", "as_rows", "make_queue"]

Block = list[np.ndarray]  # one array per component, common leading dimension
Outcome = Any  # a result, or a QueueError instance
Completion = tuple["EnqueueRequest | DequeueRequest", Outcome]


class EnqueueRequest:
    """A pending ``enqueue`` (one row) or ``enqueue_many``; ``token`` is the host's."""

    __slots__ = ("block", "total", "done", "token", "op")

    def __init__(self, block: Block, token: Any = None, op: str = "enqueue_many") -> None:
        self.block = block
        self.total = block[0].shape[0]
        self.done = 0
        self.token = token
        self.op = op


class DequeueRequest:
    """A pending ``dequeue`` (``n=None``), ``dequeue_many(n)`` or ``dequeue_up_to(n)``."""

    __slots__ = ("n", "up_to", "parts", "got", "token", "op")

    def __init__(self, n: int | None, up_to: bool = False, token: Any = None) -> None:
        self.n = 1 if n is None else n
        self.up_to = up_to
        self.parts: list[Block] = []
        self.got = 0
        self.token = token
        self.op = "dequeue" if n is None else ("dequeue_up_to" if up_to else "dequeue_many")


class Queue:
    """A FIFO queue; the base of the other kinds. Not thread-safe: one driver at a time."""

    def __init__(self, name: str, spec: QueueSpec) -> None:
        self.name = name
        self.spec = spec
        self.capacity = spec.capacity
        self.np_dtypes = spec.np_dtypes
        self.closed = False
        self._size = 0
        self._enq: deque[EnqueueRequest] = deque()
        self._deq: deque[DequeueRequest] = deque()
        self._blocks: deque[list[Any]] = deque()  # [block, start, end]
        self.enqueued = 0  # rows ever inserted
        self.dequeued = 0  # rows ever handed out (and not put back)

    # -- inspection -----------------------------------------------------------------

    def size(self) -> int:
        """Rows in the queue now (rows held by a waiting dequeue are not counted)."""
        return self._size

    def waiting(self) -> tuple[int, int]:
        """Numbers of waiting enqueue and dequeue requests."""
        return len(self._enq), len(self._deq)

    def stats(self) -> dict[str, Any]:
        return {
            "kind": self.spec.kind,
            "size": self._size,
            "capacity": self.capacity,
            "closed": self.closed,
            "enqueued": self.enqueued,
            "dequeued": self.dequeued,
            "waiting_enqueues": len(self._enq),
            "waiting_dequeues": len(self._deq),
        }

    # -- steps ----------------------------------------------------------------------

    def enqueue(self, req: EnqueueRequest) -> list[Completion]:
        """Submit an enqueue; it completes now or waits for room."""
        if self.closed:
            return [(req, QueueClosedError(f"queue {self.name!r} is closed; {req.op} refused"))]
        if req.total == 0:
            return [(req, 0)]
        self._enq.append(req)
        out: list[Completion] = []
        self._flush(out)
        return out

    def dequeue(self, req: DequeueRequest) -> list[Completion]:
        """Submit a dequeue; it completes now, or waits for rows or for the queue to close."""
        if req.n < 0:
            return [(req, InvalidArgumentError(
                f"queue {self.name!r}: {req.op} needs n >= 0, got {req.n}"))]
        if req.n == 0:
            return [(req, self._empty_batch())]
        self._deq.append(req)
        out: list[Completion] = []
        self._flush(out)
        return out

    def close(self, cancel_pending_enqueues: bool = False) -> list[Completion]:
        """Close the queue; returns the requests this completes (cancelled enqueues, failed dequeues).

        Raises :class:`QueueClosedError` when the queue is already closed and
        ``cancel_pending_enqueues`` is false.
        """
        if self.closed and not cancel_pending_enqueues:
            raise QueueClosedError(f"queue {self.name!r} is already closed")
        self.closed = True
        out: list[Completion] = []
        if cancel_pending_enqueues:
            while self._enq:
                r = self._enq.popleft()
                out.append((r, QueueClosedError(
                    f"queue {self.name!r} was closed with cancel_pending_enqueues=True while this "
                    f"{r.op} waited; {r.done} of {r.total} rows had been enqueued and stay in the queue")))
        self._flush(out)
        return out

    def cancel(self, req: EnqueueRequest | DequeueRequest, exc: QueueError) -> list[Completion]:
        """Withdraw a waiting request (deadline, client gone) and fail it with ``exc``.

        A dequeue's collected rows go back to the front in order, so the queue
        is as it was. An ``enqueue_many``'s inserted rows stay; ``exc``'s
        message should say how many (see :meth:`describe_progress`). Returns
        ``[]`` when the request is no longer waiting.
        """
        out: list[Completion] = []
        if isinstance(req, EnqueueRequest):
            try:
                self._enq.remove(req)
            except ValueError:
                return out
        else:
            try:
                self._deq.remove(req)
            except ValueError:
                return out
            self._restore(req)
        out.append((req, exc))
        self._flush(out)
        return out

    def put_back(self, rows: Block) -> list[Completion]:
        """Return rows that were dequeued but could not be delivered, at the front."""
        n = rows[0].shape[0]
        if n == 0:
            return []
        self.dequeued -= n
        self._put_front([rows])
        self._size += n
        out: list[Completion] = []
        self._flush(out)
        return out

    @staticmethod
    def describe_progress(req: EnqueueRequest | DequeueRequest) -> str:
        if isinstance(req, EnqueueRequest) and req.total > 1:
            return f"; {req.done} of {req.total} rows had been enqueued and stay in the queue"
        return ""

    # -- the engine -------------------------------------------------------------------

    def _flush(self, out: list[Completion]) -> None:
        cap = self.capacity
        while True:
            progressed = False
            enq = self._enq
            while enq and self._size < cap:
                r = enq[0]
                k = min(cap - self._size, r.total - r.done)
                self._put(r.block, r.done, r.done + k)
                self._size += k
                self.enqueued += k
                r.done += k
                progressed = True
                if r.done == r.total:
                    enq.popleft()
                    out.append((r, r.total))
            deq = self._deq
            while deq:
                r = deq[0]
                need = r.n - r.got
                avail = self._size if self.closed else self._size - self._reserve()
                if avail > 0:
                    k = min(avail, need)
                    r.parts.extend(self._take(k))
                    self._size -= k
                    r.got += k
                    need -= k
                    progressed = True
                if need == 0:
                    deq.popleft()
                    out.append((r, self._finish(r)))
                    continue
                if self.closed and not self._enq:
                    deq.popleft()
                    if r.up_to and r.got:
                        out.append((r, self._finish(r)))
                    else:
                        self._restore(r)
                        if r.op == "dequeue":
                            msg = f"queue {self.name!r} is closed and empty"
                        else:
                            msg = (f"queue {self.name!r} is closed and has {self._size} of the {r.n} "
                                   f"items {r.op} needs (they stay in the queue)")
                        out.append((r, OutOfRangeError(msg)))
                    progressed = True
                    continue
                break
            if not progressed:
                return

    def _finish(self, r: DequeueRequest) -> Outcome:
        parts = r.parts
        r.parts = []
        try:
            if r.op == "dequeue":
                rows = parts[0]
                res: Outcome = [a[0, ...] for a in rows]  # arrays, also for scalars and strings
            else:
                res = [self._combine([p[c] for p in parts], c) for c in range(self.spec.arity)]
        except QueueError as e:
            r.parts = parts
            self._restore(r)
            return e
        self.dequeued += r.got
        return res

    def _restore(self, r: DequeueRequest) -> None:
        if r.parts:
            self._put_front(r.parts)
            self._size += r.got
            r.parts = []
            r.got = 0

    def _combine(self, parts: list[np.ndarray], c: int) -> np.ndarray:
        if len(parts) == 1:
            return parts[0]
        first = parts[0].shape[1:]
        for p in parts:
            if p.shape[1:] != first:
                raise InvalidArgumentError(
                    f"queue {self.name!r}: {self.spec.dtypes[c]} component {c} holds rows of shapes "
                    f"{list(first)} and {list(p.shape[1:])}, which cannot be stacked; dequeue them one "
                    "at a time or use a padding queue")
        return np.concatenate(parts)

    def _empty_batch(self) -> list[np.ndarray]:
        out = []
        for c, dt in enumerate(self.spec.np_dtypes):
            shape = self.spec.shape(c) or ()
            out.append(np.empty((0, *(d or 0 for d in shape)), dtype=dt))
        return out

    # -- storage (FIFO) ---------------------------------------------------------------

    def _reserve(self) -> int:
        return 0

    def _put(self, block: Block, start: int, end: int) -> None:
        self._blocks.append([block, start, end])

    def _put_front(self, parts: list[Block]) -> None:
        for p in reversed(parts):
            self._blocks.appendleft([p, 0, p[0].shape[0]])

    def _take(self, k: int) -> list[Block]:
        out = []
        blocks = self._blocks
        while k:
            b = blocks[0]
            block, start, end = b
            m = min(k, end - start)
            if start == 0 and m == end and m == block[0].shape[0]:
                out.append(block)
            else:
                out.append([a[start : start + m] for a in block])
            if m == end - start:
                blocks.popleft()
            else:
                b[1] = start + m
            k -= m
        return out


class ShuffleQueue(Queue):
    """A random-shuffle queue: dequeues take random rows; keeps ``min_after_dequeue`` until closed."""

    def __init__(self, name: str, spec: QueueSpec) -> None:
        super().__init__(name, spec)
        self._rows: list[Block] = []
        self._rng = random.Random(spec.seed)

    def _reserve(self) -> int:
        return self.spec.min_after_dequeue

    def _put(self, block: Block, start: int, end: int) -> None:
        rows = self._rows
        if end - start == 1 and block[0].shape[0] == 1:
            rows.append(block)
            return
        for j in range(start, end):
            rows.append([a[j : j + 1] for a in block])

    def _put_front(self, parts: list[Block]) -> None:
        for p in parts:
            self._put(p, 0, p[0].shape[0])

    def _take(self, k: int) -> list[Block]:
        rows = self._rows
        out = []
        randrange = self._rng.randrange
        for _ in range(k):
            i = randrange(len(rows))
            last = rows.pop()
            if i < len(rows):
                out.append(rows[i])
                rows[i] = last
            else:
                out.append(last)
        return out


class PaddingQueue(Queue):
    """A FIFO queue whose batches zero-pad every unknown dimension to the batch's largest."""

    def _combine(self, parts: list[np.ndarray], c: int) -> np.ndarray:
        return pad_stack(parts, self.spec.shape(c))


def as_rows(op: str, arrays: list[np.ndarray]) -> Block:
    """A dequeue's result as a block of rows (a single ``dequeue`` gave one row without its
    leading dimension), ready for :meth:`Queue.put_back`."""
    return [a.reshape((1, *a.shape)) for a in arrays] if op == "dequeue" else arrays


_KINDS: dict[str, type[Queue]] = {"fifo": Queue, "shuffle": ShuffleQueue, "padding": PaddingQueue}


def make_queue(name: str, spec: QueueSpec) -> Queue:
    """A new empty queue of ``spec.kind``."""
    return _KINDS[spec.kind](name, spec)
