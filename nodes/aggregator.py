"""Aggregator node: combine the ensemble members' predictions, with a deadline per request.

Params are documented in ``topologies/README.md`` ("Params of aggregator"). The node
reads the labels queue ``(id int64, label)``, written by the feeder, to learn the
requests in order, and one prediction queue ``(id int64, probs float32[classes])`` per
member: every other queue in its ``reads``. A member is named after the node that
writes its queue.

Deadlines. A request's clock starts when the aggregator sees its label. A healthy
member has ``timeout`` seconds to answer it. A member that missed a deadline becomes
*suspect*: later requests wait for it only ``probe_timeout`` seconds, and requests
already waiting stop waiting for it, so a dead member costs about one ``timeout`` for
the requests in flight, not one per request. A suspect member is healthy again as soon
as one of its answers comes within ``timeout`` of its request (even if that answer was
no longer waited for). Until a member has answered once it is *starting* (loading or
training its model): it gets ``startup_timeout`` seconds from the aggregator's start,
and requests seen before its first answer are timed from that answer. A member whose
queue is closed and drained is *gone* and not waited for. Up to ``max_in_flight``
requests are read and undecided at a time (the rest wait in the labels queue).

Matching is by id only. An answer for a request already decided is *late*: discarded
and counted per member, never attributed to another request. An answer for a request
not seen yet is kept until its label arrives.

A request is decided when every member that is not gone has answered or missed its
deadline. With at least ``min_members`` answers it is answered with the combination
(``combine = "mean"``: the class of the mean of the probabilities; ``"vote"``: the
majority class, ties broken by the mean probability); otherwise it is unanswered. Each
decision is a line of ``RUN_DIR/ensemble_answers.jsonl`` (id, label, class, the members
that contributed, those that timed out, latency) and, if the node has a ``writes``
queue, an item ``(id int64, class int64, n_members int32)`` there (class -1 when
unanswered).

All members gone. When every member is gone, or suspect and missing its probes for
``give_up_after`` seconds, and requests went unanswered because of it, the aggregator
closes the labels queue (the feeder stops), marks every request still pending or queued
unanswered, reports them, and fails with a message that says how many requests went
unanswered and which; so it does when the requests run out first and the last ones found
no member. (Members that all finished normally after answering everything are gone too;
that ends the run normally.)

At the end it closes the prediction queues (cancelling waiting enqueues, so a member
still working on requests nobody waits for stops), counts what was left in them as
late, and reports ``ensemble_accuracy``, ``member_accuracy`` (per member, the fraction
of the requests it answered in time that it got right), ``answered``, ``unanswered``,
``late_predictions`` and ``timed_out`` (per member).

The matching itself is :class:`Matcher`: pure, no I/O, times passed in, so it is
tested without queues or processes.
"""

from __future__ import annotations

import dataclasses
import json
import queue as queue_mod
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

import qpipe
from qpipe.runtime import NodeContext
from nodes import node_main

STARTING, HEALTHY, SUSPECT, GONE = "starting", "healthy", "suspect", "gone"
_POLL = 0.2  # seconds a reader thread's dequeue waits before it checks whether to stop
DECIDED_KEPT = 1 << 16  # decided ids remembered to tell late answers from early ones


@dataclasses.dataclass
class Decision:
    """How one request was decided.

    Attributes
    ----------
    id, label : int
        The request and its true class (``None`` if unknown).
    cls : int or None
        The ensemble's class, ``None`` when unanswered.
    members : list of str
        Members whose answers were combined, in member order.
    classes : list of int
        Each of those members' own class (the argmax of its probabilities).
    timed_out : list of str
        Members that missed this request's deadline.
    seen, decided : float
        When the request was seen and decided (the caller's clock).
    """

    id: int
    label: int | None
    cls: int | None
    members: list[str]
    classes: list[int]
    timed_out: list[str]
    seen: float
    decided: float

    @property
    def answered(self) -> bool:
        return self.cls is not None

    @property
    def latency(self) -> float:
        return self.decided - self.seen


@dataclasses.dataclass
class _Request:
    id: int
    label: int | None
    seen: float
    answers: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    expired: set[str] = dataclasses.field(default_factory=set)


