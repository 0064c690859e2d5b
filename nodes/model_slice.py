"""Model-slice node: one slice of a model-parallel MLP, or the driver that feeds the slices.

Params are documented in ``topologies/README.md`` ("Params of model_slice"); the
math and the three split schemes (``vertical``, ``pipeline``, ``blocks``) are in
:mod:`nodes.slicing`. One topology has two ``model_slice`` nodes:

* ``role = "driver"`` (one replica): holds the model's configuration, dequeues
  mini-batches from its data queue, sends the input to the slices, computes the
  loss from the logits they return and sends ``dL/dlogits`` back. When the data
  queue is closed and drained it stops the slices, gathers their parameters,
  scores the ``test`` (and ``validation``) file, writes ``RUN_DIR/model/`` and
  reports the results, including every node's traffic (see below).
* ``role = "slice"`` (K replicas, replica ``j`` is slice ``j``): initialises the
  whole model from the driver's ``seed``, keeps its own pieces, runs its
  program and applies its own updates; at the end it sends its pieces and its
  traffic counters to the driver.

Queues: every endpoint has one FIFO *inbox* with items ``(header int64[5],
payload)`` and no fixed shapes; the header is ``[sender, kind, step, index,
count]`` and the payload dtype is the model's ``dtype``. Slice ``j`` reads the
``j``-th queue of the slice node's ``reads``; the driver reads its ``inbox``
and one data queue. A message that arrives before it is wanted is kept aside
until the program asks for it, so senders never wait for receivers except
when an inbox is full.

Costs: a node counts the bytes of the items it enqueues and dequeues (header
plus payload; ZeroMQ and msgpack framing not included) and the seconds it
spends inside queue calls (for the driver, also waiting for data). Training
time starts with a node's first message and ends when the driver stops the
slices, so start-up and the final gather are not counted. The driver's result
(lifted into ``summary.json``) has ``bytes_per_step`` (sent + received, per
node: ``"driver"``, ``"slice/0"``, ...), ``bytes_sent_per_step``,
``bytes_received_per_step``, ``wait_fraction`` (per node), and
``total_bytes_per_step`` (all bytes sent by all nodes, each message once).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

import qpipe
from nodes import model, slicing
from nodes.slicing import Message, Note, Recv, Send, SliceConfig
from qpipe.runtime import NodeContext
from qpipe.xp import array_module
from nodes import node_main

HEADER = 5
_SLICE_PARAMS = {"role", "driver"}


@dataclasses.dataclass
class LinkStats:
    """One endpoint's training traffic: totals over ``steps`` steps and ``seconds`` of training."""

    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    wait_seconds: float = 0.0
    seconds: float = 0.0

    FIELDS = ("steps", "bytes_sent", "bytes_received", "messages_sent", "messages_received",
              "wait_seconds", "seconds")

    def per_step(self, value: float) -> float:
        return value / max(self.steps, 1)

    @property
    def wait_fraction(self) -> float:
        return self.wait_seconds / self.seconds if self.seconds > 0 else 0.0

    def to_array(self) -> np.ndarray:
        return np.array([float(getattr(self, f)) for f in self.FIELDS], dtype=np.float64)

    @classmethod
    def from_array(cls, a: np.ndarray) -> LinkStats:
        v = dict(zip(cls.FIELDS, a.tolist()))
        return cls(**{k: (x if k.endswith("seconds") else int(x)) for k, x in v.items()})


