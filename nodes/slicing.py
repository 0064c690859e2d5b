# Pure math: imports numpy, nodes.model and the optimizer of qpipe.ps; no queues, no sockets,
# no files. Every exchange between slices is an explicit message yielded by a program.
"""Model parallelism: one MLP split over K slices in three ways, as message-passing programs.

A *program* is a generator run by one endpoint: the K slices are endpoints
``0 .. K-1`` and the driver (input, loss, final gather) is endpoint ``K``. A
program never touches a queue; it yields operations and its runner performs
them:

``Send(dst, kind, step, index, array, count)``
    deliver ``array`` to endpoint ``dst`` (never blocks the program's logic);
``Recv(src, kind, step, index)``
    the runner resumes the program with the matching :class:`Message`
    ``(array, count)`` once it has arrived (messages are matched by
    ``(src, kind, step, index)``, so arrival order does not matter);
``Note(what, value)``
    information for the runner: ``"loss"`` every step (driver), ``"done"``
    when training ends and the final gather of parameters begins.

:func:`simulate` runs the K + 1 programs in one process with in-memory
mailboxes (copying every array, as the wire would); ``nodes/model_slice.py``
runs the same programs over qpipe queues (one inbox queue per endpoint). The
arithmetic is therefore the same in tests and in real runs.

The three schemes (``L`` layers, sizes ``s_0 .. s_L``; unit ranges come from
:func:`unit_ranges`, i.e. ``numpy.array_split`` sizes):

``"vertical"``
    slice ``j`` owns columns ``c_j(k)`` of every ``W{k}`` and ``b{k}`` (1/K of
    the units of every layer). Forward: the driver broadcasts the input; after
    each hidden layer the slices all-gather their activations (each sends its
    ``(n, |c_j|)`` block to the K-1 others); the logits' column blocks go to the
    driver. Backward: the driver returns each slice its columns of
    ``dL/dlogits``; at each layer a slice computes the partial input gradient
    ``dz_j @ W_j.T`` for *all* input units and sends the row blocks of the
    other slices to them (a reduce-scatter, summed in slice order).
``"pipeline"``
    stage ``s`` owns whole layers (``stages[s]`` consecutive layers). A batch is
    cut into M micro-batches. Schedule: GPipe, all forward then all backward —
    each stage runs the forward pass of micro-batch 0, 1, ..., M-1 (sending each
    result on at once, so stage s+1 starts micro-batch m while stage s computes
    m+1), the driver computes the loss on the whole batch, then the backward
    passes flow back in order M-1, ..., 0 and each stage sums its gradients over
    the micro-batches and applies one update per step. GPipe rather than 1F1B:
    both have the same pipeline bubble, (K-1)/(M+K-1) of a step, for a given M;
    1F1B only saves activation memory (M micro-batches in flight instead of K),
    which these models do not need, and all-forward-first lets the driver
    compute the loss of the whole batch exactly as the unsliced model does.
``"blocks"``
    a partially connected network: ``W0`` is dense (slice ``j`` owns its
    columns, the input is broadcast), hidden layers ``W1 .. W{L-2}`` are
    block-diagonal (slice ``j`` owns block ``(j, j)`` only, so it needs no
    other slice's activations), and the last layer is dense: slice ``j`` owns
    rows ``r_j`` of ``W{L-1}`` and sends its partial logits ``h_j @ W_j`` (slice
    0 adds the bias) to the driver, which sums them in slice order. Backward:
    every slice gets the whole ``dL/dlogits`` (``n x classes``) and no other
    message. The unsliced equivalent is the dense network whose off-diagonal
    blocks are zero and whose gradients are masked (:func:`block_mask`).

Every slice applies its own optimizer (``qpipe.ps.Optimizer``: SGD, momentum or
Adam, all elementwise) to its own pieces, so the update of a piece is the same
arithmetic as the update of that part of the whole model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict, deque
from collections.abc import Generator, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy

from nodes import model
from qpipe.ps import Optimizer

__all__ = [
    "ACT",
    "CTRL",
    "DLOGITS",
    "GRAD",
    "KIND_NAMES",
    "LOGITS",
    "PARAM",
    "SCHEMES",
    "STATS",
    "Message",
    "Note",
    "Recv",
    "Send",
    "SliceConfig",
    "Traffic",
    "X",
    "block_mask",
    "driver_program",
    "init_params",
    "join_params",
    "piece_names",
    "reference_train",
    "run_programs",
    "simulate",
    "slice_program",
    "split_params",
    "stage_layers",
    "unit_ranges",
]

Array = Any  # numpy.ndarray or cupy.ndarray

SCHEMES = ("vertical", "pipeline", "blocks")

# Message kinds (the second field of every header).
CTRL, X, ACT, GRAD, LOGITS, DLOGITS, PARAM, STATS = range(8)
KIND_NAMES = ("ctrl", "x", "act", "grad", "logits", "dlogits", "param", "stats")
#: ``count`` of a CTRL message that ends training.
STOP = -1


# --------------------------------------------------------------------------- operations


@dataclasses.dataclass(frozen=True)
class Send:
    """Deliver ``array`` (and the integer ``count``) to endpoint ``dst``."""

    dst: int
    kind: int
    step: int
    index: int
    array: Array
    count: int = 0


@dataclasses.dataclass(frozen=True)
class Recv:
    """Wait for the message ``(src, kind, step, index)``; the program is resumed with a :class:`Message`."""

    src: int
    kind: int
    step: int
    index: int


@dataclasses.dataclass(frozen=True)
class Note:
    """Tell the runner something (``"loss"`` with a float, ``"done"`` when training ends)."""

    what: str
    value: Any = None


class Message(NamedTuple):
    """What a :class:`Recv` returns."""

    array: Array
    count: int


Program = Generator[Any, Any, Any]


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class SliceConfig:
    """How a network is split and trained.

    Parameters
    ----------
    scheme : {"vertical", "pipeline", "blocks"}
    layers : sequence of int
        Layer sizes, inputs first and classes last.
    slices : int
        K, the number of slices (pipeline: stages).
    optimizer, lr, momentum : optimizer settings (as for ``qpipe.ps.Optimizer``).
    micro_batches : int
        Pipeline only: micro-batches per step (fewer when a batch has fewer rows).
    stages : sequence of int, optional
        Pipeline only: layers per stage, summing to ``len(layers) - 1``
        (default: :func:`stage_layers`, balanced by parameter count).
    """

    scheme: str
    layers: tuple[int, ...]
    slices: int
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    micro_batches: int = 1
    stages: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        n_layers = len(self.layers) - 1
        k = self.slices
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        model.param_names(self.layers)  # checks the sizes
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"slices must be an integer >= 1, got {k!r}")
        if self.scheme == "pipeline":
            if k > n_layers:
                raise ValueError(f"a pipeline of {k} stages needs at least {k} layers, got {n_layers} "
                                 f"(layers {list(self.layers)})")
            if not (isinstance(self.micro_batches, int) and self.micro_batches >= 1):
                raise ValueError(f"micro_batches must be an integer >= 1, got {self.micro_batches!r}")
            stages = tuple(self.stages) if self.stages is not None else stage_layers(self.layers, k)
            if len(stages) != k or sum(stages) != n_layers or min(stages) < 1:
                raise ValueError(f"stages must list {k} positive layer counts summing to {n_layers}, "
                                 f"got {list(stages)}")
            object.__setattr__(self, "stages", stages)
        else:
            if self.stages is not None:
                raise ValueError(f"stages applies to the pipeline scheme only, not {self.scheme!r}")
            widths = self.layers[1:] if self.scheme == "vertical" else self.layers[1:-1]
            if self.scheme == "blocks" and n_layers < 2:
                raise ValueError(f"the blocks scheme needs at least one hidden layer, got layers {list(self.layers)}")
            if min(widths) < k:
                raise ValueError(f"{self.scheme} slicing gives every slice units of every "
                                 f"{'layer' if self.scheme == 'vertical' else 'hidden layer'}: {k} slices need "
                                 f"at least {k} units in each, got layers {list(self.layers)}")

    @property
    def n_layers(self) -> int:
        return len(self.layers) - 1

    @property
    def driver(self) -> int:
        """The driver's endpoint number (K)."""
        return self.slices

    def optimizer_for(self) -> Optimizer:
        return Optimizer(self.optimizer, lr=self.lr, momentum=self.momentum)


