"""Parameter servers: sharded parameters with synchronous or asynchronous updates.

One :class:`ParameterServer` process holds one *shard* (a subset of the
named parameter arrays) and answers two requests over ZeroMQ, in qpipe's
wire format (msgpack header + raw frames, never pickle):

``pull``  ``{"min_version": v}`` → the shard's arrays once its version is ≥ v
          (a waiting request with a deadline, like a queue dequeue).
``push``  ``{"version": v, "trainer": "trainer/2"}`` + gradients → applied,
          aggregated or dropped (the reply says which).

plus ``hello``/``bye`` (clients register and leave) and ``stats``.

Modes (:class:`ShardState`):

* **sync** — step ``v`` needs the gradients of ``replicas_to_aggregate``
  trainers computed on version ``v``; the first ones to arrive are averaged
  and applied, making version ``v + 1``; gradients that arrive for an older
  version are dropped and counted (spare replicas). When trainers leave, the
  number needed drops to the number still training, so the last steps of a
  run do not wait for trainers that have finished.
* **async** — every gradient is applied when it arrives; its *staleness* is
  the number of updates since the version it was computed on. Policies:
  ``none`` (apply), ``drop`` (drop above ``max_staleness``), ``scale``
  (the step's learning rate times ``1 / (1 + staleness)``).

Variables are placed on shards by :func:`assign_shards`: greedy by size
(largest first onto the least-loaded shard, TensorFlow's
``GreedyLoadBalancingStrategy``) rather than round-robin, because an MLP's
names alternate weight/bias, so round-robin over two shards would put every
weight matrix on shard 0.

:class:`ParameterClient` talks to every shard at once (pulls and pushes go
out in parallel) and can carry float16 or bfloat16 on the wire to halve the
bytes; the server computes in float32/float64 either way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import kernels, wire
from .errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NoReplyError,
    QueueError,
    UnavailableError,
    error_from_code,
)
from .transport import bind_router, check_address, connect_dealer, default_context

__all__ = [
    "Optimizer",
    "ParameterClient",
    "ParameterServer",
    "ShardState",
    "assign_shards",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger("qpipe.ps")

WIRE_DTYPES = ("float32", "float16", "bfloat16")


# -- sharding -----------------------------------------------------------------------------


def assign_shards(shapes: Mapping[str, Sequence[int]], num_shards: int) -> list[list[str]]:
    """Names per shard, balancing bytes: largest first onto the least-loaded shard.

    Deterministic: ties go to the lower shard, names keep their given order
    within a shard.
    """
    if num_shards < 1:
        raise InvalidArgumentError(f"num_shards must be >= 1, got {num_shards}")
    sizes = {n: int(np.prod(s, dtype=np.int64)) for n, s in shapes.items()}
    load = [0] * num_shards
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], list(shapes).index(n))):
        j = min(range(num_shards), key=lambda k: (load[k], k))
        owner[name] = j
        load[j] += sizes[name]
    return [[n for n in shapes if owner[n] == j] for j in range(num_shards)]


# -- wire dtypes -------------------------------------------------------------------------------


def to_wire(a: np.ndarray, wire_dtype: str) -> np.ndarray:
    """Cast for transmission: float16 directly, bfloat16 as the top 16 bits (rounded) in uint16."""
    if wire_dtype == "float32" or a.dtype.kind != "f":
        return a
    if wire_dtype == "float16":
        return a.astype(np.float16)
    if wire_dtype == "bfloat16":
        f = np.ascontiguousarray(a, dtype=np.float32)
        bits = f.view(np.uint32)
        # round to nearest even on the dropped 16 bits; NaNs stay NaN (rounding could carry them to inf)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        out = (rounded >> np.uint32(16)).astype(np.uint16)
        nan = np.isnan(f)
        if nan.any():
            out[nan] = (bits[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040)
        return out
    raise InvalidArgumentError(f"wire dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")


def from_wire(a: np.ndarray, wire_dtype: str, dtype: np.dtype) -> np.ndarray:
    """Undo :func:`to_wire` into ``dtype``."""
    if wire_dtype == "bfloat16" and a.dtype == np.uint16:
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(dtype, copy=False)
    return a.astype(dtype, copy=False)


# -- optimizer ---------------------------------------------------------------------------------


class Optimizer:
    """SGD, momentum or Adam over named arrays, with the fused kernels of :mod:`qpipe.kernels`."""

    def __init__(self, kind: str = "sgd", lr: float = 0.1, momentum: float = 0.9, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, nesterov: bool = False) -> None:
        if kind not in ("sgd", "momentum", "adam"):
            raise InvalidArgumentError(f"optimizer must be 'sgd', 'momentum' or 'adam', got {kind!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise InvalidArgumentError(f"learning rate must be a finite number > 0, got {lr!r}")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise InvalidArgumentError(f"{name} must be in [0, 1), got {value!r}")
        if not eps > 0:
            raise InvalidArgumentError(f"eps must be > 0, got {eps!r}")
        if not momentum >= 0:
            raise InvalidArgumentError(f"momentum must be >= 0, got {momentum!r}")
        self.kind, self.lr, self.momentum, self.nesterov = kind, float(lr), float(momentum), nesterov
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.slots: dict[str, dict[str, np.ndarray]] = {}
        self.steps = 0

    def apply(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray], lr_scale: float = 1.0) -> None:
        """Update ``params`` in place with ``grads``."""
        self.steps += 1
        lr = self.lr * lr_scale
        for name, g in grads.items():
            p = params[name]
            if self.kind == "sgd":
                kernels.sgd_update(p, g, lr)
            elif self.kind == "momentum":
                v = self._slot(name, "v", p)
                kernels.momentum_update(p, g, v, lr, self.momentum, self.nesterov)
            else:
                m, v = self._slot(name, "m", p), self._slot(name, "v", p)
                kernels.adam_update(p, g, m, v, lr, self.beta1, self.beta2, self.eps, self.steps)

    def _slot(self, name: str, slot: str, like: np.ndarray) -> np.ndarray:
        s = self.slots.setdefault(name, {})
        if slot not in s:
            s[slot] = np.zeros_like(like)
        return s[slot]

    def state(self) -> dict[str, np.ndarray]:
        return {f"{n}:{k}": a for n, slots in self.slots.items() for k, a in slots.items()}

    def load_state(self, arrays: Mapping[str, np.ndarray], steps: int) -> None:
        self.slots = {}
        for key, a in arrays.items():
            n, _, k = key.rpartition(":")
            self.slots.setdefault(n, {})[k] = np.array(a)
        self.steps = steps


# -- the shard's state machine (no I/O) ------------------------------------------------------


class ShardState:
    """One shard's parameters, version and update rule; pure, driven by :class:`ParameterServer`.

    Parameters
    ----------
    params : dict of str to ndarray
        The shard's arrays (owned and updated in place).
    optimizer : Optimizer
    mode : {"sync", "async"}
    replicas_to_aggregate : int
        Sync mode: gradients averaged per step (N of N+k).
    staleness : {"none", "drop", "scale"}
        Async mode policy; ``max_staleness`` bounds ``drop``.
    """

    def __init__(self, params: dict[str, np.ndarray], optimizer: Optimizer, mode: str = "sync",
                 replicas_to_aggregate: int = 1, staleness: str = "none", max_staleness: int = 0) -> None:
        if mode not in ("sync", "async"):
            raise InvalidArgumentError(f"mode must be 'sync' or 'async', got {mode!r}")
        if staleness not in ("none", "drop", "scale"):
            raise InvalidArgumentError(f"staleness policy must be 'none', 'drop' or 'scale', got {staleness!r}")
        if replicas_to_aggregate < 1:
            raise InvalidArgumentError(f"replicas_to_aggregate must be >= 1, got {replicas_to_aggregate}")
        self.params = params
        self.optimizer = optimizer
        self.mode = mode
        self.replicas_to_aggregate = replicas_to_aggregate
        self.staleness_policy = staleness
        self.max_staleness = max_staleness
        self.version = 0
        self.active: set[str] = set()  # trainers that said hello and not bye
        self._acc: dict[str, np.ndarray] | None = None
        self._acc_from: list[str] = []
        self.counters = {"pushes": 0, "applied": 0, "aggregated": 0, "dropped_late": 0, "dropped_stale": 0,
                         "scaled": 0, "updates": 0}
        self.staleness_hist: dict[int, int] = {}

    def hello(self, trainer: str) -> None:
        self.active.add(trainer)

    def bye(self, trainer: str) -> bool:
        """A trainer left; returns True when that completed a pending sync step."""
        self.active.discard(trainer)
        return self._maybe_apply()

    @property
    def needed(self) -> int:
        """Gradients the current sync step waits for."""
        return max(1, min(self.replicas_to_aggregate, len(self.active))) if self.active else self.replicas_to_aggregate

    def push(self, trainer: str, version: int, grads: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Take one trainer's gradients computed on ``version``; returns what happened."""
        missing = set(self.params) - set(grads)
        extra = set(grads) - set(self.params)
        if missing or extra:
            raise InvalidArgumentError(
                f"push from {trainer}: gradients for {sorted(extra)} are not on this shard and "
                f"{sorted(missing)} are missing")
        for n, g in grads.items():
            if g.shape != self.params[n].shape:
                raise InvalidArgumentError(
                    f"push from {trainer}: gradient {n!r} has shape {list(g.shape)}, the parameter "
                    f"{list(self.params[n].shape)}")
        if version > self.version or version < 0:
            raise InvalidArgumentError(
                f"push from {trainer}: version {version} is outside the shard's versions 0..{self.version}")
        grads = {n: g if g.dtype == self.params[n].dtype else g.astype(self.params[n].dtype)
                 for n, g in grads.items()}
        self.counters["pushes"] += 1
        staleness = self.version - version
        self.staleness_hist[staleness] = self.staleness_hist.get(staleness, 0) + 1
        if self.mode == "sync":
            if version < self.version:
                self.counters["dropped_late"] += 1
                return {"accepted": False, "reason": "late", "staleness": staleness, "version": self.version}
            if self._acc is None:
                self._acc = {n: np.array(g, dtype=self.params[n].dtype) for n, g in grads.items()}
            else:
                for n, g in grads.items():
                    self._acc[n] += g
            self._acc_from.append(trainer)
            self.counters["aggregated"] += 1
            applied = self._maybe_apply()
            return {"accepted": True, "applied": applied, "staleness": 0, "version": self.version}
        # async
        scale = 1.0
        if staleness and self.staleness_policy == "drop" and staleness > self.max_staleness:
            self.counters["dropped_stale"] += 1
            return {"accepted": False, "reason": "stale", "staleness": staleness, "version": self.version}
        if staleness and self.staleness_policy == "scale":
            scale = 1.0 / (1.0 + staleness)
            self.counters["scaled"] += 1
        self.optimizer.apply(self.params, grads, lr_scale=scale)
        self.version += 1
        self.counters["applied"] += 1
        self.counters["updates"] += 1
        return {"accepted": True, "applied": True, "staleness": staleness, "version": self.version}

    def _maybe_apply(self) -> bool:
        if self.mode != "sync" or self._acc is None or len(self._acc_from) < self.needed:
            return False
        n = len(self._acc_from)
        for name, acc in self._acc.items():
            kernels.average_gradients(acc, [acc], 1.0 / n)
        self.optimizer.apply(self.params, self._acc)
        self._acc, self._acc_from = None, []
        self.version += 1
        self.counters["applied"] += n
        self.counters["updates"] += 1
        return True


