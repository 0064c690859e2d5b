"""Consumer node: drain the queues in ``reads`` and count what arrives (a sink).

Takes items with ``dequeue_up_to(batch_size)`` until each queue is closed and
empty, reports ``items`` as a metric and, at the end, the count per queue and
(for items whose last component is an integer label) the label histogram.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter

import numpy as np

import qpipe
from qpipe.runtime import NodeContext
from nodes import node_main


def run(ctx: NodeContext) -> None:
    batch = int(ctx.params.get("batch_size", 1))
    report_every = ctx.params.get("report_every")
    counts: Counter[str] = Counter()
    labels: Counter[int] = Counter()
    lock = threading.Lock()

    def drain(q: qpipe.Queue) -> None:
        last_t, last_n = time.monotonic(), 0
        while not ctx.coord.should_stop():
            try:
                items = q.dequeue_up_to(batch)
            except qpipe.OutOfRangeError:
                break
            comps = items if isinstance(items, tuple) else (items,)
            n = comps[0].shape[0]
            with lock:
                counts[q.name] += n
                lab = comps[-1]
                if len(comps) > 1 and lab.ndim == 1 and lab.dtype.kind in "iu":
                    labels.update(np.asarray(lab).tolist())
            now = time.monotonic()
            if now - last_t >= 0.5:
                ctx.metric(items=counts[q.name] - last_n)
                last_t, last_n = now, counts[q.name]
            if report_every and counts[q.name] // report_every != (counts[q.name] - n) // report_every:
                ctx.log.info("%s: %d items", q.name, counts[q.name])
        ctx.metric(items=counts[q.name] - last_n)

    threads = [threading.Thread(target=_guarded, args=(ctx, drain, q), name=f"drain-{q.name}")
               for q in ctx.inputs()]
    for t in threads:
        t.start()
    ctx.coord.join(threads, stop_grace_period_secs=ctx.timeout or 60)
    ctx.log.info("consumed %s", ", ".join(f"{k}: {v}" for k, v in counts.items()))
    ctx.result(consumed=dict(counts), labels={str(k): v for k, v in sorted(labels.items())})


def _guarded(ctx: NodeContext, fn, *args) -> None:
    with ctx.coord.stop_on_exception():
        fn(*args)




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
