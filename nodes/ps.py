"""Parameter-server node: holds one shard of the model's parameters and applies updates.

Params (``[nodes.ps.params]``):

``layers``            MLP layer sizes, e.g. ``[64, 128, 10]`` (the model lives here; trainers and
                      evaluators learn it from the PS)
``input_scale``       factor applied to inputs by trainers and evaluators (digits: 1/16)
``seed``              initialisation seed (every shard initialises the full model, keeps its part)
``dtype``             ``"float32"`` (default) or ``"float64"``
``mode``              ``"sync"`` or ``"async"``
``replicas_to_aggregate``  sync: gradients averaged per step (N of the N+k trainers)
``staleness``         async: ``"none"``, ``"drop"`` or ``"scale"``; ``max_staleness`` for drop
``optimizer``         ``"sgd"``, ``"momentum"`` or ``"adam"``; ``lr``, ``momentum``
``checkpoint_every_steps`` / ``checkpoint_every_secs``  periodic checkpoints (also one at the end)
``client_timeout``    seconds of silence after which a trainer counts as gone (default 10)
``port``              base TCP port (replica r binds port + r); 0 = any (``qpipe run`` only)

Shards: parameters are spread over the node's replicas greedily by size
(:func:`qpipe.ps.assign_shards`). Checkpoints go to ``RUN_DIR/checkpoints/NODE-REPLICA``;
with ``--resume`` the shard restarts from the newest one.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from nodes import model
from qpipe.ps import Optimizer, ParameterServer, ShardState, assign_shards, latest_checkpoint, load_checkpoint
from qpipe.runtime import NodeContext
from nodes import node_main


def clients_of(ctx: NodeContext) -> tuple[int, int]:
    """Trainer and evaluator replicas that name this PS node in their ``params.ps``."""
    trainers = evaluators = 0
    for n in ctx.topology.nodes.values():
        if n.params.get("ps") == ctx.node.name:
            if n.kind == "evaluator":
                evaluators += n.replicas
            else:
                trainers += n.replicas
    return trainers, evaluators


def shard_params(p: dict, replica: int, replicas: int) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    layers = [int(x) for x in p["layers"]]
    full = model.init_params(layers, seed=int(p.get("seed", 0)), dtype=p.get("dtype", "float32"))
    shards = assign_shards({n: a.shape for n, a in full.items()}, replicas)
    return {n: np.ascontiguousarray(full[n]) for n in shards[replica]}, shards


def run(ctx: NodeContext) -> None:
    p = ctx.params
    mine, shards = shard_params(p, ctx.replica, ctx.replicas)
    opt = Optimizer(p.get("optimizer", "sgd"), lr=float(p.get("lr", 0.1)), momentum=float(p.get("momentum", 0.9)))
    state = ShardState(mine, opt, mode=p.get("mode", "sync"),
                       replicas_to_aggregate=int(p.get("replicas_to_aggregate", 1)),
                       staleness=p.get("staleness", "none"), max_staleness=int(p.get("max_staleness", 0)))
    ckpt_dir = ctx.run_dir / "checkpoints" / f"{ctx.node.name}-{ctx.replica}"
    if not ctx.resume and latest_checkpoint(ckpt_dir) is not None:
        # A fresh run in a used run directory: keep the old checkpoints, out of the way.
        aside = ckpt_dir.with_name(f"{ckpt_dir.name}.old-{int(time.time())}")
        ckpt_dir.rename(aside)
        ctx.log.warning("not resuming: moved the earlier checkpoints to %s", aside)
    if ctx.resume:
        last = latest_checkpoint(ckpt_dir)
        if last is None:
            ctx.log.warning("--resume: no checkpoint in %s; starting from scratch", ckpt_dir)
        else:
            info = load_checkpoint(last, state)
            ctx.log.info("resumed from %s (version %d)", last, info["version"])
    trainers, evaluators = clients_of(ctx)
    server = ParameterServer(state, ctx.bind_address(), expected_trainers=trainers,
                             expected_evaluators=evaluators,
                             client_timeout=float(p.get("client_timeout", 10.0)), checkpoint_dir=ckpt_dir,
                             checkpoint_every_steps=int(p.get("checkpoint_every_steps", 0)),
                             checkpoint_every_secs=float(p.get("checkpoint_every_secs", 0.0)),
                             meta={"layers": [int(x) for x in p["layers"]],
                                   "input_scale": float(p.get("input_scale", 1.0)), "shards": shards})
    ctx.log.info("shard %d/%d holds %s (%d values); mode %s; %d trainers, %d evaluators expected; on %s",
                 ctx.replica, ctx.replicas, list(mine), sum(a.size for a in mine.values()), state.mode,
                 trainers, evaluators, server.address)
    ctx.ready(server.address)
    last_report = [0.0]

    def report() -> None:
        import time

        now = time.monotonic()
        if now - last_report[0] >= 1.0:
            last_report[0] = now
            ctx.metric(last_version=state.version, last_dropped_late=state.counters["dropped_late"],
                       last_dropped_stale=state.counters["dropped_stale"])

    server.serve(stop=lambda: (report(), ctx.coord.should_stop())[1])
    st = server.stats()
    ctx.log.info("done at version %d: %s", state.version, st)
    ctx.result(**{f"shard{ctx.replica}": st})




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
