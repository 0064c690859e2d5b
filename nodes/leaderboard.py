"""Leaderboard node: rank the models of a sweep by their validation accuracy.

Params are documented in ``topologies/README.md`` ("Params of leaderboard"). The node
drains its one ``reads`` queue of scores, items ``(member int64, validation accuracy
float64, model path string)`` as solo trainers write them, until the queue is closed
(every trainer finished) or until it has one score per replica of the nodes that write
the queue. A trainer that crashed never closes the queue, so when no score has come for
the node's ``timeout`` seconds it ranks what it has and names the missing members.

It writes ``RUN_DIR/leaderboard.json`` and reports ``ranking`` (best first: rank,
member, validation and test accuracy, config, model path), ``top_k`` (the best
``params.top_k`` model paths) and ``best`` (the first entry).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import qpipe
from qpipe.runtime import NodeContext
from nodes import node_main


def rank(scores: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scores sorted best first (validation accuracy down, then member index up), with ``rank`` from 1."""
    ordered = sorted(scores, key=lambda s: (-s["validation_accuracy"], s["member"]))
    return [{"rank": i + 1, **s} for i, s in enumerate(ordered)]


def run(ctx: NodeContext) -> None:
    if len(ctx.node.reads) != 1:
        raise ValueError(f"node {ctx.node.name!r}: a leaderboard reads exactly one queue of scores, "
                         f"got reads = {list(ctx.node.reads)}")
    src = ctx.inputs()[0]
    top_k = int(ctx.params.get("top_k", 3))
    expected = ctx.writers_of(src.name)
    scores: dict[int, dict[str, Any]] = {}
    incomplete = None
    while len(scores) < expected and not ctx.coord.should_stop():
        try:
            member, acc, path = src.dequeue()
        except qpipe.OutOfRangeError:
            break
        except qpipe.DeadlineExceededError:
            incomplete = f"no score came for {ctx.timeout:g} s"
            break
        path = path.item() if isinstance(path, np.ndarray) else path  # a 0-d object array from dequeue
        entry = {"member": int(member), "validation_accuracy": float(acc),
                 "model": path.decode() if isinstance(path, bytes) else str(path)}
        entry.update(_meta(Path(entry["model"])))
        if entry["member"] in scores:
            ctx.log.warning("member %d reported twice (a restarted replica?); keeping the newer score",
                            entry["member"])
        scores[entry["member"]] = entry
        ctx.log.info("member %d: validation accuracy %.4f (%d of %d)", entry["member"], entry["validation_accuracy"],
                     len(scores), expected)
        ctx.metric(scores=1)
    missing = sorted(set(range(expected)) - set(scores)) if expected else []
    if missing:
        ctx.log.warning("ranking %d of %d members%s; missing: %s", len(scores), expected,
                        f" ({incomplete})" if incomplete else "", ", ".join(map(str, missing)))
    ranking = rank(list(scores.values()))
    best = ranking[0] if ranking else None
    top = [r["model"] for r in ranking[:top_k]]
    out = ctx.run_dir / "leaderboard.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ranking": ranking, "top_k": top, "missing": missing}, indent=1) + "\n")
    for r in ranking:
        ctx.log.info("#%d member %d: validation %.4f%s  %s  %s", r["rank"], r["member"], r["validation_accuracy"],
                     f", test {r['test_accuracy']:.4f}" if "test_accuracy" in r else "", r.get("config", ""),
                     r["model"])
    if not ranking:
        raise RuntimeError(f"node {ctx.node.name!r}: no scores arrived in queue {src.name!r}; nothing to rank")
    ctx.result(ranking=ranking, top_k=top, best=best, missing_members=missing)


def _meta(path: Path) -> dict[str, Any]:
    """Config and test accuracy from the model's ``model.json``, when this machine can read it."""
    try:
        meta = json.loads((path / "model.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {k: meta[k] for k in ("test_accuracy", "config") if k in meta}
    return out




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