def unit_ranges(n: int, k: int) -> list[tuple[int, int]]:
    """Split ``n`` units into ``k`` contiguous ranges, as ``numpy.array_split`` does (larger first)."""
    base, extra = divmod(n, k)
    out, start = [], 0
    for j in range(k):
        stop = start + base + (1 if j < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def stage_layers(layers: Sequence[int], k: int) -> tuple[int, ...]:
    """Layers per pipeline stage: contiguous groups minimising the largest stage's parameter count."""
    sizes = [int(n) for n in layers]
    cost = [sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1)]
    n = len(cost)
    if not 1 <= k <= n:
        raise ValueError(f"cannot cut {n} layers into {k} stages")
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    # best[s][i]: smallest possible largest stage when the first i layers form s stages.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for s in range(1, k + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    bounds, i = [], n
    for s in range(k, 0, -1):
        bounds.append(i - cut[s][i])
        i = cut[s][i]
    return tuple(reversed(bounds))


# --------------------------------------------------------------------------- parameters


def block_mask(layers: Sequence[int], k: int) -> dict[str, numpy.ndarray]:
    """0/1 masks of the blocks network's weights: dense first and last layer, block-diagonal between."""
    sizes = [int(n) for n in layers]
    n_layers = len(sizes) - 1
    masks = {}
    for layer in range(n_layers):
        m = numpy.ones((sizes[layer], sizes[layer + 1]))
        if 0 < layer < n_layers - 1:
            m[:] = 0
            for (r0, r1), (c0, c1) in zip(unit_ranges(sizes[layer], k), unit_ranges(sizes[layer + 1], k)):
                m[r0:r1, c0:c1] = 1
        masks[f"W{layer}"] = m
    return masks


