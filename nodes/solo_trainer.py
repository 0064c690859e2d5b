"""Solo trainer node: one model per process, no parameter server ("one model per device").

Params are documented in ``topologies/README.md`` ("Params of solo_trainer"). Replica
*i* trains one MLP alone on the CSV training files with the hyperparameters of
``params.configs[i]`` (a list of tables) or of the *i*-th point of ``params.grid``
(a table of lists, expanded in file order with the last key varying fastest, as
nested loops would); keys it leaves out come from the node's own params, then from
:data:`DEFAULTS`. The node must have exactly one replica per config.

Each replica scores the validation file after every epoch, writes its model to
``RUN_DIR/models/NODE-REPLICA/`` (``model.npz`` + ``model.json`` with the config and
the scores) and enqueues ``(replica int64, validation accuracy float64, model path
string)`` into every queue in its ``writes`` (a leaderboard ranks them).

The data loading and the training loop (:func:`load_split`, :func:`make_config`,
:func:`fit`, :func:`train_from_table`) are shared with the predictor node, which
can train its model at start.
"""

from __future__ import annotations

import difflib
import itertools
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from nodes import model
from nodes.reader import make_decoder
from qpipe import kernels
from qpipe.inputs import list_files
from qpipe.runtime import NodeContext
from qpipe.xp import array_module
from nodes import node_main

#: Hyperparameters a config may set, with their defaults.
DEFAULTS: Mapping[str, Any] = {
    "lr": 0.5,
    "hidden": [128],
    "batch_size": 32,
    "epochs": 20,
    "seed": 0,
    "optimizer": "sgd",
    "momentum": 0.9,
    "l2": 0.0,
    "input_scale": 1.0,
}
#: Keys that say where the data is and how a row becomes (features, label).
DATA_KEYS = ("train", "validation", "test", "components", "header", "delimiter")

