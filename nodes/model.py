# Shared node math: imports numpy only (for seeding and as a default); every array
# operation goes through the ``xp`` argument, so NumPy and CuPy run the same lines.
"""A multi-layer perceptron, written once against the NumPy API for NumPy and CuPy.

Pass ``xp=numpy`` or ``xp=cupy`` (for example ``qpipe.xp.array_module()``);
the arrays must live in that module. The model is pure-functional: parameters
are a ``dict`` of named arrays in a stable order, so parameter servers can
shard them by name and trainers can send gradients as the same names::

    sizes = [64, 128, 10]
    params = init_params(sizes, seed=0)                 # {"W0", "b0", "W1", "b1"}
    loss, grads = loss_and_grads(params, x, y, numpy)   # grads has the same names
    for name in param_names(sizes):
        kernels.sgd_update(params[name], grads[name], lr=0.5)

Layer ``k`` computes ``x @ W{k} + b{k}`` with ``W{k}`` of shape
``(sizes[k], sizes[k+1])``; hidden layers apply ReLU and the last layer's
outputs are logits for a softmax cross-entropy loss (mean over the batch).
Parameters are float32 by default (float64 for gradient checks). Inputs are
converted to the parameters' dtype and array module; labels are integer class
indices.

The per-layer pieces (:func:`dense_forward`, :func:`dense_backward`,
:func:`relu`, :func:`relu_backward`, :func:`softmax_xent`) are public so that
model-parallel nodes can run a slice of the network. :func:`save_model` and
:func:`load_model` store a trained model as ``model.npz`` (raw arrays, read
back without pickle) plus ``model.json`` (layer sizes and free-form metadata).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy

__all__ = [
    "accuracy",
    "backward",
    "dense_backward",
    "dense_forward",
    "forward",
    "init_params",
    "layer_sizes_of",
    "load_model",
    "log_softmax",
    "loss_and_grads",
    "param_names",
    "param_shapes",
    "predict",
    "probabilities",
    "relu",
    "relu_backward",
    "save_model",
    "softmax_xent",
]

Array = Any  # numpy.ndarray or cupy.ndarray
Params = Mapping[str, Array]
Cache = list[tuple[Array, Array]]


# --------------------------------------------------------------------------- parameters


def _check_sizes(layer_sizes: Sequence[int]) -> list[int]:
    try:
        sizes = [int(n) for n in layer_sizes]
        ok = len(sizes) >= 2 and all(n >= 1 for n in sizes) and sizes == list(layer_sizes)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"layer_sizes must list at least 2 positive integers (inputs, ..., classes), got {layer_sizes!r}"
        )
    return sizes


def param_names(layer_sizes: Sequence[int]) -> list[str]:
    """Return the parameter names in their stable order: ``["W0", "b0", "W1", "b1", ...]``."""
    n_layers = len(_check_sizes(layer_sizes)) - 1
    return [f"{kind}{k}" for k in range(n_layers) for kind in ("W", "b")]


def param_shapes(layer_sizes: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Return ``{name: shape}`` in :func:`param_names` order (``W{k}``: ``(in, out)``, ``b{k}``: ``(out,)``)."""
    sizes = _check_sizes(layer_sizes)
    shapes: dict[str, tuple[int, ...]] = {}
    for k, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"W{k}"] = (fan_in, fan_out)
        shapes[f"b{k}"] = (fan_out,)
    return shapes


def layer_sizes_of(params: Params) -> list[int]:
    """Recover the layer sizes from a parameter dict (checks names and shapes).

    Raises
    ------
    ValueError
        If a name is missing or unexpected, or the shapes do not chain.
    """
    n_layers = len(params) // 2
    try:
        sizes = [int(params["W0"].shape[0])] + [int(params[f"W{k}"].shape[1]) for k in range(n_layers)]
    except (KeyError, IndexError, AttributeError):
        sizes = []
    expected = param_shapes(sizes) if len(sizes) > 1 else {}
    got = {name: tuple(getattr(a, "shape", ())) for name, a in params.items()}
    if not expected or got != expected:
        raise ValueError(f"params do not form an MLP (W0, b0, W1, b1, ... with chaining shapes); got {got}")
    return sizes