def _host(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


class Link:
    """Runs a :mod:`nodes.slicing` program over qpipe queues, counting bytes and waiting time.

    Parameters
    ----------
    me : int
        This endpoint's number (slices ``0 .. K-1``, driver ``K``).
    inbox : qpipe.Queue
        This endpoint's inbox.
    peers : mapping of int to qpipe.Queue
        The inbox of every endpoint this one sends to.
    dtype : numpy dtype
        The payload dtype of every inbox (the model's dtype).
    timeout : float or None, optional
        Timeout of each queue call (default: the client's).

    Not thread-safe: one thread runs one link.
    """

    def __init__(self, me: int, inbox: qpipe.Queue, peers: Mapping[int, qpipe.Queue], dtype: Any,
                 timeout: Any = qpipe.client.DEFAULT) -> None:
        self.me = me
        self.inbox = inbox
        self.peers = dict(peers)
        self.dtype = np.dtype(dtype)
        self.timeout = timeout
        self.total = LinkStats()
        self.training: LinkStats | None = None  # frozen at Note("done")
        self._stash: dict[tuple[int, ...], Message] = {}
        self._t0: float | None = None

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def add_wait(self, seconds: float) -> None:
        """Count time the node spent waiting on another queue (the driver's data queue)."""
        if self.started:
            self.total.wait_seconds += seconds

    def send(self, dst: int, kind: int, step: int, index: int, array: Any, count: int = 0) -> None:
        """Enqueue one message into ``dst``'s inbox; blocks while that inbox is full."""
        payload = np.ascontiguousarray(_host(array))
        if payload.dtype != self.dtype:
            payload = payload.astype(self.dtype)
        header = np.array([self.me, kind, step, index, count], dtype=np.int64)
        t = time.perf_counter()
        if self._t0 is None:
            self._t0 = t
        self.peers[dst].enqueue((header, payload), timeout=self.timeout)
        self.total.wait_seconds += time.perf_counter() - t
        self.total.bytes_sent += header.nbytes + payload.nbytes
        self.total.messages_sent += 1

    def recv(self, src: int, kind: int, step: int, index: int) -> Message:
        """Return the message ``(src, kind, step, index)``, dequeuing (and keeping aside) others until it comes."""
        key = (src, kind, step, index)
        msg = self._stash.pop(key, None)
        t = time.perf_counter()
        while msg is None:
            header, payload = self.inbox.dequeue(timeout=self.timeout)
            if header.shape != (HEADER,):
                raise qpipe.InvalidArgumentError(f"queue {self.inbox.name!r}: a message header must have "
                                                 f"{HEADER} int64 fields, got shape {header.shape}")
            self.total.bytes_received += header.nbytes + payload.nbytes
            self.total.messages_received += 1
            got = tuple(int(v) for v in header[:4])
            item = Message(payload, int(header[4]))
            if got == key:
                msg = item
            elif got in self._stash:
                raise RuntimeError(f"queue {self.inbox.name!r}: message (sender, kind, step, index) {got} "
                                   "arrived twice; is another run using the same queues?")
            else:
                self._stash[got] = item
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now  # the first message starts training; waiting for it is start-up
        else:
            self.total.wait_seconds += now - t
        return msg

    def run(self, program: slicing.Program, on_note: Callable[[Note], None] | None = None) -> Any:
        """Run ``program`` to the end, performing its sends and receives; returns its return value."""
        value: Any = None
        try:
            while True:
                op = program.send(value)
                value = None
                if isinstance(op, Send):
                    self.send(op.dst, op.kind, op.step, op.index, op.array, op.count)
                elif isinstance(op, Recv):
                    value = self.recv(op.src, op.kind, op.step, op.index)
                elif isinstance(op, Note):
                    if op.what == "done":
                        self._freeze(int(op.value))
                    if on_note is not None:
                        on_note(op)
                else:
                    raise TypeError(f"endpoint {self.me}: program yielded {op!r}, not Send, Recv or Note")
        except StopIteration as stop:
            return stop.value

    def _freeze(self, steps: int) -> None:
        now = time.perf_counter()
        self.training = dataclasses.replace(self.total, steps=steps,
                                            seconds=now - self._t0 if self._t0 is not None else 0.0)

    def send_stats(self, dst: int) -> None:
        """Send this endpoint's training stats to ``dst`` (float64 bits carried in the payload dtype)."""
        stats = self.training or self.total
        self.send(dst, slicing.STATS, 0, 0, stats.to_array().view(self.dtype))

    def recv_stats(self, src: int) -> LinkStats:
        a = np.ascontiguousarray(self.recv(src, slicing.STATS, 0, 0).array)
        return LinkStats.from_array(a.view(np.float64))


# --------------------------------------------------------------------------- roles without a NodeContext


def run_slice(cfg: SliceConfig, j: int, link: Link, seed: int, dtype: Any, xp: ModuleType = np) -> LinkStats:
    """Be slice ``j``: initialise, train until the driver stops, send pieces and stats. Returns the stats."""
    params = slicing.split_params(cfg, slicing.init_params(cfg, seed, dtype, xp), j)
    link.run(slicing.slice_program(cfg, j, params, xp))
    link.send_stats(cfg.driver)
    return link.training or link.total


def run_driver(cfg: SliceConfig, link: Link, batches: Iterable[tuple[Any, Any]], xp: ModuleType = np,
               on_note: Callable[[Note], None] | None = None) -> tuple[dict[str, Any], dict[int, LinkStats]]:
    """Be the driver: train on ``batches``, gather the model and every slice's stats.

    Returns the whole trained parameters and the stats of every endpoint
    (slices ``0 .. K-1`` and the driver ``K``).
    """
    params = link.run(slicing.driver_program(cfg, batches, xp), on_note)
    stats = {j: link.recv_stats(j) for j in range(cfg.slices)}
    stats[cfg.driver] = link.training or link.total
    return params, stats


def traffic_results(stats: Mapping[int, LinkStats], names: Mapping[int, str]) -> dict[str, Any]:
    """The per-node cost maps the driver reports (``bytes_per_step`` and friends)."""
    out: dict[str, Any] = {"bytes_per_step": {}, "bytes_sent_per_step": {}, "bytes_received_per_step": {},
                           "wait_fraction": {}, "messages_per_step": {}}
    for e, s in sorted(stats.items()):
        n = names[e]
        out["bytes_per_step"][n] = round(s.per_step(s.bytes_sent + s.bytes_received))
        out["bytes_sent_per_step"][n] = round(s.per_step(s.bytes_sent))
        out["bytes_received_per_step"][n] = round(s.per_step(s.bytes_received))
        out["wait_fraction"][n] = round(s.wait_fraction, 4)
        out["messages_per_step"][n] = round(s.per_step(s.messages_sent + s.messages_received), 2)
    out["total_bytes_per_step"] = sum(out["bytes_sent_per_step"].values())
    return out


# --------------------------------------------------------------------------- the node


def config_of(params: Mapping[str, Any], slices: int) -> SliceConfig:
    """The :class:`SliceConfig` a driver's params describe."""
    stages = params.get("stages")
    return SliceConfig(
        scheme=params["scheme"], layers=tuple(params["layers"]), slices=slices,
        optimizer=params.get("optimizer", "sgd"), lr=float(params.get("lr", 0.1)),
        momentum=float(params.get("momentum", 0.9)), micro_batches=int(params.get("micro_batches", 4)),
        stages=tuple(stages) if stages is not None and params["scheme"] == "pipeline" else None)


class _Wiring:
    """Who is who in the topology: the driver and slice nodes, K, and every endpoint's inbox."""

    def __init__(self, ctx: NodeContext) -> None:
        topo, node, p = ctx.topology, ctx.node, ctx.params
        role = p.get("role")
        where = f"node {node.name!r}"
        if role == "driver":
            driver, other_key = node, "slices"
        elif role == "slice":
            driver, other_key = None, "driver"
        else:
            raise ValueError(f"{where}: params.role must be \"driver\" or \"slice\", got {role!r}")
        other = p.get(other_key)
        if not isinstance(other, str):
            raise ValueError(f"{where}: a {role} needs params.{other_key}, the name of the "
                             f"{'slice' if role == 'driver' else 'driver'} node")
        try:
            peer = topo.node(other)
        except KeyError:
            raise ValueError(f"{where}: params.{other_key} names no node {other!r}") from None
        if peer.kind != "model_slice":
            raise ValueError(f"{where}: params.{other_key} = {other!r} is a {peer.kind} node, not a model_slice")
        self.driver = driver or peer
        self.slices = peer if driver else node
        dp = self.driver.params_dict()
        if dp.get("role") != "driver":
            raise ValueError(f"{where}: node {self.driver.name!r} must have params.role = \"driver\"")
        if role == "slice":
            stray = sorted(set(p) - _SLICE_PARAMS)
            if stray:
                raise ValueError(f"{where}: a slice takes its model from the driver; move params {stray} "
                                 f"to node {self.driver.name!r}")
        for key in ("scheme", "layers", "inbox"):
            if key not in dp:
                raise ValueError(f"node {self.driver.name!r}: a driver needs params.{key}")
        if ("test" in dp or "validation" in dp) and "components" not in dp:
            raise ValueError(f"node {self.driver.name!r}: params.test and params.validation need params.components "
                             "(how a CSV row becomes features and label, as for reader)")
        self.k = self.slices.replicas
        if self.driver.replicas != 1:
            raise ValueError(f"node {self.driver.name!r}: a driver has exactly 1 replica, got {self.driver.replicas}")
        if len(self.slices.reads) != self.k:
            raise ValueError(f"node {self.slices.name!r}: reads must list one inbox per replica "
                             f"({self.k}), in slice order, got {list(self.slices.reads)}")
        self.inbox_of = {j: q for j, q in enumerate(self.slices.reads)}
        d_inbox = dp.get("inbox")
        if d_inbox not in self.driver.reads:
            raise ValueError(f"node {self.driver.name!r}: params.inbox must name one of its reads "
                             f"{list(self.driver.reads)}, got {d_inbox!r}")
        self.inbox_of[self.k] = d_inbox
        data = [q for q in self.driver.reads if q != d_inbox]
        if len(data) != 1:
            raise ValueError(f"node {self.driver.name!r}: reads must be its inbox {d_inbox!r} and one data queue, "
                             f"got {list(self.driver.reads)}")
        self.data = data[0]
        self.cfg = config_of(dp, self.k)
        self.dtype = np.dtype(dp.get("dtype", "float32"))
        self.params = dp
        for q in self.inbox_of.values():
            qs = topo.queue(q)
            if qs.kind != "fifo" or tuple(qs.dtypes) != ("int64", self.dtype.name):
                raise ValueError(f"queue {q!r}: an inbox of model_slice nodes must be a fifo queue with "
                                 f"dtypes [\"int64\", \"{self.dtype.name}\"] (header, payload in the model's "
                                 f"dtype) and no shapes, got {qs.kind} {list(qs.dtypes)}")

    def name_of(self, e: int) -> str:
        return "driver" if e == self.k else f"{self.slices.name}/{e}"

    def link(self, ctx: NodeContext, me: int, peers: Sequence[int]) -> Link:
        missing = [self.inbox_of[e] for e in peers if self.inbox_of[e] not in ctx.node.writes]
        if missing:
            raise ValueError(f"node {ctx.node.name!r}: writes must include the inboxes it sends to; "
                             f"add {missing}")
        return Link(me, ctx.queue(self.inbox_of[me]), {e: ctx.queue(self.inbox_of[e]) for e in peers},
                    self.dtype, ctx.timeout)


def _peers(cfg: SliceConfig, me: int) -> list[int]:
    k = cfg.slices
    if me == k:
        return list(range(k))
    if cfg.scheme == "vertical":
        return [i for i in range(k) if i != me] + [k]
    if cfg.scheme == "pipeline":
        return [i for i in (me - 1, me + 1) if 0 <= i < k] + [k]
    return [k]


def run(ctx: NodeContext) -> None:
    w = _Wiring(ctx)
    xp = array_module(ctx.node.device)
    if ctx.params.get("role") == "slice":
        _run_slice(ctx, w, xp)
    else:
        _run_driver(ctx, w, xp)


def _run_slice(ctx: NodeContext, w: _Wiring, xp: ModuleType) -> None:
    j = ctx.replica
    link = w.link(ctx, j, _peers(w.cfg, j))
    ctx.log.info("slice %d of %d (%s, layers %s), arrays on %s", j, w.k, w.cfg.scheme, list(w.cfg.layers),
                 "GPU (CuPy)" if xp is not np else "CPU (NumPy)")
    s = run_slice(w.cfg, j, link, int(w.params.get("seed", 0)), w.dtype, xp)
    ctx.metric(steps=s.steps, bytes_sent=s.bytes_sent, bytes_received=s.bytes_received,
               wait_seconds=round(s.wait_seconds, 3), last_wait_fraction=round(s.wait_fraction, 4))
    ctx.log.info("%d steps; %.0f bytes sent and %.0f received per step; waited on queues %.0f%% of %.2f s",
                 s.steps, s.per_step(s.bytes_sent), s.per_step(s.bytes_received), 100 * s.wait_fraction, s.seconds)


def _batches(ctx: NodeContext, w: _Wiring, link: Link) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    p = w.params
    source = ctx.queue(w.data)
    batch_size = int(p.get("batch_size", 32))
    max_steps = p.get("max_steps")
    scale = w.dtype.type(float(p.get("input_scale", 1.0)))
    steps = 0
    while not ctx.coord.should_stop() and (max_steps is None or steps < int(max_steps)):
        t = time.perf_counter()
        try:
            x, y = source.dequeue_up_to(batch_size)
        except qpipe.OutOfRangeError:
            return
        link.add_wait(time.perf_counter() - t)
        steps += 1
        yield np.asarray(x, dtype=w.dtype) * scale, np.asarray(y)


def _run_driver(ctx: NodeContext, w: _Wiring, xp: ModuleType) -> None:
    p, cfg = w.params, w.cfg
    link = w.link(ctx, w.k, _peers(cfg, w.k))
    extra = f", {cfg.micro_batches} micro-batches, stages {list(cfg.stages)}" if cfg.scheme == "pipeline" else ""
    ctx.log.info("driving %d %s slices of layers %s (%s%s)", w.k, cfg.scheme, list(cfg.layers), w.dtype.name, extra)
    every = float(p.get("report_every", 1.0))
    state = {"t": time.monotonic(), "steps": 0, "reported": 0, "loss": 0.0, "n": 0}

    def on_note(note: Note) -> None:
        if note.what != "loss":
            return
        state["steps"] += 1
        state["loss"] += note.value
        state["n"] += 1
        now = time.monotonic()
        if now - state["t"] >= every:
            ctx.metric(steps=state["steps"] - state["reported"], last_loss=round(state["loss"] / state["n"], 5))
            state.update(t=now, reported=state["steps"], loss=0.0, n=0)

    t0 = time.monotonic()
    params, stats = run_driver(cfg, link, _batches(ctx, w, link), xp, on_note)
    steps = stats[w.k].steps
    ctx.metric(steps=steps - state["reported"], bytes_sent=stats[w.k].bytes_sent,
               bytes_received=stats[w.k].bytes_received, wait_seconds=round(stats[w.k].wait_seconds, 3))
    results: dict[str, Any] = {"scheme": cfg.scheme, "slices": w.k, "steps": steps,
                               "train_seconds": round(stats[w.k].seconds, 3),
                               "seconds_per_step": round(stats[w.k].per_step(stats[w.k].seconds), 5)}
    params = {k: _host(v) for k, v in params.items()}
    scale = float(p.get("input_scale", 1.0))
    from nodes.evaluator import load_split, score

    for split in ("validation", "test"):
        if split in p:
            xs, ys = load_split(ctx, split)
            loss, acc = score(params, xs, ys, scale)
            results[f"{split}_accuracy"], results[f"{split}_loss"] = acc, loss
    results.update(traffic_results(stats, {e: w.name_of(e) for e in stats}))
    out = ctx.run_dir
    out.mkdir(parents=True, exist_ok=True)
    model.save_model(out / "model", params, {"layers": list(cfg.layers), "input_scale": scale, "scheme": cfg.scheme,
                                             "slices": w.k, "steps": steps})
    ctx.log.info("%d steps in %.2f s; test accuracy %s; bytes per step %s; waiting %s", steps, time.monotonic() - t0,
                 results.get("test_accuracy"), results["bytes_per_step"], results["wait_fraction"])
    ctx.result(**results)




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
