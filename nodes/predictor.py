"""Predictor node: answer requests with a model's class probabilities (an ensemble member, a serving replica).

Params are documented in ``topologies/README.md`` ("Params of predictor"). The model
is loaded from ``params.model`` (a directory written by :func:`nodes.model.save_model`)
or trained at start from ``params.train`` (a table with a solo_trainer config and its
data files), so a topology runs on a fresh install without an earlier sweep.

The node reads one queue. Its item layout picks where answers go:

``(id int64, x float32[d])``
    answer ``(id int64, probs float32[classes])`` into the node's one ``writes`` queue
    (an ensemble member's prediction queue).
``(id int64, reply_to string, x float32[d])``
    answer ``(id, probs)`` into the queue named ``reply_to``, which the caller declared
    on the same queue host as the request queue (replicated serving). An answer whose
    reply queue is missing, closed, full or of another layout is dropped, counted and
    logged; it never stops the node.

Requests are taken as they come: the first one blocks, then up to ``batch_size - 1``
more that are already waiting join the batch (the node never waits to fill a batch).
The node stops when its request queue is closed and drained, or when its answer
queue (first layout) is closed by its reader, as an aggregator does at its end.

Fault injection, for tests and benchmarks: ``delay_ms`` sleeps that long per request
(a batch of n sleeps n x ``delay_ms``) before answering; ``fail_after`` answers that
many requests and then ends the process at once with status 1 (``os._exit``; no
clean-up, so its answer queue is never closed, as after a real crash).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

import qpipe
from nodes import model
from nodes.solo_trainer import train_from_table
from qpipe.runtime import NodeContext
from qpipe.xp import array_module
from nodes import node_main

_POLL = 1.0  # seconds a dequeue waits before the node checks whether it should stop


class _Stop(Exception):
    """The answer queue was closed by its reader: nobody waits for more answers."""


def load_or_train(ctx: NodeContext, xp: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The model's parameters, its metadata and where it came from (a path, or "trained at start")."""
    p = ctx.params
    if (p.get("model") is None) == (p.get("train") is None):
        raise ValueError(f"node {ctx.node.name!r}: give exactly one of params.model (a saved model directory) "
                         "and params.train (a table to train one at start)")
    if p.get("model") is not None:
        path = ctx.path(p["model"])
        if not (path / "model.json").exists():
            raise FileNotFoundError(f"node {ctx.node.name!r}: params.model {p['model']!r}: no model.json in {path}; "
                                    "point it at a directory written by a solo_trainer or evaluator")
        params, meta = model.load_model(path, xp)
        return params, meta, str(path)
    if not isinstance(p["train"], dict):
        raise TypeError(f"node {ctx.node.name!r}: params.train must be a table, got {p['train']!r}")
    params, meta = train_from_table(p["train"], ctx.path, xp, "params.train", ctx.log)
    return params, meta, "trained at start"


def run(ctx: NodeContext) -> None:
    p = ctx.params
    if len(ctx.node.reads) != 1:
        raise ValueError(f"node {ctx.node.name!r}: a predictor reads exactly one request queue, "
                         f"got reads = {list(ctx.node.reads)}")
    src = ctx.inputs()[0]
    reply = _layout(ctx, src)
    outs = ctx.outputs()
    if not reply and len(outs) != 1:
        raise ValueError(f"node {ctx.node.name!r}: requests in {src.name!r} are (id, x), so the answers go to "
                         f"one queue in writes; got writes = {list(ctx.node.writes)}")
    xp = array_module(ctx.node.device)
    params, meta, source = load_or_train(ctx, xp)
    scale = float(p["input_scale"] if p.get("input_scale") is not None else meta.get("input_scale", 1.0))
    batch_size = int(p.get("batch_size") or 1)
    delay = float(p.get("delay_ms") or 0.0) / 1000.0
    fail_after = p.get("fail_after")
    reply_timeout = float(p.get("reply_timeout", 1.0))
    sizes = model.layer_sizes_of(params)
    ctx.log.info("serving %s (layers %s, input scale %g) from %r%s%s", source, sizes, scale, src.name,
                 f", {delay * 1000:g} ms delay per request" if delay else "",
                 f", failing after {fail_after} requests" if fail_after is not None else "")
    served = dropped = batches = 0
    reported = (time.monotonic(), 0)
    replies = _Replies(ctx, src, reply_timeout)
    stopped = "its request queue was closed and drained"
    try:
        while not ctx.coord.should_stop():
            if fail_after is not None and served >= int(fail_after):
                _crash(ctx, served - reported[1], int(fail_after))
            items = _take(src, batch_size)
            if items is None:
                break
            if items is _IDLE:
                continue
            ids, x = items[0], items[-1]
            n = ids.shape[0]
            if fail_after is not None and served + n > int(fail_after):
                n = int(fail_after) - served  # the rest is lost, as in a crash
                ids, x = ids[:n], x[:n]
                items = tuple(a[:n] for a in items)
            probs = model.probabilities(params, xp.asarray(x, dtype=xp.float32) * scale, xp)
            probs = np.asarray(probs.get() if hasattr(probs, "get") else probs, dtype=np.float32)
            if delay and not _sleep(ctx, delay * n, None if reply else outs[0]):
                if not ctx.coord.should_stop():
                    stopped = f"its answer queue {outs[0].name!r} was closed by its reader"
                raise _Stop
            if reply:
                dropped += replies.send(items[1], ids, probs)
            else:
                try:
                    outs[0].enqueue_many((ids, probs))
                except qpipe.QueueClosedError:
                    stopped = f"its answer queue {outs[0].name!r} was closed by its reader"
                    raise _Stop from None
            served += n
            batches += 1
            now = time.monotonic()
            if now - reported[0] >= 0.5:
                ctx.metric(served=served - reported[1])
                reported = (now, served)
    except _Stop:
        pass
    if ctx.coord.should_stop():
        stopped = "it was asked to stop"
    ctx.metric(served=served - reported[1])
    left = _size(src)
    ctx.log.info("served %d requests in %d batches; stopped because %s%s%s", served, batches, stopped,
                 f"; {dropped} answers dropped (see warnings)" if dropped else "",
                 f"; {left} requests left in {src.name!r}" if left else "")
    ctx.result(served=served, dropped_answers=dropped, model_source=source)