def init_params(
    layer_sizes: Sequence[int], seed: int, dtype: str | numpy.dtype = "float32", xp: ModuleType = numpy
) -> dict[str, Array]:
    """Create He-initialised parameters (``W ~ N(0, 2/fan_in)``, ``b = 0``).

    The values come from ``numpy.random.default_rng(seed)`` in :func:`param_names`
    order, so the same seed gives the same parameters on every device.

    Parameters
    ----------
    layer_sizes : sequence of int
        Inputs, hidden widths, classes, e.g. ``[64, 128, 10]``.
    seed : int
        Seed of the NumPy generator.
    dtype : str or numpy.dtype, optional
        ``"float32"`` (default) or ``"float64"``.
    xp : module, optional
        ``numpy`` (default) or ``cupy``: where the arrays are placed.

    Returns
    -------
    dict of str to ndarray
        ``{"W0": ..., "b0": ..., ...}`` in :func:`param_names` order.

    Raises
    ------
    ValueError
        If the sizes are not at least two positive integers or the dtype is not float32/float64.
    """
    dt = numpy.dtype(dtype)
    if dt not in (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    rng = numpy.random.default_rng(seed)
    params: dict[str, Array] = {}
    for name, shape in param_shapes(layer_sizes).items():
        if name[0] == "W":
            host = rng.standard_normal(shape) * numpy.sqrt(2.0 / shape[0])
        else:
            host = numpy.zeros(shape)
        params[name] = xp.asarray(host.astype(dt))
    return params


# --------------------------------------------------------------------------- layers


def dense_forward(x: Array, W: Array, b: Array) -> Array:
    """Affine layer: ``x @ W + b`` for a batch ``x`` of shape ``(n, in)``."""
    return x @ W + b


def dense_backward(dz: Array, x: Array, W: Array) -> tuple[Array, Array, Array]:
    """Gradients of an affine layer given ``dz = dL/dz``: ``(dL/dx, dL/dW, dL/db)``."""
    return dz @ W.T, x.T @ dz, dz.sum(axis=0)


def relu(z: Array, xp: ModuleType) -> Array:
    """``max(z, 0)`` elementwise."""
    return xp.maximum(z, 0)


def relu_backward(da: Array, z: Array) -> Array:
    """Gradient through ReLU: ``da`` where the pre-activation ``z > 0``, else 0."""
    return da * (z > 0)


def log_softmax(logits: Array, xp: ModuleType) -> Array:
    """Row-wise log-softmax, stable for large logits (log-sum-exp with the row maximum subtracted)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def _labels(y: Any, n: int, n_classes: int, xp: ModuleType) -> Array:
    y = xp.asarray(y)
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {y.dtype}; convert with .astype(int)")
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the batch, got {y.shape}")
    if n and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got values from {int(y.min())} to {int(y.max())}")
    return y


def softmax_xent(logits: Array, y: Any, xp: ModuleType) -> tuple[Array, Array]:
    """Mean softmax cross-entropy over the batch and its gradient.

    Parameters
    ----------
    logits : ndarray, shape (n, classes)
    y : ndarray of int, shape (n,)
        Class indices.
    xp : module
        ``numpy`` or ``cupy``.

    Returns
    -------
    loss : scalar array (a NumPy scalar under NumPy, a 0-d array under CuPy)
        ``-mean(log_softmax(logits)[i, y[i]])`` (``float(loss)`` reads it; on a GPU that waits for the device).
    dlogits : ndarray, shape (n, classes)
        ``(softmax(logits) - onehot(y)) / n``.

    Raises
    ------
    TypeError, ValueError
        If the labels are not integers, do not match the batch, or are out of range.
    """
    n, n_classes = logits.shape
    y = _labels(y, n, n_classes, xp)
    logp = log_softmax(logits, xp)
    rows = xp.arange(n)
    loss = -logp[rows, y].mean()
    dlogits = xp.exp(logp)
    dlogits[rows, y] -= 1
    dlogits /= max(n, 1)
    return loss, dlogits


# --------------------------------------------------------------------------- whole network


def _inputs(params: Params, x: Any, xp: ModuleType) -> Array:
    W0 = params["W0"]
    x = xp.asarray(x, dtype=W0.dtype)
    if x.ndim != 2 or x.shape[1] != W0.shape[0]:
        raise ValueError(f"inputs must have shape (batch, {W0.shape[0]}), got {x.shape}")
    return x


def forward(params: Params, x: Any, xp: ModuleType) -> tuple[Array, Cache]:
    """Run the network on a batch.

    Parameters
    ----------
    params : dict of str to ndarray
        From :func:`init_params` (or pulled from parameter servers).
    x : array_like, shape (n, inputs)
        Converted to the parameters' dtype and to ``xp``.
    xp : module
        ``numpy`` or ``cupy``.

    Returns
    -------
    logits : ndarray, shape (n, classes)
    cache : list of (layer input, pre-activation) pairs, one per layer, for :func:`backward`.
    """
    n_layers = len(layer_sizes_of(params)) - 1
    a = _inputs(params, x, xp)
    cache: Cache = []
    for k in range(n_layers):
        z = dense_forward(a, params[f"W{k}"], params[f"b{k}"])
        cache.append((a, z))
        a = relu(z, xp) if k < n_layers - 1 else z
    return a, cache


def backward(params: Params, cache: Cache, dlogits: Array) -> dict[str, Array]:
    """Back-propagate ``dL/dlogits`` through the layers recorded in ``cache``.

    Returns
    -------
    dict of str to ndarray
        ``dL/dparam`` for every name, in :func:`param_names` order.
    """
    grads: dict[str, Array] = {}
    dz = dlogits
    for k in range(len(cache) - 1, -1, -1):
        a, _ = cache[k]
        da, grads[f"W{k}"], grads[f"b{k}"] = dense_backward(dz, a, params[f"W{k}"])
        if k > 0:
            dz = relu_backward(da, cache[k - 1][1])
    return {name: grads[name] for k in range(len(cache)) for name in (f"W{k}", f"b{k}")}


def loss_and_grads(
    params: Params, x: Any, y: Any, xp: ModuleType, l2: float = 0.0
) -> tuple[Array, dict[str, Array]]:
    """Mean softmax cross-entropy of a batch and its gradient for every parameter.

    Parameters
    ----------
    params : dict of str to ndarray
    x : array_like, shape (n, inputs)
    y : array_like of int, shape (n,)
        Class indices.
    xp : module
        ``numpy`` or ``cupy``.
    l2 : float, optional
        Weight decay: adds ``l2/2 * sum(W**2)`` over the weight matrices (not
        the biases) to the loss and ``l2 * W`` to their gradients.

    Returns
    -------
    loss : scalar array (a NumPy scalar under NumPy, a 0-d array under CuPy)
        ``float(loss)`` reads it (on a GPU that waits for the device).
    grads : dict of str to ndarray
        Same names, shapes and dtype as ``params``.

    Raises
    ------
    TypeError, ValueError
        If the inputs or labels do not fit the network.
    """
    logits, cache = forward(params, x, xp)
    loss, dlogits = softmax_xent(logits, y, xp)
    grads = backward(params, cache, dlogits)
    if l2:
        for k in range(len(cache)):
            W = params[f"W{k}"]
            loss = loss + (0.5 * l2) * (W * W).sum()
            grads[f"W{k}"] += l2 * W
    return loss, grads


def probabilities(params: Params, x: Any, xp: ModuleType) -> Array:
    """Class probabilities (softmax of the logits), shape ``(n, classes)``."""
    logits, _ = forward(params, x, xp)
    return xp.exp(log_softmax(logits, xp))


def predict(params: Params, x: Any, xp: ModuleType) -> Array:
    """Most probable class for each row, shape ``(n,)``."""
    logits, _ = forward(params, x, xp)
    return logits.argmax(axis=1)


def accuracy(params: Params, x: Any, y: Any, xp: ModuleType) -> float:
    """Fraction of rows whose predicted class equals the label (a Python float)."""
    pred = predict(params, x, xp)
    y = _labels(y, pred.shape[0], int(params[f"W{len(params) // 2 - 1}"].shape[1]), xp)
    return float((pred == y).mean()) if pred.shape[0] else 0.0


# --------------------------------------------------------------------------- files


def _to_host(a: Array) -> numpy.ndarray:
    return a.get() if hasattr(a, "get") else numpy.asarray(a)  # cupy.ndarray.get() copies to the host


def _json_default(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)  # NumPy/CuPy scalars, then anything


def save_model(directory: str | os.PathLike[str], params: Params, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``directory/model.npz`` (the parameters) and ``directory/model.json`` (sizes and ``meta``).

    Parameters
    ----------
    directory : path
        Created if missing; existing model files in it are replaced.
    params : dict of str to ndarray
        NumPy or CuPy arrays (copied to the host).
    meta : mapping, optional
        JSON-serialisable extras (scores, input scaling, ...); NumPy scalars are converted.

    Returns
    -------
    Path
        ``directory``.

    Raises
    ------
    ValueError
        If ``params`` is not an MLP's parameter dict.
    """
    sizes = layer_sizes_of(params)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    info = {**dict(meta or {}), "layer_sizes": sizes, "param_names": param_names(sizes)}
    info["dtype"] = str(params["W0"].dtype)
    # NOTE: write under temporary names, then rename, so a reader never sees half a model.
    with open(out / "model.npz.tmp", "wb") as f:
        numpy.savez(f, **{name: _to_host(params[name]) for name in param_names(sizes)})
    (out / "model.json.tmp").write_text(json.dumps(info, indent=1, default=_json_default))
    os.replace(out / "model.npz.tmp", out / "model.npz")
    os.replace(out / "model.json.tmp", out / "model.json")
    return out


def load_model(directory: str | os.PathLike[str], xp: ModuleType = numpy) -> tuple[dict[str, Array], dict[str, Any]]:
    """Read a model written by :func:`save_model` (never unpickles anything).

    Returns
    -------
    params : dict of str to ndarray
        In :func:`param_names` order, placed with ``xp``.
    meta : dict
        The contents of ``model.json`` (``layer_sizes``, ``param_names``, ``dtype`` and the saved extras).

    Raises
    ------
    FileNotFoundError
        If ``model.npz`` or ``model.json`` is missing.
    ValueError
        If the arrays do not form the MLP that ``model.json`` describes.
    """
    src = Path(directory)
    meta = json.loads((src / "model.json").read_text())
    with numpy.load(src / "model.npz", allow_pickle=False) as npz:
        host = {name: npz[name] for name in npz.files}
    if layer_sizes_of(host) != list(meta.get("layer_sizes", [])):
        raise ValueError(f"{src / 'model.npz'}: arrays are for layers {layer_sizes_of(host)}, "
                         f"but model.json says {meta.get('layer_sizes')}")
    return {name: xp.asarray(host[name]) for name in param_names(meta["layer_sizes"])}, meta