# -- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(directory: str | Path, state: ShardState, meta: Mapping[str, Any] | None = None,
                    keep: int = 3) -> Path:
    """Write ``ckpt-VERSION.npz`` and its ``.json`` atomically (temp file + rename); keep the newest ``keep``.

    The JSON, written last, marks a complete checkpoint. No pickle: ``.npz``
    of plain arrays, loaded with ``allow_pickle=False``.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    stem = d / f"ckpt-{state.version:08d}"
    arrays = {f"param:{n}": a for n, a in state.params.items()}
    arrays.update({f"slot:{k}": a for k, a in state.optimizer.state().items()})
    tmp = stem.with_suffix(".npz.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, stem.with_suffix(".npz"))
    info = {"version": state.version, "optimizer_steps": state.optimizer.steps, "mode": state.mode,
            "optimizer": state.optimizer.kind,
            "params": {n: [str(a.dtype), list(a.shape)] for n, a in state.params.items()},
            "counters": state.counters, "time": time.time(), **(meta or {})}
    tmpj = stem.with_suffix(".json.tmp")
    tmpj.write_text(json.dumps(info, indent=1))
    os.replace(tmpj, stem.with_suffix(".json"))
    others = sorted((j for j in d.glob("ckpt-*.json") if j != stem.with_suffix(".json")), key=_version_of)
    for old in others[: max(0, len(others) - (keep - 1))] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".npz").unlink(missing_ok=True)
    return stem.with_suffix(".npz")


def _version_of(p: Path) -> int:
    try:
        return int(p.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint (its ``.npz``) in ``directory``, or None."""
    d = Path(directory)
    for j in sorted(d.glob("ckpt-*.json"), key=_version_of, reverse=True):
        if j.with_suffix(".npz").exists():
            return j.with_suffix(".npz")
    return None


