"""Load-client node: query a replicated model through its request queue, check and time the answers.

It lets a serving topology finish on its own (``topologies/serving.toml``): the
node is the request queue's only writer, so when it is done the queue host
closes the request queue, the predictor replicas drain it and end, and
``qpipe run`` completes. It uses :class:`qpipe.serving.ServingClient`, the
same client that ``qpipe request`` and the serving benchmark use.

Steps:

1. wait until every replica of every node that reads the request queue waits
   on it (they may be training or loading their model);
2. an accuracy pass: every input row once, in one ``predict_many``, against
   the labels (``serving_accuracy``);
3. a load run: ``requests`` queries (or ``duration`` seconds) with
   ``concurrency`` in flight (or at ``rate`` per second), measuring queries/s
   and latency percentiles;
4. with ``hold = true``, keep the request queue open (for ``qpipe request``
   from another terminal) until the run is stopped with Ctrl-C.

It fails the run when more than ``max_timeouts`` queries went unanswered, when
any answer came for an id this client never sent, or when the accuracy is
below ``min_accuracy``. Results (``summary.json``): ``serving_accuracy``,
``queries_per_s``, ``p50_ms``, ``p90_ms``, ``p99_ms``, ``max_ms``, ``answered``,
``timeouts``, ``late``, ``unknown``.

Params (``[nodes.NAME.params]``):

=================  ==========================================================
``queue``          request queue (default: the node's only ``writes`` entry)
``input``          CSV file with a header, relative to the topology file
``columns``        input columns, ``"START:STOP"`` or names (default: the first
                   columns other than the label)
``label``          label column, if present (default ``"label"``)
``requests``       queries in the load run (default: one per row, rows cycled)
``duration``       seconds of load instead of a count
``concurrency``    queries in flight (default 8)
``rate``           queries per second (open loop) instead of a closed loop
``query_timeout``  seconds a query may take (default 30)
``startup_timeout`` seconds to wait for the replicas (default 300)
``max_timeouts``   unanswered queries tolerated (default 0)
``min_accuracy``   fail below this accuracy (default: no check)
``hold``           keep serving after the load until the run is stopped (default false)
=================  ==========================================================
"""

from __future__ import annotations

import sys

import numpy as np

from qpipe.runtime import NodeContext, queue_host_addresses
from qpipe.serving import ServingClient, read_csv_inputs
from nodes import node_main


def run(ctx: NodeContext) -> None:
    p = ctx.params
    name = p.get("queue")
    if name is None:
        if len(ctx.node.writes) != 1:
            raise ValueError(f"node {ctx.node.name!r}: params.queue must name the request queue when the node "
                             f"writes {len(ctx.node.writes)} queues")
        name = ctx.node.writes[0]
    qs = ctx.topology.queue(name)
    address = queue_host_addresses(ctx.topology)[qs.host]
    width = int(np.prod(qs.shapes[2])) if qs.shapes and len(qs.shapes) == 3 else 0
    xs, labels, _ = read_csv_inputs(str(ctx.path(p["input"])), width, columns=p.get("columns"),
                                    label=p.get("label", "label"))
    servers = sum(ctx.topology.node(n).replicas for n in ctx.topology.readers(name))
    query_timeout = float(p.get("query_timeout", 30.0))
    with ServingClient(address, name, timeout=query_timeout) as sc:
        xs = xs.reshape((len(xs), *sc.input_shape))
        ctx.log.info("waiting for %d server(s) on request queue %r", servers, name)
        sc.wait_ready(servers, timeout=float(p.get("startup_timeout", 300.0)))

        probs = sc.predict_many(xs)
        results: dict[str, object] = {}
        if labels is not None:
            acc = float((probs.argmax(axis=1) == labels).mean())
            results["serving_accuracy"] = round(acc, 4)
            ctx.log.info("accuracy pass: %d rows, accuracy %.4f", len(xs), acc)

        concurrency = p.get("concurrency", None if "rate" in p else 8)
        stats = sc.run_load(xs, concurrency=concurrency, rate=p.get("rate"), duration=p.get("duration"),
                            n=p.get("requests", None if "duration" in p else len(xs)))
        ctx.log.info("load: %s", stats.summary())
        ctx.metric(queries=stats.answered, timeouts=stats.timeouts)
        keep = ("answered", "timeouts", "errors", "late", "unknown", "queries_per_s", "p50_ms", "p90_ms", "p99_ms",
                "max_ms", "concurrency", "rate")
        results.update({k: round(v, 3) if isinstance(v, float) else v for k, v in stats.as_dict().items()
                        if k in keep})
        results["replicas"] = servers
        ctx.result(**results)

        problems = []
        if stats.timeouts + stats.errors > int(p.get("max_timeouts", 0)):
            problems.append(f"{stats.timeouts} queries timed out and {stats.errors} failed "
                            f"(max_timeouts = {p.get('max_timeouts', 0)}); first error: {stats.first_error}")
        if stats.unknown:
            problems.append(f"{stats.unknown} answers came for ids this client never sent")
        if "min_accuracy" in p and results.get("serving_accuracy", 1.0) < float(p["min_accuracy"]):
            problems.append(f"accuracy {results['serving_accuracy']} is below min_accuracy = {p['min_accuracy']}")
        if problems:
            raise RuntimeError(f"node {ctx.name}: " + "; ".join(problems))

        if p.get("hold", False):
            ctx.log.info("holding request queue %r at %s open until the run is stopped (Ctrl-C)", name, address)
            q = ctx.queue(name)
            while not ctx.coord.wait_for_stop(0.5) and not q.is_closed(timeout=5.0):
                pass




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