def init_params(cfg: SliceConfig, seed: int, dtype: Any = "float32", xp: ModuleType = numpy) -> dict[str, Array]:
    """The whole model's initial parameters: :func:`nodes.model.init_params`, masked for ``"blocks"``.

    For ``"blocks"`` the off-diagonal blocks are zeroed and each diagonal block
    is rescaled to He initialisation for its true fan-in (``|r_j|`` rows
    instead of ``s_k``), so the sparse network starts as well scaled as a dense one.
    """
    params = model.init_params(cfg.layers, seed, dtype, numpy)
    if cfg.scheme == "blocks":
        sizes = cfg.layers
        for name, m in block_mask(sizes, cfg.slices).items():
            layer = int(name[1:])
            if 0 < layer < cfg.n_layers - 1:
                W = params[name] * m.astype(params[name].dtype)
                for r0, r1 in unit_ranges(sizes[layer], cfg.slices):
                    W[r0:r1] *= numpy.sqrt(sizes[layer] / (r1 - r0)).astype(W.dtype)
                params[name] = W
    return {k: xp.asarray(v) for k, v in params.items()}


def _piece_slices(cfg: SliceConfig, j: int) -> dict[str, tuple[slice, ...]]:
    """Which part of each whole parameter slice ``j`` owns, as index tuples."""
    sizes, k, n_layers = cfg.layers, cfg.slices, cfg.n_layers
    out: dict[str, tuple[slice, ...]] = {}
    if cfg.scheme == "pipeline":
        first = sum(cfg.stages[:j])  # type: ignore[index]
        for layer in range(first, first + cfg.stages[j]):  # type: ignore[index]
            out[f"W{layer}"], out[f"b{layer}"] = (slice(None), slice(None)), (slice(None),)
        return out
    for layer in range(n_layers):
        c0, c1 = unit_ranges(sizes[layer + 1], k)[j]
        if cfg.scheme == "vertical" or layer == 0:
            out[f"W{layer}"], out[f"b{layer}"] = (slice(None), slice(c0, c1)), (slice(c0, c1),)
        elif layer < n_layers - 1:
            r0, r1 = unit_ranges(sizes[layer], k)[j]
            out[f"W{layer}"], out[f"b{layer}"] = (slice(r0, r1), slice(c0, c1)), (slice(c0, c1),)
        else:
            r0, r1 = unit_ranges(sizes[layer], k)[j]
            out[f"W{layer}"] = (slice(r0, r1), slice(None))
            if j == 0:
                out[f"b{layer}"] = (slice(None),)
    return out