def load_checkpoint(path: str | Path, state: ShardState) -> dict[str, Any]:
    """Restore ``state`` (params, optimizer slots, version) from a checkpoint; returns its metadata."""
    path = Path(path)
    info = json.loads(path.with_suffix(".json").read_text())
    kind = info.get("optimizer", state.optimizer.kind)
    if kind != state.optimizer.kind:
        raise InvalidArgumentError(
            f"checkpoint {path} was written by a {kind!r} optimizer, this shard uses {state.optimizer.kind!r}")
    with np.load(path, allow_pickle=False) as z:
        names = {k[len("param:"):] for k in z.files if k.startswith("param:")}
        if names != set(state.params):
            raise InvalidArgumentError(
                f"checkpoint {path} holds parameters {sorted(names)}, this shard has {sorted(state.params)}")
        loaded = {n: z[f"param:{n}"] for n in names}
        for n, a in loaded.items():  # check everything before changing anything
            if a.shape != state.params[n].shape:
                raise InvalidArgumentError(
                    f"checkpoint {path}: parameter {n!r} has shape {list(a.shape)}, expected "
                    f"{list(state.params[n].shape)}")
        slots = {k[len("slot:"):]: z[k] for k in z.files if k.startswith("slot:")}
        for n, a in loaded.items():
            state.params[n][...] = a
        state.optimizer.load_state(slots, int(info.get("optimizer_steps", 0)))
    state.version = int(info["version"])
    return info


