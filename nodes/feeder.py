"""Feeder node: read inputs from CSV files, tag each with a request id, copy it to every member.

Params are documented in ``topologies/README.md`` ("Params of feeder"). Each row of
the files (``components``: features, then label, as for the reader) becomes request
``id`` (int64, counting from 0 in file order). For each request the feeder first
writes ``(id, label)`` to the queue named by ``params.labels_queue`` (so an
aggregator can score the answers), then ``(id, features)`` to every other queue in
its ``writes``. ``rate`` paces the requests (per second, on a fixed schedule, so a
slow enqueue does not shift the later ones); without it they go out as fast as the
queues take them. The runtime closes the queues when the feeder returns.

A member that stops reading must not stall the others: when an enqueue into a member's
queue waits longer than ``stall_timeout`` the queue is marked stalled and the request
is dropped for it; later requests try a stalled queue without waiting, and it is
unmarked as soon as one fits again. Every dropped copy is counted (``dropped`` in the
node's result, per queue). If the labels queue is closed by its reader (an aggregator
that gave up), the feeder stops early and says how many requests it did not send.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

import qpipe
from nodes.reader import make_decoder
from qpipe.inputs import list_files
from qpipe.runtime import NodeContext
from nodes import node_main


def read_requests(ctx: NodeContext) -> tuple[np.ndarray, np.ndarray]:
    """All rows of the files, as ``(features, labels)``."""
    p = ctx.params
    for key in ("files", "components"):
        if p.get(key) is None:
            raise ValueError(f"node {ctx.node.name!r}: params.{key} is missing; a feeder reads CSV files "
                             "(files) and makes each row (features, label) (components), as a reader does")
    patterns = p["files"] if isinstance(p["files"], list) else [p["files"]]
    files = list_files([str(ctx.path(f)) for f in patterns])
    if not files:
        raise FileNotFoundError(f"node {ctx.node.name!r}: params.files {p['files']!r} matches no file")
    if len(p["components"]) != 2:
        raise ValueError(f"node {ctx.node.name!r}: params.components must be two tables (features, label), "
                         f"got {len(p['components'])}")
    decoder, shapes = make_decoder(p, files[0])
    xs, ys = [], []
    for f in files:
        x, y = decoder.read_all(f)
        xs.append(x.reshape((x.shape[0], *shapes[0])))
        ys.append(y.reshape((y.shape[0], *shapes[1])))
    return np.concatenate(xs), np.concatenate(ys)


class _Member:
    """One member's input queue and its stall state."""

    def __init__(self, queue: qpipe.Queue) -> None:
        self.queue = queue
        self.stalled = False
        self.closed = False
        self.dropped = 0


def run(ctx: NodeContext) -> None:
    p = ctx.params
    labels_name = p.get("labels_queue")
    if labels_name is not None and labels_name not in ctx.node.writes:
        raise ValueError(f"node {ctx.node.name!r}: params.labels_queue {labels_name!r} is not in its writes "
                         f"({', '.join(ctx.node.writes)})")
    labels_q = ctx.queue(labels_name) if labels_name is not None else None
    members = [_Member(ctx.queue(n)) for n in ctx.node.writes if n != labels_name]
    x, y = read_requests(ctx)
    limit = p.get("limit")
    n = len(x) if limit is None else min(len(x), int(limit))
    rate = p.get("rate")
    interval = 1.0 / float(rate) if rate else 0.0
    stall = p.get("stall_timeout")
    stall = ctx.timeout if stall is None else float(stall)
    first = int(p.get("first_id", 0))
    ctx.log.info("feeding %d requests%s to %s%s", n, f" at {float(rate):g}/s" if rate else "",
                 ", ".join(m.queue.name for m in members) or "no member queue",
                 f"; labels to {labels_name!r}" if labels_name else "")
    t0 = time.monotonic()
    sent = 0
    reported = (t0, 0)
    stopped_early = None
    for i in range(n):
        if ctx.coord.should_stop():
            stopped_early = "asked to stop"
            break
        if interval:
            wait = t0 + i * interval - time.monotonic()
            if wait > 0 and ctx.coord.wait_for_stop(wait):
                stopped_early = "asked to stop"
                break
        rid = np.int64(first + i)
        if labels_q is not None:
            try:
                labels_q.enqueue((rid, y[i]))
            except qpipe.QueueClosedError:
                stopped_early = f"its labels queue {labels_name!r} was closed by its reader"
                break
        for m in members:
            _offer(ctx, m, (rid, x[i]), stall)
        sent += 1
        now = time.monotonic()
        if now - reported[0] >= 0.5:
            ctx.metric(requests=sent - reported[1])
            reported = (now, sent)
    ctx.metric(requests=sent - reported[1])
    seconds = time.monotonic() - t0
    dropped = {m.queue.name: m.dropped for m in members}
    if stopped_early:
        ctx.log.warning("stopped early because %s: %d of %d requests sent (ids %d..%d not sent)",
                        stopped_early, sent, n, first + sent, first + n - 1)
    ctx.log.info("fed %d requests in %.2f s (%.0f/s)%s", sent, seconds, sent / seconds if seconds else 0.0,
                 "; dropped copies: " + ", ".join(f"{k}: {v}" for k, v in dropped.items() if v)
                 if any(dropped.values()) else "")
    ctx.result(sent=sent, not_sent=n - sent, dropped=dropped)


def _offer(ctx: NodeContext, m: _Member, item: Any, stall: float | None) -> None:
    """Enqueue one copy for a member, waiting at most ``stall`` seconds (0 while it is stalled)."""
    if m.closed:
        m.dropped += 1
        return
    try:
        m.queue.enqueue(item, timeout=0.0 if m.stalled else stall)
    except qpipe.DeadlineExceededError:
        m.dropped += 1
        if not m.stalled:
            m.stalled = True
            ctx.log.warning("queue %r took no request for %g s: marked stalled; requests are dropped for it "
                            "(and counted) until it has room again", m.queue.name, stall)
        return
    except qpipe.QueueClosedError:
        m.closed = True
        m.dropped += 1
        ctx.log.warning("queue %r was closed by its reader; requests for it are dropped (and counted)",
                        m.queue.name)
        return
    if m.stalled:
        m.stalled = False
        ctx.log.info("queue %r takes requests again", m.queue.name)




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