def piece_names(cfg: SliceConfig, j: int) -> list[str]:
    """Names of the parameter pieces slice ``j`` owns, in the order they are gathered."""
    return list(_piece_slices(cfg, j))


def split_params(cfg: SliceConfig, params: Mapping[str, Array], j: int) -> dict[str, Array]:
    """Slice ``j``'s pieces of the whole parameters (contiguous copies, safe to update in place)."""
    return {name: params[name][idx].copy() for name, idx in _piece_slices(cfg, j).items()}


def join_params(cfg: SliceConfig, pieces: Sequence[Mapping[str, Array]], xp: ModuleType = numpy) -> dict[str, Array]:
    """Assemble the whole parameters from every slice's pieces (zeros where no slice owns a weight)."""
    dtype = next(iter(pieces[0].values())).dtype
    out = {name: xp.zeros(shape, dtype=dtype) for name, shape in model.param_shapes(cfg.layers).items()}
    for j, piece in enumerate(pieces):
        for name, idx in _piece_slices(cfg, j).items():
            out[name][idx] = piece[name]
    return out


# --------------------------------------------------------------------------- the unsliced reference


def reference_train(cfg: SliceConfig, params: Mapping[str, Array], batches: Iterable[tuple[Array, Array]],
                    xp: ModuleType = numpy) -> tuple[dict[str, Array], list[float]]:
    """Train the whole (unsliced) model on ``batches``; returns the final parameters and the losses.

    For ``"blocks"`` the gradients are multiplied by :func:`block_mask`, so the
    zero blocks stay zero: this is the unsliced block-diagonal network.
    """
    params = {k: v.copy() for k, v in params.items()}
    opt = cfg.optimizer_for()
    mask = ({k: xp.asarray(m, dtype=params[k].dtype) for k, m in block_mask(cfg.layers, cfg.slices).items()}
            if cfg.scheme == "blocks" else None)
    losses = []
    for x, y in batches:
        loss, grads = model.loss_and_grads(params, x, y, xp)
        if mask is not None:
            for name, m in mask.items():
                grads[name] *= m
        opt.apply(params, grads)
        losses.append(float(loss))
    return params, losses


# --------------------------------------------------------------------------- slice programs


def slice_program(cfg: SliceConfig, j: int, params: dict[str, Array], xp: ModuleType = numpy) -> Program:
    """The program of slice ``j``: train on the driver's steps until it says stop, then send the pieces.

    ``params`` are this slice's pieces (:func:`split_params`), updated in place.
    Returns them at the end.
    """
    step_fn = {"vertical": _vertical_step, "pipeline": functools.partial(_pipeline_step, buffers={}),
               "blocks": _blocks_step}[cfg.scheme]
    opt = cfg.optimizer_for()
    step = 0
    while True:
        ctrl = yield Recv(cfg.driver, CTRL, step, 0)
        if ctrl.count == STOP:
            break
        grads = yield from step_fn(cfg, j, params, step, ctrl, xp)
        opt.apply(params, grads)
        step += 1
    yield Note("done", step)
    for i, name in enumerate(piece_names(cfg, j)):
        yield Send(cfg.driver, PARAM, 0, i, params[name])
    return params