# -- the server ------------------------------------------------------------------------------------


class ParameterServer:
    """Serves one shard on a ZeroMQ endpoint from the calling thread (a PS node's main loop).

    Parameters
    ----------
    state : ShardState
    address : str
        Endpoint to bind (``tcp://HOST:0`` picks a port; see :attr:`address`).
    expected_trainers, expected_evaluators : int
        Clients that will say hello. Training is done once every trainer has
        said bye or gone quiet for ``client_timeout`` seconds; :meth:`serve`
        returns once the evaluators have left too.
    checkpoint_dir, checkpoint_every_steps, checkpoint_every_secs
        Periodic checkpoints (and one at the end) when a directory is given.
    """

    def __init__(self, state: ShardState, address: str, *, expected_trainers: int, expected_evaluators: int = 0,
                 client_timeout: float = 30.0,
                 checkpoint_dir: str | Path | None = None, checkpoint_every_steps: int = 0,
                 checkpoint_every_secs: float = 0.0, max_message_size: int = 1 << 30,
                 meta: Mapping[str, Any] | None = None, context: zmq.Context | None = None) -> None:
        self.state = state
        self.meta = dict(meta or {})
        self.expected = {"trainer": expected_trainers, "evaluator": expected_evaluators}
        self._roles: dict[str, str] = {}
        self.client_timeout = client_timeout
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checkpoint_every_secs = checkpoint_every_secs
        self.max_message_size = max_message_size
        self.sock, self.address = bind_router(context or default_context(), address, 2 * max_message_size)
        # waiting pulls: (min_version, deadline, ident, id, wire dtype, client)
        self._pulls: list[tuple[int, float | None, bytes, Any, str, Any]] = []
        self._clients: dict[str, float] = {}  # name -> last seen
        self._left: set[str] = set()
        self._gone: set[str] = set()
        self.bytes_in = 0
        self.bytes_out = 0
        self.busy_seconds = 0.0
        self._last_ckpt = (state.version, time.monotonic())
        self._snapshots: dict[str, tuple[int, list[str], list[np.ndarray]]] = {}

    def _send(self, ident: bytes, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
        frames = wire.encode(header, arrays)
        self.bytes_out += wire.frames_nbytes(frames)
        try:
            self.sock.send_multipart([ident, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise

    def _ended(self, role: str) -> int:
        return sum(1 for c in self._left | self._gone if self._roles.get(c) == role)

    def training_done(self) -> bool:
        """Every expected trainer has left (bye) or gone quiet."""
        return self._ended("trainer") >= self.expected["trainer"]

    def finished(self) -> bool:
        """Training is done and every expected evaluator has left too."""
        return self.training_done() and self._ended("evaluator") >= self.expected["evaluator"]

    def serve(self, stop: Any = None) -> None:
        """Serve until :meth:`finished` (or ``stop()`` returns true); then write a final checkpoint."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not self.finished() and not (stop and stop()):
                now = time.monotonic()
                deadlines = [d for _, d, *_ in self._pulls if d is not None]
                wait = min([0.5, *[max(0.0, d - now) for d in deadlines]])
                if poller.poll(int(wait * 1000) + 1):
                    self._drain()
                self._expire(time.monotonic())
                self._reap(time.monotonic())
                self._maybe_checkpoint()
        finally:
            for _, _, ident, rid, *_ in self._pulls:
                self._send(ident, wire.error_header(rid, UnavailableError("parameter server is stopping")))
            self._pulls.clear()
            if self.checkpoint_dir is not None:
                save_checkpoint(self.checkpoint_dir, self.state, {"final": True})
            self.sock.close(0)

    def _drain(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            t0 = time.perf_counter()
            self._handle(frames)
            self.busy_seconds += time.perf_counter() - t0

    def _handle(self, frames: list[Any]) -> None:
        if len(frames) < 2:
            return
        ident = frames[0].bytes
        rid = None
        try:
            self.bytes_in += wire.frames_nbytes(frames[1:])
            header, arrays = wire.decode(frames[1:], self.max_message_size)
            rid = header.get("id")
            op = header.get("op")
            client = header.get("client")
            if isinstance(client, str):
                self._clients[client] = time.monotonic()
                if client in self._gone:  # it was only slow: count it again
                    self._gone.discard(client)
                    if self._roles.get(client) == "trainer" and op != "bye":
                        self.state.hello(client)
            if op == "pull":
                self._pull(ident, rid, header)
            elif op == "push":
                self._push(ident, rid, header, arrays)
            elif op == "hello":
                role = header.get("role")
                if role not in ("trainer", "evaluator") or not isinstance(client, str):
                    raise InvalidArgumentError(f"hello: role must be 'trainer' or 'evaluator', got {role!r}")
                self._roles[client] = role
                self._left.discard(client)
                if role == "trainer":
                    self.state.hello(client)
                self._send(ident, {"id": rid, "ok": True, **self._shard_info()})
            elif op == "bye":
                self._left.add(client)
                self._clients.pop(client, None)
                if self.state.bye(client):
                    self._wake()
                self._send(ident, {"id": rid, "ok": True})
            elif op == "stats":
                self._send(ident, {"id": rid, "ok": True, "stats": self.stats()})
            else:
                raise InvalidArgumentError(f"parameter server: unknown op {op!r}")
        except QueueError as e:
            self._send(ident, wire.error_header(rid, e))
        except (TypeError, ValueError, KeyError) as e:  # malformed fields from a peer
            self._send(ident, wire.error_header(rid, InvalidArgumentError(
                f"parameter server: malformed request ({type(e).__name__}: {e})")))
        except Exception as e:  # a bug: answer, log, keep serving
            log.exception("parameter server failed on a request")
            self._send(ident, wire.error_header(rid, InternalError(f"parameter server failed: {e!r}")))

    def _shard_info(self) -> dict[str, Any]:
        return {"version": self.state.version, "mode": self.state.mode, "meta": self.meta,
                "params": {n: [str(a.dtype), list(a.shape)] for n, a in self.state.params.items()}}

    def _pull(self, ident: bytes, rid: Any, header: dict[str, Any]) -> None:
        mv = header.get("min_version", 0)
        if isinstance(mv, bool) or not isinstance(mv, int):
            raise InvalidArgumentError(f"pull: min_version must be an integer, got {mv!r}")
        t = header.get("timeout")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t != t or t < 0):
            raise InvalidArgumentError(f"pull: timeout must be a number of seconds >= 0 or None, got {t!r}")
        wd = header.get("wire_dtype", "float32")
        if wd not in WIRE_DTYPES:
            raise InvalidArgumentError(f"pull: wire_dtype must be one of {WIRE_DTYPES}, got {wd!r}")
        if self.state.version >= mv or self.training_done():
            self._reply_params(ident, rid, wd)
            return
        deadline = None if t is None else time.monotonic() + float(t)
        self._pulls.append((int(mv), deadline, ident, rid, wd, header.get("client")))

    def _reply_params(self, ident: bytes, rid: Any, wd: str) -> None:
        # One snapshot per version and wire dtype: the N replies of a sync step share
        # one conversion, and a zero-copy send never sees the optimizer's in-place
        # updates of the live arrays.
        snap = self._snapshots.get(wd)
        if snap is None or snap[0] != self.state.version:
            names = list(self.state.params)
            arrays = [to_wire(self.state.params[n], wd) for n in names]
            arrays = [a.copy() if a is self.state.params[n] else a for n, a in zip(names, arrays)]
            snap = self._snapshots[wd] = (self.state.version, names, arrays)
        _, names, arrays = snap
        self._send(ident, {"id": rid, "ok": True, "version": self.state.version, "names": names,
                           "wire_dtype": wd, "done": self.training_done()}, arrays)

    def _push(self, ident: bytes, rid: Any, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        names = header.get("names")
        wd = header.get("wire_dtype", "float32")
        if not isinstance(names, list) or len(names) != len(arrays):
            raise InvalidArgumentError("push: 'names' must list one name per gradient frame")
        grads = {}
        for n, a in zip(names, arrays):
            p = self.state.params.get(n)
            if p is None:
                raise InvalidArgumentError(f"push: parameter {n!r} is not on this shard")
            grads[n] = from_wire(a, wd, p.dtype)
        version = header.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise InvalidArgumentError(f"push: version must be an integer, got {version!r}")
        before = self.state.version
        out = self.state.push(str(header.get("client")), version, grads)
        self._send(ident, {"id": rid, "ok": True, **out})
        if self.state.version != before:
            self._wake()

    def _wake(self) -> None:
        v = self.state.version
        keep = []
        for entry in self._pulls:
            if entry[0] <= v or self.training_done():
                self._reply_params(entry[2], entry[3], entry[4])
            else:
                keep.append(entry)
        self._pulls = keep

    def _expire(self, now: float) -> None:
        keep = []
        for entry in self._pulls:
            mv, d, ident, rid = entry[:4]
            if d is not None and now >= d:
                self._send(ident, wire.error_header(rid, DeadlineExceededError(
                    f"pull of version {mv} timed out; the shard is at version {self.state.version}")))
            else:
                keep.append(entry)
        self._pulls = keep

    def _reap(self, now: float) -> None:
        waiting = {entry[5] for entry in self._pulls}  # a client waiting on us is not silent
        for c, seen in list(self._clients.items()):
            if c in waiting:
                self._clients[c] = now
            elif now - seen > self.client_timeout:
                log.warning("client %s silent for %.0f s: counted as gone", c, now - seen)
                self._gone.add(c)
                del self._clients[c]
                if self.state.bye(c):
                    self._wake()
        if self.training_done():
            self._wake()

    def _maybe_checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
        v, t = self._last_ckpt
        now = time.monotonic()
        due = (self.checkpoint_every_steps and self.state.version - v >= self.checkpoint_every_steps) or (
            self.checkpoint_every_secs and now - t >= self.checkpoint_every_secs and self.state.version != v)
        if due:
            save_checkpoint(self.checkpoint_dir, self.state)
            self._last_ckpt = (self.state.version, now)

    def stats(self) -> dict[str, Any]:
        return {"version": self.state.version, **self.state.counters, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "busy_seconds": round(self.busy_seconds, 4),
                "staleness": {str(k): v for k, v in sorted(self.state.staleness_hist.items())},
                "clients_left": len(self._left), "clients_gone": len(self._gone)}


# -- the client -----------------------------------------------------------------------------------


class ParameterClient:
    """Pulls parameters from and pushes gradients to every shard at once.

    Parameters
    ----------
    addresses : sequence of str
        One endpoint per shard.
    name : str
        This client's name (e.g. ``"trainer/2"``), used for sync aggregation.
    role : {"trainer", "evaluator"}
        Only trainers count towards a sync step.
    wire_dtype : {"float32", "float16", "bfloat16"}
        What floats travel as (both directions).
    timeout : float or None
        Default timeout in seconds of a pull or push.
    """

    def __init__(self, addresses: Sequence[str], name: str, *, role: str = "trainer", wire_dtype: str = "float32",
                 timeout: float | None = 60.0, context: zmq.Context | None = None) -> None:
        if wire_dtype not in WIRE_DTYPES:
            raise InvalidArgumentError(f"wire_dtype must be one of {WIRE_DTYPES}, got {wire_dtype!r}")
        self.addresses = [check_address(a) for a in addresses]
        self.name, self.role, self.wire_dtype, self.timeout = name, role, wire_dtype, timeout
        ctx = context or default_context()
        self._socks = [connect_dealer(ctx, a, 2 << 30) for a in self.addresses]
        self._ids = 0
        self.versions = [0] * len(self._socks)
        self.shard_params: list[dict[str, tuple[str, list[int]]]] = []
        self.dtypes: dict[str, np.dtype] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.wait_seconds = 0.0
        self.done = False
        self.meta: dict[str, Any] = {}
        self.mode = "sync"

    def _send_all(self, headers: Sequence[dict[str, Any]],
                  arrays: Sequence[Sequence[np.ndarray]] | None = None) -> list[int]:
        ids = []
        for j, s in enumerate(self._socks):
            self._ids += 1
            frames = wire.encode(dict(headers[j], id=self._ids, client=self.name), arrays[j] if arrays else ())
            self.bytes_sent += wire.frames_nbytes(frames)
            s.send_multipart(frames, copy=False)
            ids.append(self._ids)
        return ids

    def _request(self, header: dict[str, Any], timeout: float | None) -> list[tuple[dict[str, Any], list[np.ndarray]]]:
        return self._collect(self._send_all([header] * len(self._socks)), timeout)

    def hello(self) -> list[list[str]]:
        """Register with every shard; returns the parameter names held by each shard."""
        replies = self._request({"op": "hello", "role": self.role}, self.timeout)
        self.shard_params = [h["params"] for h, _ in replies]
        self.meta = replies[0][0].get("meta", {})
        self.mode = replies[0][0].get("mode", "sync")
        self.versions = [h["version"] for h, _ in replies]
        self.dtypes = {n: np.dtype(dt) for sp in self.shard_params for n, (dt, _) in sp.items()}
        return [list(sp) for sp in self.shard_params]

    def pull(self, min_versions: Sequence[int] | int = 0, timeout: Any = "default") -> dict[str, np.ndarray]:
        """All parameters, once every shard reaches its minimum version (blocks until then)."""
        t = self.timeout if timeout == "default" else timeout
        mvs = ([int(min_versions)] * len(self._socks) if isinstance(min_versions, (int, np.integer))
               else [int(v) for v in min_versions])
        headers = [{"op": "pull", "min_version": mvs[j], "timeout": t, "wire_dtype": self.wire_dtype}
                   for j in range(len(self._socks))]
        replies = self._collect(self._send_all(headers), t)
        params: dict[str, np.ndarray] = {}
        for j, (h, arrays) in enumerate(replies):
            self.versions[j] = h["version"]
            self.done = self.done or bool(h.get("done"))
            for n, a in zip(h["names"], arrays):
                params[n] = from_wire(a, h.get("wire_dtype", "float32"), self.dtypes.get(n, np.dtype(np.float32)))
        return params

    def _collect(self, ids: list[int], timeout: float | None) -> list[Any]:
        t0 = time.monotonic()
        guard = None if timeout is None else t0 + timeout + 1.0
        out: list[Any] = [None] * len(self._socks)
        poller = zmq.Poller()
        for s in self._socks:
            poller.register(s, zmq.POLLIN)
        while any(o is None for o in out):
            wait = 1000 if guard is None else max(0, int((guard - time.monotonic()) * 1000))
            ready = dict(poller.poll(wait))
            if not ready and guard is not None and time.monotonic() >= guard:
                missing = [self.addresses[j] for j, o in enumerate(out) if o is None]
                raise NoReplyError(f"{self.name}: no reply from parameter server(s) {missing} within {timeout} s")
            for j, s in enumerate(self._socks):
                if s in ready:
                    frames = s.recv_multipart(copy=False)
                    self.bytes_received += wire.frames_nbytes(frames)
                    h, arrays = wire.decode(frames, None)
                    if h.get("id") != ids[j]:
                        continue
                    if "error" in h:
                        raise error_from_code(h["error"], f"parameter server {self.addresses[j]}: {h.get('message')}")
                    out[j] = (h, arrays)
        self.wait_seconds += time.monotonic() - t0
        return out

    def push(self, grads: Mapping[str, np.ndarray], versions: Sequence[int] | None = None,
             timeout: Any = "default") -> list[dict[str, Any]]:
        """Send each shard its gradients (computed on ``versions``, default: the last pulled)."""
        t = self.timeout if timeout == "default" else timeout
        vs = list(self.versions if versions is None else versions)
        headers, arrays = [], []
        for j in range(len(self._socks)):
            names = list(self.shard_params[j])
            headers.append({"op": "push", "version": vs[j], "names": names, "wire_dtype": self.wire_dtype})
            arrays.append([to_wire(np.ascontiguousarray(grads[n]), self.wire_dtype) for n in names])
        ids = self._send_all(headers, arrays)
        return [h for h, _ in self._collect(ids, t)]

    def bye(self, timeout: float = 5.0) -> None:
        """Leave every shard (a finished trainer no longer counts towards sync steps)."""
        try:
            self._request({"op": "bye"}, timeout)
        except QueueError as e:
            log.warning("%s: bye not acknowledged: %s", self.name, e)

    def stats(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        return [h["stats"] for h, _ in self._request({"op": "stats"}, timeout)]

    def close(self) -> None:
        for s in self._socks:
            s.close(0)