def combine(probs: Sequence[np.ndarray], how: str = "mean") -> int:
    """The ensemble's class from the members' probability vectors.

    ``"mean"``: argmax of the mean. ``"vote"``: the most frequent argmax; among tied
    classes, the one with the highest mean probability.
    """
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in probs])
    mean = stacked.mean(axis=0)
    if how == "mean":
        return int(mean.argmax())
    if how != "vote":
        raise ValueError(f'combine must be "mean" or "vote", got {how!r}')
    counts = np.bincount(stacked.argmax(axis=1), minlength=stacked.shape[1])
    tied = np.flatnonzero(counts == counts.max())
    return int(tied[mean[tied].argmax()])


class Matcher:
    """Matches members' answers to requests by id and decides each request by its deadlines.

    Not thread-safe: one thread feeds it events and asks for decisions. Times are
    seconds on any monotonic clock, passed in by the caller.

    Parameters
    ----------
    members : sequence of str
        Member names, in the order answers are combined and reported.
    timeout : float
        Seconds a healthy member has to answer a request, from when it was seen.
    probe_timeout : float
        Seconds a suspect member gets (it missed a deadline before).
    startup_timeout : float
        Seconds from ``now`` that a member which never answered yet gets.
    give_up_after : float
        Seconds every member must have been suspect (and missed a probe) or gone
        before :meth:`all_gone` says so.
    min_members : int
        Fewest answers that make a request answered.
    combine : str
        ``"mean"`` or ``"vote"`` (see :func:`combine`).
    now : float
        The start time.
    """

    def __init__(self, members: Sequence[str], *, timeout: float, probe_timeout: float | None = None,
                 startup_timeout: float | None = None, give_up_after: float | None = None,
                 min_members: int = 1, combine: str = "mean", now: float = 0.0) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if len(set(members)) != len(members):
            raise ValueError(f"member names must differ, got {list(members)}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if not 1 <= min_members <= len(members):
            raise ValueError(f"min_members must be between 1 and the {len(members)} members, got {min_members!r}")
        if combine not in ("mean", "vote"):
            raise ValueError(f'combine must be "mean" or "vote", got {combine!r}')
        self.members = list(members)
        self.timeout = float(timeout)
        self.probe_timeout = float(timeout / 10 if probe_timeout is None else probe_timeout)
        self.startup_timeout = float(max(timeout, 30.0) if startup_timeout is None else startup_timeout)
        self.give_up_after = float(max(3 * timeout, 1.0) if give_up_after is None else give_up_after)
        self.min_members = int(min_members)
        self.how = combine
        self.started = now
        self.state = {m: STARTING for m in self.members}
        self.suspect_since: dict[str, float] = {}
        self.probe_misses = {m: 0 for m in self.members}
        self.late = {m: 0 for m in self.members}
        self.timed_out = {m: 0 for m in self.members}
        self.duplicates = {m: 0 for m in self.members}
        self.duplicate_requests = 0
        self.changes: list[tuple[str, str, str]] = []  # (member, old state, new state), for the caller to log
        self.ready: dict[str, float] = {}  # when each member first answered in time
        self._pending: dict[int, _Request] = {}
        self._early: dict[int, dict[str, np.ndarray]] = {}
        # id -> seen time of decided requests, the newest DECIDED_KEPT (late answers are told by it)
        self._decided: dict[int, float] = {}

    # -- events -------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests seen and not decided yet."""
        return len(self._pending)

    @property
    def early(self) -> int:
        """Answers held for requests not seen yet."""
        return sum(len(a) for a in self._early.values())

    def add_request(self, rid: int, label: int | None, now: float) -> bool:
        """A request was seen (its label arrived); answers that came before it count now.

        Returns ``False`` (and counts it) for an id seen before, which is ignored.
        """
        rid = int(rid)
        if rid in self._pending or rid in self._decided:
            self.duplicate_requests += 1
            return False
        r = self._pending[rid] = _Request(rid, None if label is None else int(label), now)
        for m, probs in self._early.pop(rid, {}).items():
            r.answers[m] = probs
            self._in_time(m, now)
        return True

    def add_answer(self, member: str, rid: int, probs: np.ndarray, now: float) -> str:
        """A member answered request ``rid``; returns ``"accepted"``, ``"late"``, ``"early"`` or ``"duplicate"``.

        ``"late"``: the request was already decided, or this member had already missed
        its deadline; the answer is discarded and counted (a suspect member whose late
        answer still came within ``timeout`` of the request is healthy again: it was
        only waited for ``probe_timeout``). ``"early"``: the request has not been seen;
        the answer is kept until it is.
        """
        if member not in self.state:
            raise ValueError(f"unknown member {member!r}; members are {', '.join(self.members)}")
        rid = int(rid)
        r = self._pending.get(rid)
        if r is None:
            if rid in self._decided:
                self._late(member, self._decided[rid], now)
                return "late"
            held = self._early.setdefault(rid, {})
            if member in held:
                self.duplicates[member] += 1
                return "duplicate"
            held[member] = probs
            return "early"
        if member in r.answers:
            self.duplicates[member] += 1
            return "duplicate"
        if member in r.expired:
            self._late(member, r.seen, now)
            return "late"
        r.answers[member] = probs
        self._in_time(member, now)
        return "accepted"

    def member_gone(self, member: str, now: float) -> None:
        """The member's queue is closed and drained: no more answers will come from it."""
        self._set(member, GONE)

    # -- deadlines ----------------------------------------------------------------------

    def deadline(self, r: _Request, member: str) -> float | None:
        """When ``member`` stops being waited for on request ``r`` (``None``: not waited for)."""
        s = self.state[member]
        if s == GONE or member in r.answers or member in r.expired:
            return None
        if s == HEALTHY:
            # A request that came while the member was still starting is timed from when it was ready.
            return max(r.seen, self.ready[member]) + self.timeout
        if s == SUSPECT:
            return r.seen + self.probe_timeout
        return max(r.seen + self.timeout, self.started + self.startup_timeout)

    def next_deadline(self) -> float | None:
        """The earliest deadline of any pending request (when :meth:`decide` may next decide one)."""
        best = None
        for r in self._pending.values():
            for m in self.members:
                d = self.deadline(r, m)
                if d is not None and (best is None or d < best):
                    best = d
        return best

    def decide(self, now: float) -> list[Decision]:
        """Expire missed deadlines, then decide every request no longer waiting for anyone, in id order seen."""
        out = []
        for rid in list(self._pending):
            r = self._pending[rid]
            for m in self.members:
                d = self.deadline(r, m)
                if d is not None and now >= d:
                    r.expired.add(m)
                    self.timed_out[m] += 1
                    self._missed(m, now)
            if all(self.deadline(r, m) is None for m in self.members):
                out.append(self._finish(r, now))
        return out

    def all_gone(self, now: float) -> bool:
        """Whether no member can be expected to answer: all gone, or all suspect too long."""
        for m in self.members:
            s = self.state[m]
            if s == GONE:
                continue
            if s != SUSPECT or self.probe_misses[m] < 1 or now - self.suspect_since[m] < self.give_up_after:
                return False
        return True

    def abandon(self, now: float) -> list[Decision]:
        """Decide every pending request now, with the answers it has (used when all members are gone)."""
        return [self._finish(self._pending[rid], now) for rid in list(self._pending)]

    def orphans(self) -> dict[str, int]:
        """Answers held for requests that were never seen, per member (call at the end)."""
        out = {m: 0 for m in self.members}
        for held in self._early.values():
            for m in held:
                out[m] += 1
        return out

    # -- internals ----------------------------------------------------------------------

    def _finish(self, r: _Request, now: float) -> Decision:
        del self._pending[r.id]
        self._decided[r.id] = r.seen
        if len(self._decided) > DECIDED_KEPT:
            del self._decided[next(iter(self._decided))]
        names = [m for m in self.members if m in r.answers]
        cls = combine([r.answers[m] for m in names], self.how) if len(names) >= self.min_members else None
        return Decision(r.id, r.label, cls, names, [int(np.argmax(r.answers[m])) for m in names],
                        [m for m in self.members if m in r.expired], r.seen, now)

    def _set(self, member: str, state: str) -> None:
        old = self.state[member]
        if old != state:
            self.state[member] = state
            self.changes.append((member, old, state))

    def _in_time(self, member: str, now: float) -> None:
        if self.state[member] in (STARTING, SUSPECT):
            self._set(member, HEALTHY)
            self.ready.setdefault(member, now)
            self.suspect_since.pop(member, None)
            self.probe_misses[member] = 0

    def _late(self, member: str, seen: float, now: float) -> None:
        self.late[member] += 1
        if self.state[member] == SUSPECT and now - seen <= self.timeout:
            self._in_time(member, now)

    def _missed(self, member: str, now: float) -> None:
        if self.state[member] in (STARTING, HEALTHY):
            self._set(member, SUSPECT)
            self.suspect_since[member] = now
        else:
            self.probe_misses[member] += 1


# --------------------------------------------------------------------------- the node


def _ranges(ids: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` as ``"1-3, 7"``."""
    ids = sorted(ids)
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(parts)


def _member_name(ctx: NodeContext, queue: str) -> str:
    writers = ctx.topology.writers(queue)
    return writers[0] if len(writers) == 1 else queue


def run(ctx: NodeContext) -> None:
    p = ctx.params
    if ctx.replicas != 1:
        raise ValueError(f"node {ctx.node.name!r}: an aggregator must run as one replica (replicas = 1), "
                         f"got {ctx.replicas}; replicas would split each member's predictions between them")
    labels_name = p.get("labels_queue", "labels")
    if labels_name not in ctx.node.reads:
        raise ValueError(f"node {ctx.node.name!r}: params.labels_queue {labels_name!r} is not in its reads "
                         f"({', '.join(ctx.node.reads)}); the labels queue tells it which requests exist")
    pred_names = [n for n in ctx.node.reads if n != labels_name]
    if not pred_names:
        raise ValueError(f"node {ctx.node.name!r}: no prediction queue in reads besides {labels_name!r}")
    names = [_member_name(ctx, q) for q in pred_names]
    if len(set(names)) != len(names):
        names = pred_names
    timeout = float(p.get("timeout", 1.0))
    start = time.monotonic()
    matcher = Matcher(names, timeout=timeout, probe_timeout=p.get("probe_timeout"),
                      startup_timeout=p.get("startup_timeout"), give_up_after=p.get("give_up_after"),
                      min_members=int(p.get("min_members", 1)), combine=p.get("combine", "mean"), now=start)
    labels_q = ctx.queue(labels_name)
    preds = {m: ctx.queue(q) for m, q in zip(names, pred_names)}
    out_q = ctx.outputs()[0] if ctx.node.writes else None
    max_in_flight = int(p.get("max_in_flight", 256))
    ctx.log.info("members %s; timeout %g s (probe %g s, startup %g s, give up after %g s), combine %s, "
                 "min_members %d, up to %d requests in flight", ", ".join(names), matcher.timeout,
                 matcher.probe_timeout, matcher.startup_timeout, matcher.give_up_after, matcher.how,
                 matcher.min_members, max_in_flight)

    events: queue_mod.Queue = queue_mod.Queue()
    stop = threading.Event()
    room = _Room(max_in_flight)

    def read_labels() -> None:
        while not stop.is_set():
            n = room.wait(_POLL)
            if not n:
                continue
            try:
                got = _take(labels_q, n)
            except qpipe.OutOfRangeError:
                events.put(("labels_done", None, None, None, time.monotonic()))
                return
            if got is not None:
                room.take(len(got[0]))
                events.put(("requests", None, got[0].tolist(), got[1].tolist(), time.monotonic()))

    def read_member(member: str, q: qpipe.Queue) -> None:
        while not stop.is_set():
            try:
                got = _take(q, 1024)
            except qpipe.OutOfRangeError:
                events.put(("gone", member, None, None, time.monotonic()))
                return
            if got is not None:
                events.put(("answers", member, got[0].tolist(), got[1], time.monotonic()))

    def guarded(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 -- a broken reader must not leave the main loop waiting forever
            events.put(("error", None, None, f"{type(e).__name__}: {e}", time.monotonic()))

    threads = [threading.Thread(target=guarded, args=(read_labels,), name="labels", daemon=True)]
    threads += [threading.Thread(target=guarded, args=(read_member, m, q), name=f"member {m}", daemon=True)
                for m, q in preds.items()]
    for t in threads:
        t.start()

    answers_path = ctx.run_dir / "ensemble_answers.jsonl"
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    book = _Book(names, start)
    labels_done = gave_up = False
    reported = (start, 0)
    with open(answers_path, "w", encoding="utf-8") as answers_file:
        def record(decisions: list[Decision]) -> None:
            if not decisions:
                return
            for d in decisions:
                book.add(d)
                answers_file.write(json.dumps(book.line(d)) + "\n")
            room.give(len(decisions))
            answers_file.flush()
            if out_q is not None:
                out_q.enqueue_many((np.array([d.id for d in decisions], dtype=np.int64),
                                    np.array([-1 if d.cls is None else d.cls for d in decisions], dtype=np.int64),
                                    np.array([len(d.members) for d in decisions], dtype=np.int32)))

        def handle(ev: tuple) -> None:
            nonlocal labels_done
            kind, member, rid, value, t = ev
            if kind == "requests":
                for i, label in zip(rid, value):
                    if not matcher.add_request(i, label, t):
                        room.give(1)  # a duplicate id: never decided, so free its place here
            elif kind == "answers":
                for i, probs in zip(rid, value):
                    matcher.add_answer(member, i, probs, t)
            elif kind == "gone":
                matcher.member_gone(member, t)
            elif kind == "labels_done":
                labels_done = True
            elif kind == "error":
                raise RuntimeError(f"a queue reader of {ctx.name} failed: {value}")

        while not ctx.coord.should_stop():
            now = time.monotonic()
            due = matcher.next_deadline()
            wait = _POLL if due is None else min(_POLL, max(0.0, due - now))
            try:
                handle(events.get(timeout=wait))
                while True:
                    handle(events.get_nowait())
            except queue_mod.Empty:
                pass
            now = time.monotonic()
            record(matcher.decide(now))
            for m, old, new in matcher.changes:
                if new == SUSPECT:
                    ctx.log.warning("member %s: %s -> suspect (missed a deadline; now waited for %g s per "
                                    "request until it answers in time)", m, old, matcher.probe_timeout)
                elif new == GONE:
                    ctx.log.info("member %s: %s -> gone (its queue is closed and drained)", m, old)
                else:
                    ctx.log.info("member %s: %s -> %s", m, old, new)
            matcher.changes.clear()
            if gave_up:
                record(matcher.abandon(now))
            elif matcher.all_gone(now):
                # Nobody will answer what is pending: decide it with the answers it has. Members
                # that all finished normally are gone too, so this is giving up only if requests
                # went unanswered since the last answered one.
                record(matcher.abandon(now))
                if book.streak:
                    gave_up = True
                    ctx.log.error("all %d members are gone (%s); closing %r and reporting the remaining "
                                  "requests as unanswered", len(names),
                                  ", ".join(f"{m}: {matcher.state[m]}" for m in names), labels_name)
                    room.unlimit()
                    _close(labels_q)
            if labels_done and not matcher.pending:
                break
            if now - reported[0] >= 0.5:
                ctx.metric(decided=book.total - reported[1])
                reported = (now, book.total)
        if matcher.pending:  # asked to stop: what is still waiting is unanswered
            record(matcher.abandon(time.monotonic()))
        if not gave_up and book.streak and all(matcher.state[m] in (SUSPECT, GONE) for m in names):
            # The requests ran out before give_up_after passed, but the last ones found no member.
            gave_up = True
            ctx.log.error("all %d members are gone (%s) and the last %d requests went unanswered", len(names),
                          ", ".join(f"{m}: {matcher.state[m]}" for m in names), book.streak)
        ctx.metric(decided=book.total - reported[1])

        # The end: nobody waits for more answers. Closing the prediction queues stops
        # members still working (their enqueues fail); what is left in them is late.
        stop.set()
        for q in preds.values():
            _close(q)
        for t in threads:
            t.join(2 * _POLL + 5.0)
        leftovers = []
        try:
            while True:
                kind, member, rid, value, t = events.get_nowait()
                if kind == "answers":
                    leftovers += [(member, i, probs) for i, probs in zip(rid, value)]
        except queue_mod.Empty:
            pass
        for m, q in preds.items():
            leftovers += [(m, rid, probs) for rid, probs in _drain(q)]
        now = time.monotonic()
        for member, rid, value in leftovers:
            matcher.add_answer(member, rid, value, now)
    results = book.results(matcher)
    results["all_members_gone"] = gave_up
    ctx.log.info("ensemble accuracy %s over %d answered requests (%d unanswered); members: %s; late: %s; "
                 "timed out: %s; latency p50 %.1f ms, max %.1f ms",
                 _fmt(results["ensemble_accuracy"]), results["answered"], results["unanswered"],
                 ", ".join(f"{m} {_fmt(a)}" for m, a in results["member_accuracy"].items()),
                 results["late_predictions"], results["timed_out"], results["latency_ms_p50"],
                 results["latency_ms_max"])
    ctx.result(**results)
    if gave_up:
        raise RuntimeError(f"all {len(names)} ensemble members are gone: {results['unanswered']} of "
                           f"{results['requests']} requests unanswered (ids {results['unanswered_ids']}); "
                           f"see {answers_path}")


class _Room:
    """How many more requests may be in flight (read, not decided); the labels reader waits for room."""

    def __init__(self, limit: int) -> None:
        self.limit: int | None = limit
        self.used = 0
        self.cond = threading.Condition()

    def wait(self, timeout: float) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.limit is None or self.used < self.limit, timeout)
            return 1 << 16 if self.limit is None else max(0, self.limit - self.used)

    def take(self, n: int) -> None:
        with self.cond:
            self.used += n

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def unlimit(self) -> None:
        with self.cond:
            self.limit = None
            self.cond.notify_all()


def _take(q: qpipe.Queue, n: int) -> tuple[np.ndarray, ...] | None:
    """Up to ``n`` items: wait ``_POLL`` s for one, then add those already waiting (``None``: none came).

    Raises :class:`qpipe.OutOfRangeError` once the queue is closed and drained.
    """
    try:
        first = q.dequeue_up_to(1, timeout=_POLL)
    except qpipe.DeadlineExceededError:
        return None
    if n <= 1:
        return first
    try:
        waiting = q.size()
        if not waiting:
            return first
        more = q.dequeue_up_to(min(waiting, n - 1), timeout=0)
    except (qpipe.DeadlineExceededError, qpipe.OutOfRangeError):
        return first
    return tuple(np.concatenate([a, b]) for a, b in zip(first, more))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _close(q: qpipe.Queue) -> None:
    try:
        q.close(cancel_pending_enqueues=True, timeout=5.0)
    except qpipe.QueueError:
        pass  # already closed (its writer finished), or the host is gone


def _drain(q: qpipe.Queue) -> list[tuple[int, np.ndarray]]:
    """Take what is left in a closed queue, as ``(id, probs)`` pairs."""
    out: list[tuple[int, np.ndarray]] = []
    while True:
        try:
            ids, probs = q.dequeue_up_to(1024, timeout=5.0)
        except qpipe.QueueError:  # drained (out of range), or the host is gone
            return out
        out += zip(ids.tolist(), probs)


class _Book:
    """Scores and per-request records (the node's side; the matcher only matches)."""

    def __init__(self, members: list[str], start: float) -> None:
        self.members = members
        self.start = start
        self.total = 0
        self.answered = 0
        self.correct = 0
        self.member_right = {m: 0 for m in members}
        self.member_answered = {m: 0 for m in members}
        self.unanswered_ids: list[int] = []
        self.latencies: list[float] = []
        self.streak = 0  # unanswered decisions since the last answered one

    def add(self, d: Decision) -> None:
        self.total += 1
        self.latencies.append(d.latency)
        for m, c in zip(d.members, d.classes):
            self.member_answered[m] += 1
            self.member_right[m] += int(c == d.label)
        if d.answered:
            self.answered += 1
            self.correct += int(d.cls == d.label)
            self.streak = 0
        else:
            self.unanswered_ids.append(d.id)
            self.streak += 1

    def line(self, d: Decision) -> dict[str, Any]:
        return {"id": d.id, "label": d.label, "class": d.cls, "answered": d.answered, "members": d.members,
                "timed_out": d.timed_out, "seen_s": round(d.seen - self.start, 4),
                "latency_ms": round(d.latency * 1000, 2), "seen_at": round(time.time() - (time.monotonic() - d.seen), 4)}

    def results(self, matcher: Matcher) -> dict[str, Any]:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return {
            "ensemble_accuracy": self.correct / self.answered if self.answered else None,
            "member_accuracy": {m: (self.member_right[m] / self.member_answered[m] if self.member_answered[m]
                                    else None) for m in self.members},
            "member_answered": dict(self.member_answered),
            "requests": self.total,
            "answered": self.answered,
            "unanswered": len(self.unanswered_ids),
            "unanswered_ids": _ranges(self.unanswered_ids),
            "late_predictions": dict(matcher.late),
            "timed_out": dict(matcher.timed_out),
            "orphan_predictions": matcher.orphans(),
            "duplicate_predictions": dict(matcher.duplicates),
            "combine": matcher.how,
            "min_members": matcher.min_members,
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
            "latency_ms_max": round(float(lat.max()), 2),
        }




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