def _vertical_step(cfg: SliceConfig, j: int, params: dict[str, Array], step: int, ctrl: Message,
                   xp: ModuleType) -> Generator[Any, Any, dict[str, Array]]:
    k, n_layers, others = cfg.slices, cfg.n_layers, [i for i in range(cfg.slices) if i != j]
    a = xp.asarray(ctrl.array)  # the whole input batch
    cache = []
    for layer in range(n_layers):
        z = model.dense_forward(a, params[f"W{layer}"], params[f"b{layer}"])
        cache.append((a, z))
        if layer == n_layers - 1:
            yield Send(cfg.driver, LOGITS, step, 0, z)
            break
        h = model.relu(z, xp)
        for i in others:
            yield Send(i, ACT, step, layer, h)
        blocks = []
        for i in range(k):
            blocks.append(h if i == j else xp.asarray((yield Recv(i, ACT, step, layer)).array))
        a = xp.concatenate(blocks, axis=1)
    dz = xp.asarray((yield Recv(cfg.driver, DLOGITS, step, 0)).array)
    grads: dict[str, Array] = {}
    for layer in range(n_layers - 1, -1, -1):
        a, _ = cache[layer]
        if layer == 0:
            grads["W0"], grads["b0"] = a.T @ dz, dz.sum(axis=0)
            break
        da_all, grads[f"W{layer}"], grads[f"b{layer}"] = model.dense_backward(dz, a, params[f"W{layer}"])
        rows = unit_ranges(cfg.layers[layer], k)
        for i in others:
            yield Send(i, GRAD, step, layer, da_all[:, rows[i][0]:rows[i][1]])
        da = None
        for i in range(k):  # NOTE: summed in slice order, the same on every slice and every run
            part = da_all[:, rows[j][0]:rows[j][1]] if i == j else xp.asarray((yield Recv(i, GRAD, step, layer)).array)
            da = part if da is None else da + part
        dz = model.relu_backward(da, cache[layer - 1][1])
    return grads


def _blocks_step(cfg: SliceConfig, j: int, params: dict[str, Array], step: int, ctrl: Message,
                 xp: ModuleType) -> Generator[Any, Any, dict[str, Array]]:
    last = cfg.n_layers - 1
    a = xp.asarray(ctrl.array)
    cache = []
    for layer in range(last):
        z = model.dense_forward(a, params[f"W{layer}"], params[f"b{layer}"])
        cache.append((a, z))
        a = model.relu(z, xp)
    partial = a @ params[f"W{last}"]
    if f"b{last}" in params:
        partial = partial + params[f"b{last}"]
    yield Send(cfg.driver, LOGITS, step, 0, partial)
    dlogits = xp.asarray((yield Recv(cfg.driver, DLOGITS, step, 0)).array)
    grads: dict[str, Array] = {}
    da, grads[f"W{last}"], db = model.dense_backward(dlogits, a, params[f"W{last}"])
    if f"b{last}" in params:
        grads[f"b{last}"] = db
    for layer in range(last - 1, -1, -1):
        a_in, z = cache[layer]
        dz = model.relu_backward(da, z)
        if layer == 0:
            grads["W0"], grads["b0"] = a_in.T @ dz, dz.sum(axis=0)
        else:
            da, grads[f"W{layer}"], grads[f"b{layer}"] = model.dense_backward(dz, a_in, params[f"W{layer}"])
    return {name: grads[name] for name in params}


def _buffer(buffers: dict[str, Array], name: str, like: Array, xp: ModuleType) -> Array:
    """A scratch array like ``like``, made once and kept across steps."""
    buf = buffers.get(name)
    if buf is None:
        buf = buffers[name] = xp.empty_like(like)
    return buf