_IDLE = object()


def _crash(ctx: NodeContext, unreported: int, fail_after: int) -> None:
    ctx.metric(served=unreported)
    ctx.log.error("fail_after = %d: ending the process now, as a crash would", fail_after)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def _layout(ctx: NodeContext, src: qpipe.Queue) -> bool:
    """Whether requests carry a reply queue name; checks the request queue's items."""
    dt, sh = src.spec.dtypes, src.spec.shapes
    two = dt[:1] == ("int64",) and len(dt) == 2 and dt[1].startswith("float")
    three = dt[:2] == ("int64", "string") and len(dt) == 3 and dt[2].startswith("float")
    if not (two or three) or (sh is not None and (sh[0] != () or len(sh[-1]) != 1)):
        raise ValueError(f"node {ctx.node.name!r}: queue {src.name!r} holds {src.spec.describe()}; a "
                         "predictor reads (id int64[], x float32[d]) or (id int64[], reply_to string[], "
                         "x float32[d])")
    return three


def _take(src: qpipe.Queue, batch_size: int) -> Any:
    """The next requests: wait for one, then add up to ``batch_size - 1`` that are already there."""
    try:
        first = src.dequeue_up_to(1, timeout=_POLL)
    except qpipe.DeadlineExceededError:
        return _IDLE
    except qpipe.OutOfRangeError:
        return None
    if batch_size <= 1:
        return first
    try:
        waiting = src.size()
        if not waiting:
            return first
        more = src.dequeue_up_to(min(waiting, batch_size - 1), timeout=0)
    except (qpipe.DeadlineExceededError, qpipe.OutOfRangeError):
        return first  # another replica took them, or the queue closed: the next call sees it
    return tuple(np.concatenate([a, b]) for a, b in zip(first, more))


def _sleep(ctx: NodeContext, seconds: float, out: qpipe.Queue | None) -> bool:
    """Sleep (the injected delay); ``False`` if asked to stop or ``out`` was closed meanwhile.

    Long sleeps look at the answer queue every half second, so a slow member whose
    reader has finished stops soon instead of finishing a long backlog of sleeps.
    """
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return True
        if ctx.coord.wait_for_stop(min(left, 0.5)):
            return False
        if out is not None and left > 0.5 and _closed(out):
            return False


def _closed(q: qpipe.Queue) -> bool:
    try:
        return q.is_closed(timeout=1.0)
    except qpipe.QueueError:
        return False


def _size(q: qpipe.Queue) -> int:
    try:
        return q.size(timeout=1.0)
    except qpipe.QueueError:
        return 0


class _Replies:
    """Answers routed by ``reply_to``: handles cached per queue name, failures counted per name."""

    def __init__(self, ctx: NodeContext, src: qpipe.Queue, timeout: float) -> None:
        self.ctx = ctx
        self.client = ctx.client(ctx.topology.queue(src.name).host)
        self.timeout = timeout
        self.handles: dict[str, qpipe.Queue] = {}
        self.dropped: dict[str, int] = {}

    def send(self, reply_to: np.ndarray, ids: np.ndarray, probs: np.ndarray) -> int:
        names = [r.decode() if isinstance(r, bytes) else str(r) for r in reply_to]
        lost = 0
        for name in dict.fromkeys(names):
            rows = np.array([i for i, n in enumerate(names) if n == name])
            try:
                h = self.handles.get(name)
                if h is None:
                    h = self.handles[name] = self.client.queue(name, timeout=self.timeout)
                h.enqueue_many((ids[rows], probs[rows]), timeout=self.timeout)
            except qpipe.QueueError as e:
                if isinstance(e, (qpipe.NotFoundError, qpipe.QueueClosedError)):
                    self.handles.pop(name, None)
                first = name not in self.dropped
                self.dropped[name] = self.dropped.get(name, 0) + len(rows)
                lost += len(rows)
                if first or self.dropped[name] % 100 == 0:
                    self.ctx.log.warning("dropped %d answer(s) for reply queue %r (%d so far): %s: %s",
                                         len(rows), name, self.dropped[name], type(e).__name__, e)
        return lost




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
