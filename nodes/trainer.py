"""Trainer node: one data-parallel replica — dequeue a mini-batch, pull parameters, push gradients.

Params (``[nodes.trainer.params]``):

``ps``            name of the parameter-server node (its replicas are the shards)
``batch_size``    items per step; the last, partial batch comes from ``dequeue_up_to``
``wire_dtype``    ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` on the wire
``max_steps``     stop after this many steps of this replica (default: until the input is drained)
``compute_ms``    extra simulated compute per step in milliseconds (benchmarks)
``warmup_steps``  async mode: replicas other than 0 wait until the PS reached this version
``report_every``  seconds between metric reports (default 1)

Sync mode: after pushing the gradients of version ``v`` the trainer waits for version ``v + 1``
(the PS applies a step once ``replicas_to_aggregate`` gradients arrived; a late one is dropped
and the trainer simply continues with the newest parameters). Async mode: push, then pull the
newest parameters at once. The model (layer sizes, input scale) comes from the PS.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import qpipe
from nodes import model
from qpipe.ps import ParameterClient
from qpipe.runtime import NodeContext
from qpipe.xp import array_module
from nodes import node_main


def run(ctx: NodeContext) -> None:
    p = ctx.params
    xp = array_module(ctx.node.device)
    source = ctx.inputs()[0]
    pc = ParameterClient(ctx.service_addresses(p["ps"]), ctx.name, wire_dtype=p.get("wire_dtype", "float32"),
                         timeout=ctx.timeout)
    try:
        _train(ctx, pc, source, xp)
    finally:
        pc.bye()
        pc.close()


def _train(ctx: NodeContext, pc: ParameterClient, source: qpipe.Queue, xp) -> None:
    p = ctx.params
    batch_size = int(p.get("batch_size", 32))
    max_steps = p.get("max_steps")
    compute_s = float(p.get("compute_ms", 0.0)) / 1000.0
    every = float(p.get("report_every", 1.0))
    pc.hello()
    sync = pc.mode == "sync"
    scale = float(pc.meta.get("input_scale", 1.0))
    warmup = int(p.get("warmup_steps", 0))
    params = pc.pull(warmup if (warmup and ctx.replica != 0 and not sync) else 0)
    steps = items = dropped = 0
    loss_sum, loss_n = 0.0, 0
    t_last = time.monotonic()
    t_compute = 0.0
    reported = {"steps": 0, "items": 0, "bytes_sent": 0, "bytes_received": 0}

    def report(**gauges) -> None:
        now = {"steps": steps, "items": items, "bytes_sent": pc.bytes_sent, "bytes_received": pc.bytes_received}
        ctx.metric(**{k: v - reported[k] for k, v in now.items()}, **gauges)
        reported.update(now)

    while not ctx.coord.should_stop() and (max_steps is None or steps < int(max_steps)):
        try:
            x, y = source.dequeue_up_to(batch_size)
        except qpipe.OutOfRangeError:
            break
        t0 = time.perf_counter()
        xd = xp.asarray(x, dtype=xp.float32 if params_dtype(params) == np.float32 else xp.float64) * scale
        loss, grads = model.loss_and_grads({k: xp.asarray(v) for k, v in params.items()}, xd, xp.asarray(y), xp=xp)
        grads = {k: _host(v) for k, v in grads.items()}
        if compute_s:
            time.sleep(compute_s)
        t_compute += time.perf_counter() - t0
        versions = list(pc.versions)
        replies = pc.push(grads, versions)
        dropped += sum(1 for r in replies if not r.get("accepted", True))
        params = pc.pull([v + 1 for v in versions] if sync else 0)
        steps += 1
        items += int(x.shape[0])
        loss_sum += float(loss)
        loss_n += 1
        now = time.monotonic()
        if now - t_last >= every:
            report(last_loss=round(loss_sum / loss_n, 5), last_version=pc.versions[0])
            t_last = now
            loss_sum, loss_n = 0.0, 0
    report(dropped_pushes=dropped)
    ctx.log.info("%d steps, %d items, %d pushes dropped as late or stale; %.1f MB sent, %.1f MB received; "
                 "%.2f s computing, %.2f s waiting on the PS", steps, items, dropped, pc.bytes_sent / 1e6,
                 pc.bytes_received / 1e6, t_compute, pc.wait_seconds)


def params_dtype(params: dict) -> np.dtype:
    return next(iter(params.values())).dtype


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