def _pipeline_step(cfg: SliceConfig, s: int, params: dict[str, Array], step: int, ctrl: Message,
                   xp: ModuleType, buffers: dict[str, Array]) -> Generator[Any, Any, dict[str, Array]]:
    n_micro = ctrl.count
    first = sum(cfg.stages[:s])  # type: ignore[index]
    mine = range(first, first + cfg.stages[s])  # type: ignore[index]
    is_last = mine[-1] == cfg.n_layers - 1
    caches = []
    for m in range(n_micro):  # forward: micro-batch 0, 1, ..., M-1
        msg = yield (Recv(cfg.driver, X, step, m) if s == 0 else Recv(s - 1, ACT, step, m))
        a = xp.asarray(msg.array)
        cache = []
        for layer in mine:
            z = model.dense_forward(a, params[f"W{layer}"], params[f"b{layer}"])
            cache.append((a, z))
            a = z if layer == cfg.n_layers - 1 else model.relu(z, xp)
        caches.append(cache)
        yield (Send(cfg.driver, LOGITS, step, m, a) if is_last else Send(s + 1, ACT, step, m, a))
    grads: dict[str, Array] = {}
    for m in range(n_micro - 1, -1, -1):  # backward: M-1, ..., 0, gradients summed
        msg = yield (Recv(cfg.driver, DLOGITS, step, m) if is_last else Recv(s + 1, GRAD, step, m))
        d = xp.asarray(msg.array)
        cache = caches[m]
        dz = d if is_last else model.relu_backward(d, cache[-1][1])
        for i in range(len(mine) - 1, -1, -1):
            layer = mine[i]
            a, _ = cache[i]
            name, W = f"W{layer}", params[f"W{layer}"]
            # NOTE: weight gradients are summed into buffers kept across steps: a fresh
            # (in x out) array per micro-batch costs more in page faults than the product itself.
            if name not in grads:
                grads[name] = xp.matmul(a.T, dz, out=_buffer(buffers, name, W, xp))
            else:
                grads[name] += xp.matmul(a.T, dz, out=_buffer(buffers, name + ":part", W, xp))
            gb = dz.sum(axis=0)
            grads[f"b{layer}"] = gb if f"b{layer}" not in grads else grads[f"b{layer}"] + gb
            if i > 0:
                dz = model.relu_backward(dz @ W.T, cache[i - 1][1])
            elif s > 0:
                yield Send(s - 1, GRAD, step, m, dz @ W.T)
        caches[m] = None  # free the activations of this micro-batch
    return {name: grads[name] for name in params}


# --------------------------------------------------------------------------- the driver


def _micro_bounds(n: int, m: int) -> list[tuple[int, int]]:
    return unit_ranges(n, max(1, min(m, n)))


def driver_program(cfg: SliceConfig, batches: Iterable[tuple[Array, Array]], xp: ModuleType = numpy) -> Program:
    """The driver's program: feed every batch, compute the loss, then stop the slices and gather the model.

    ``batches`` yields ``(x, y)`` with ``x`` already scaled and in the model's
    dtype. Yields ``Note("loss", float)`` once per step. Returns the whole
    trained parameters (:func:`join_params` of every slice's pieces).
    """
    k = cfg.slices
    step, dtype = 0, numpy.float32
    for x, y in batches:
        x = xp.asarray(x)
        n, dtype = int(x.shape[0]), x.dtype
        if cfg.scheme == "pipeline":
            bounds = _micro_bounds(n, cfg.micro_batches)
            for s in range(k):
                yield Send(s, CTRL, step, 0, x[:0, :0], count=len(bounds))
            for m, (a, b) in enumerate(bounds):
                yield Send(0, X, step, m, x[a:b])
            outs = []
            for m in range(len(bounds)):
                outs.append(xp.asarray((yield Recv(k - 1, LOGITS, step, m)).array))
            logits = xp.concatenate(outs)
        else:
            for j in range(k):
                yield Send(j, CTRL, step, 0, x, count=n)
            parts = []
            for j in range(k):
                parts.append(xp.asarray((yield Recv(j, LOGITS, step, 0)).array))
            if cfg.scheme == "vertical":
                logits = xp.concatenate(parts, axis=1)
            else:
                logits = parts[0]
                for p in parts[1:]:
                    logits = logits + p
        loss, dlogits = model.softmax_xent(xp.asarray(logits), y, xp)
        if cfg.scheme == "pipeline":
            for m in range(len(bounds) - 1, -1, -1):
                a, b = bounds[m]
                yield Send(k - 1, DLOGITS, step, m, dlogits[a:b])
        elif cfg.scheme == "vertical":
            for j, (c0, c1) in enumerate(unit_ranges(cfg.layers[-1], k)):
                yield Send(j, DLOGITS, step, 0, dlogits[:, c0:c1])
        else:
            for j in range(k):
                yield Send(j, DLOGITS, step, 0, dlogits)
        yield Note("loss", float(loss))
        step += 1
    yield Note("done", step)
    empty = xp.zeros((0,), dtype=dtype)
    for j in range(k):
        yield Send(j, CTRL, step, 0, empty, count=STOP)
    pieces = []
    for j in range(k):
        piece = {}
        for i, name in enumerate(piece_names(cfg, j)):
            piece[name] = xp.asarray((yield Recv(j, PARAM, 0, i)).array)
        pieces.append(piece)
    return join_params(cfg, pieces, xp)


