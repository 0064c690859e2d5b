"""Evaluator node: follow training from the PS, score validation data, test at the end, export the model.

Params (``[nodes.eval.params]``):

``ps``               name of the parameter-server node
``validation``       CSV file scored every ``eval_every_secs`` seconds while training runs
``test``             CSV file scored once training is done (``summary.json``: ``test_accuracy``)
``components``       how a CSV row becomes (features, label), as for the reader
``eval_every_secs``  seconds between validation scores (default 1)

Writes ``RUN_DIR/model/model.npz`` + ``model.json`` (the trained model, loadable with
``nodes.model.load_model``), ``RUN_DIR/training.png`` (validation loss and accuracy against
time) and ``RUN_DIR/eval_history.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from nodes import model
from nodes.reader import make_decoder
from qpipe.ps import ParameterClient
from qpipe.runtime import NodeContext
from nodes import node_main


def load_split(ctx: NodeContext, key: str) -> tuple[np.ndarray, np.ndarray]:
    path = str(ctx.path(ctx.params[key]))
    decoder, shapes = make_decoder(ctx.params, path)
    x, y = decoder.read_all(path)
    return x.reshape((x.shape[0], *shapes[0])), y


def run(ctx: NodeContext) -> None:
    p = ctx.params
    xv, yv = load_split(ctx, "validation")
    xt, yt = load_split(ctx, "test") if "test" in p else (None, None)
    pc = ParameterClient(ctx.service_addresses(p["ps"]), ctx.name, role="evaluator", timeout=ctx.timeout)
    try:
        pc.hello()
        scale = float(pc.meta.get("input_scale", 1.0))
        every = float(p.get("eval_every_secs", 1.0))
        t0 = time.monotonic()
        history = []
        while True:
            params = pc.pull(0)
            loss, acc = score(params, xv, yv, scale)
            history.append({"t": round(time.monotonic() - t0, 3), "version": pc.versions[0],
                            "val_loss": loss, "val_accuracy": acc})
            ctx.metric(last_val_accuracy=round(acc, 4), last_val_loss=round(loss, 4), last_version=pc.versions[0])
            if pc.done or ctx.coord.should_stop():
                break
            ctx.coord.wait_for_stop(every)
        results = {"validation_accuracy": acc, "validation_loss": loss, "steps": pc.versions[0]}
        if xt is not None:
            tl, ta = score(params, xt, yt, scale)
            results.update(test_accuracy=ta, test_loss=tl)
        out = ctx.run_dir
        out.mkdir(parents=True, exist_ok=True)
        model.save_model(out / "model", params, {"layers": pc.meta.get("layers"), "input_scale": scale,
                                                 "version": pc.versions[0], **results})
        (out / "eval_history.json").write_text(json.dumps(history, indent=1))
        plot(history, out / "training.png", ctx.topology.name)
        ctx.log.info("final: %s; model in %s", ", ".join(f"{k}={v:.4g}" for k, v in results.items()), out / "model")
        ctx.result(**results)
    finally:
        pc.bye()
        pc.close()


def score(params: dict, x: np.ndarray, y: np.ndarray, scale: float) -> tuple[float, float]:
    dt = next(iter(params.values())).dtype
    xs = x.astype(dt) * scale
    loss, _ = model.loss_and_grads(params, xs, y, xp=np)
    return float(loss), float(model.accuracy(params, xs, y, xp=np))


def plot(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [h["t"] for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 4), dpi=100)
    ax1.plot(t, [h["val_loss"] for h in history], color="tab:red", label="validation loss")
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("loss", color="tab:red")
    ax2 = ax1.twinx()
    ax2.plot(t, [h["val_accuracy"] for h in history], color="tab:blue", label="validation accuracy")
    ax2.set_ylabel("accuracy", color="tab:blue")
    ax2.set_ylim(0, 1)
    ax1.set_title(f"{title}: validation loss and accuracy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