Data = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- configs


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def make_config(base: Mapping[str, Any], override: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``base`` updated with ``override``, every hyperparameter checked.

    Raises
    ------
    ValueError
        Naming ``where`` and the key, for an unknown key or a bad value.
    """
    cfg = {k: base.get(k, v) for k, v in DEFAULTS.items()}
    for k, v in override.items():
        if k not in DEFAULTS:
            close = difflib.get_close_matches(k, list(DEFAULTS), n=1)
            hint = f'; did you mean "{close[0]}"?' if close else f"; a config may set {', '.join(DEFAULTS)}"
            raise ValueError(f"{where}.{k}: unknown hyperparameter{hint}")
        cfg[k] = v
    hidden = cfg["hidden"]
    if _is_int(hidden):
        hidden = [hidden]
    checks = {
        "lr": _is_num(cfg["lr"]) and cfg["lr"] > 0,
        "hidden": isinstance(hidden, list) and all(_is_int(h) and h >= 1 for h in hidden),
        "batch_size": _is_int(cfg["batch_size"]) and cfg["batch_size"] >= 1,
        "epochs": _is_int(cfg["epochs"]) and cfg["epochs"] >= 1,
        "seed": _is_int(cfg["seed"]) and cfg["seed"] >= 0,
        "optimizer": cfg["optimizer"] in ("sgd", "momentum", "adam"),
        "momentum": _is_num(cfg["momentum"]) and 0 <= cfg["momentum"] < 1,
        "l2": _is_num(cfg["l2"]) and cfg["l2"] >= 0,
        "input_scale": _is_num(cfg["input_scale"]) and cfg["input_scale"] > 0,
    }
    wanted = {
        "lr": "a number > 0", "hidden": "a list of layer widths >= 1, e.g. [128] or [128, 64]",
        "batch_size": "an integer >= 1", "epochs": "an integer >= 1", "seed": "an integer >= 0",
        "optimizer": '"sgd", "momentum" or "adam"', "momentum": "a number in [0, 1)",
        "l2": "a number >= 0", "input_scale": "a number > 0",
    }
    for k, ok in checks.items():
        if not ok:
            raise ValueError(f"{where}.{k}: expected {wanted[k]}, got {cfg[k]!r}")
    cfg["hidden"] = list(hidden)
    return cfg


def expand_grid(grid: Mapping[str, Any], where: str = "params.grid") -> list[dict[str, Any]]:
    """All combinations of a grid's values, in a stable order (file order, last key fastest).

    >>> expand_grid({"lr": [0.1, 0.5], "hidden": [[128], [64]]})  # doctest: +NORMALIZE_WHITESPACE
    [{'lr': 0.1, 'hidden': [128]}, {'lr': 0.1, 'hidden': [64]},
     {'lr': 0.5, 'hidden': [128]}, {'lr': 0.5, 'hidden': [64]}]
    """
    keys = list(grid)
    for k in keys:
        if not isinstance(grid[k], list) or not grid[k]:
            raise ValueError(f"{where}.{k}: expected a non-empty list of values to try, got {grid[k]!r}; "
                             f"write {k} = [{grid[k]!r}] for a single value")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def replica_configs(params: Mapping[str, Any], node: str) -> list[dict[str, Any]]:
    """Every replica's config, from ``params.configs`` or ``params.grid`` over the node's own params."""
    if params.get("configs") is not None and params.get("grid") is not None:
        raise ValueError(f"node {node!r}: give params.configs or params.grid, not both")
    if params.get("configs") is not None:
        raw, where = list(params["configs"]), "params.configs[{}]"
    elif params.get("grid") is not None:
        raw, where = expand_grid(params["grid"]), "params.grid point {}"
    else:
        raw, where = [{}], "params"
    return [make_config(params, r, where.format(i)) for i, r in enumerate(raw)]


# --------------------------------------------------------------------------- data


def load_split(table: Mapping[str, Any], key: str, resolve: Callable[[str], Path], where: str = "params") -> Data:
    """Read ``table[key]`` (a CSV file, glob, or list of them) as ``(features float32 (n, d), labels int64)``."""
    spec = table.get(key)
    if spec is None:
        raise ValueError(f"{where}.{key}: missing; give a CSV file or glob, relative to the topology file")
    patterns = spec if isinstance(spec, list) else [spec]
    files = list_files([str(resolve(f)) for f in patterns])
    if not files:
        raise FileNotFoundError(f"{where}.{key}: no file matches {spec!r}")
    comps = table.get("components")
    if not isinstance(comps, list) or len(comps) != 2:
        raise ValueError(f"{where}.components: expected two components (features, label), got {comps!r}")
    decoder, _ = make_decoder(dict(table), files[0])
    xs, ys = [], []
    for f in files:
        x, y = decoder.read_all(f)
        xs.append(x.reshape((x.shape[0], -1)))
        ys.append(y.reshape(-1))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if y.dtype.kind not in "iu":
        raise ValueError(f"{where}.components[1]: the label must be an integer dtype, got {y.dtype}")
    return x.astype(np.float32), y.astype(np.int64)


# --------------------------------------------------------------------------- training


def fit(cfg: Mapping[str, Any], train: Data, validation: Data | None, xp: ModuleType,
        n_classes: int | None = None,
        on_epoch: Callable[[int, float | None], bool | None] | None = None) -> dict[str, Any]:
    """Train one MLP with mini-batch SGD / momentum / Adam (fused kernels) and return its parameters.

    ``on_epoch(epoch, validation_accuracy)`` is called after each epoch; returning
    ``True`` stops training early. Inputs are multiplied by ``cfg["input_scale"]``.
    """
    x, y = train
    scale = float(cfg["input_scale"])
    n_classes = n_classes or int(max(y.max(), validation[1].max() if validation else 0)) + 1
    sizes = [x.shape[1], *cfg["hidden"], n_classes]
    params = model.init_params(sizes, cfg["seed"], xp=xp)
    xd, yd = xp.asarray(x * scale, dtype=xp.float32), xp.asarray(y)
    xv = yv = None
    if validation is not None:
        xv, yv = xp.asarray(validation[0] * scale, dtype=xp.float32), xp.asarray(validation[1])
    state = {name: [xp.zeros_like(p) for _ in range(2)] for name, p in params.items()}
    rng = np.random.default_rng(cfg["seed"] + 1000)
    lr, bs, opt, l2 = float(cfg["lr"]), int(cfg["batch_size"]), cfg["optimizer"], float(cfg["l2"])
    step = 0
    acc = None
    for epoch in range(1, cfg["epochs"] + 1):
        order = xp.asarray(rng.permutation(len(x)))
        for start in range(0, len(x), bs):
            batch = order[start:start + bs]
            _, grads = model.loss_and_grads(params, xd[batch], yd[batch], xp, l2=l2)
            step += 1
            for name, g in grads.items():
                if opt == "sgd":
                    kernels.sgd_update(params[name], g, lr)
                elif opt == "momentum":
                    kernels.momentum_update(params[name], g, state[name][0], lr, float(cfg["momentum"]))
                else:
                    kernels.adam_update(params[name], g, state[name][0], state[name][1], lr, step=step)
        if xv is not None:
            acc = model.accuracy(params, xv, yv, xp)
        if on_epoch is not None and on_epoch(epoch, acc):
            break
    return params


def score(params: Mapping[str, Any], data: Data, scale: float, xp: ModuleType) -> float:
    """Accuracy of a model on ``(features, labels)`` with the inputs scaled by ``scale``."""
    return model.accuracy(params, xp.asarray(data[0] * scale, dtype=xp.float32), xp.asarray(data[1]), xp)


def train_from_table(table: Mapping[str, Any], resolve: Callable[[str], Path], xp: ModuleType, where: str,
                     log: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train a model from one table holding the data keys and hyperparameters; return ``(params, meta)``.

    ``meta`` holds the config, ``input_scale`` and the validation (and test) accuracy,
    ready for :func:`nodes.model.save_model`. Used by the predictor's ``params.train``.
    """
    hyper = {k: v for k, v in table.items() if k not in DATA_KEYS}
    cfg = make_config(DEFAULTS, hyper, where)
    t0 = time.monotonic()
    train = load_split(table, "train", resolve, where)
    val = load_split(table, "validation", resolve, where) if table.get("validation") else None
    params = fit(cfg, train, val, xp)
    meta: dict[str, Any] = {"config": cfg, "input_scale": cfg["input_scale"],
                            "train_seconds": round(time.monotonic() - t0, 3)}
    if val is not None:
        meta["validation_accuracy"] = score(params, val, cfg["input_scale"], xp)
    if table.get("test"):
        meta["test_accuracy"] = score(params, load_split(table, "test", resolve, where), cfg["input_scale"], xp)
    if log is not None:
        log.info("trained %s in %.2f s: %s", cfg, meta["train_seconds"],
                 ", ".join(f"{k}={meta[k]:.4f}" for k in ("validation_accuracy", "test_accuracy") if k in meta))
    return params, meta


# --------------------------------------------------------------------------- the node


def run(ctx: NodeContext) -> None:
    p = ctx.params
    configs = replica_configs(p, ctx.node.name)
    if len(configs) != ctx.replicas:
        source = ("params.configs lists" if p.get("configs") is not None else
                  "params.grid expands to" if p.get("grid") is not None else "params give")
        raise ValueError(f"node {ctx.node.name!r}: {source} {len(configs)} config(s) but the node has "
                         f"replicas = {ctx.replicas}; set replicas = {len(configs)} (one process per config)")
    cfg = configs[ctx.replica]
    xp = array_module(ctx.node.device)
    ctx.log.info("config %d of %d: %s (arrays on %s)", ctx.replica + 1, len(configs), cfg, xp.__name__)
    train = load_split(p, "train", ctx.path)
    val = load_split(p, "validation", ctx.path)
    test = load_split(p, "test", ctx.path) if p.get("test") else None
    t0 = time.monotonic()
    last, last_epoch = [t0], [0]

    def on_epoch(epoch: int, acc: float | None) -> bool:
        now = time.monotonic()
        if now - last[0] >= 0.5 or epoch == cfg["epochs"]:
            ctx.metric(epochs=epoch - last_epoch[0], last_val_accuracy=round(acc or 0.0, 4))
            last[0], last_epoch[0] = now, epoch
        return ctx.coord.should_stop()

    params = fit(cfg, train, val, xp, on_epoch=on_epoch)
    seconds = time.monotonic() - t0
    if ctx.coord.should_stop():
        raise RuntimeError(f"{ctx.name}: stopped before training finished")
    scale = cfg["input_scale"]
    results: dict[str, Any] = {"validation_accuracy": score(params, val, scale, xp)}
    if test is not None:
        results["test_accuracy"] = score(params, test, scale, xp)
    out = ctx.run_dir / "models" / f"{ctx.node.name}-{ctx.replica}"
    model.save_model(out, params, {"config": cfg, "input_scale": scale, "node": ctx.node.name,
                                   "replica": ctx.replica, "train_seconds": round(seconds, 3), **results})
    path = str(out.resolve())
    for q in ctx.outputs():
        q.enqueue((np.int64(ctx.replica), np.float64(results["validation_accuracy"]), path.encode()))
    ctx.log.info("trained in %.2f s: %s; model in %s", seconds,
                 ", ".join(f"{k}={v:.4f}" for k, v in results.items()), out)
    ctx.result(config=cfg, model=path, train_seconds=round(seconds, 3), **results)




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