# --------------------------------------------------------------------------- in-process runner


@dataclasses.dataclass
class Traffic:
    """What :func:`simulate` counted: payload bytes and messages per endpoint, training only."""

    sent: dict[int, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    received: dict[int, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    messages: dict[int, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    by_kind: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    steps: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)

    @property
    def bytes_per_step(self) -> float:
        """Payload bytes crossing between endpoints per training step (each message counted once)."""
        return sum(self.sent.values()) / max(self.steps, 1)


def simulate(cfg: SliceConfig, params: Mapping[str, Array], batches: Iterable[tuple[Array, Array]],
             xp: ModuleType = numpy) -> tuple[dict[str, Array], list[dict[str, Array]], Traffic]:
    """Run the driver and the K slices in this process, exchanging explicit messages.

    Each program runs until it waits for a message that has not been sent yet;
    then the next one runs. Every sent array is copied (as the wire would), so
    no program can see another's memory.

    Returns
    -------
    params : dict
        The whole model the driver gathered at the end.
    pieces : list of dict
        Each slice's own final pieces (what the slices returned).
    traffic : Traffic
        Bytes and messages of the training steps (the final gather is not counted).

    Raises
    ------
    RuntimeError
        If every unfinished program waits for a message nobody will send (a deadlock).
    """
    k = cfg.slices
    programs: dict[int, Program] = {j: slice_program(cfg, j, split_params(cfg, params, j), xp) for j in range(k)}
    programs[k] = driver_program(cfg, batches, xp)
    results, traffic = run_programs(programs)
    return results[k], [results[j] for j in range(k)], traffic


def run_programs(programs: Mapping[int, Program]) -> tuple[dict[int, Any], Traffic]:
    """Run message-passing programs in turn until all have returned; returns their results and traffic.

    Traffic counts only messages sent before a program's ``Note("done")``; the
    ``steps`` of the traffic is the value of the highest endpoint's done note
    (the driver's).

    Raises
    ------
    RuntimeError
        If every unfinished program waits for a message nobody sent (a deadlock).
    """
    mail: dict[int, dict[tuple[int, int, int, int], deque]] = {e: defaultdict(deque) for e in programs}
    # A program that has started and not finished always waits for a message.
    waiting: dict[int, tuple[int, int, int, int]] = {}
    results: dict[int, Any] = {}
    traffic = Traffic()
    training = {e: True for e in programs}
    last = max(programs)
    while len(results) < len(programs):
        progressed = False
        for e, prog in programs.items():
            if e in results:
                continue
            value: Any = None
            if e in waiting:
                if not mail[e][waiting[e]]:
                    continue
                value = mail[e][waiting.pop(e)].popleft()
            progressed = True
            try:
                while True:
                    op = prog.send(value)
                    value = None
                    if isinstance(op, Send):
                        arr = op.array.copy()
                        mail[op.dst][(e, op.kind, op.step, op.index)].append(Message(arr, int(op.count)))
                        if training[e]:
                            traffic.sent[e] += int(arr.nbytes)
                            traffic.received[op.dst] += int(arr.nbytes)
                            traffic.messages[e] += 1
                            traffic.by_kind[KIND_NAMES[op.kind]] += int(arr.nbytes)
                    elif isinstance(op, Recv):
                        key = (op.src, op.kind, op.step, op.index)
                        if mail[e][key]:
                            value = mail[e][key].popleft()
                        else:
                            waiting[e] = key
                            break
                    elif isinstance(op, Note):
                        if op.what == "done":
                            training[e] = False
                            if e == last:
                                traffic.steps = int(op.value)
                        elif op.what == "loss":
                            traffic.losses.append(op.value)
                    else:
                        raise TypeError(f"endpoint {e} yielded {op!r}, not Send, Recv or Note")
            except StopIteration as stop:
                results[e] = stop.value
        if not progressed:
            stuck = {e: waiting.get(e) for e in programs if e not in results}
            raise RuntimeError(f"deadlock: endpoints wait for (src, kind, step, index) {stuck} that nobody sent")
    return results, traffic
