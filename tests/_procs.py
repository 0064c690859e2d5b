"""Helpers for tests that run qpipe's CLI and benchmarks as subprocesses.

* :class:`Proc`: a ``python -m qpipe.cli ...`` subprocess in its own session, its
  output pumped line by line by threads; ``wait_for(regex)`` waits for a line,
  ``stop()`` kills its process group and every process ever seen below it, by PID.
  The ``procs`` fixture in ``conftest.py`` starts them and stops them at teardown.
* :func:`descendants`, :func:`start_time`, :func:`alive`: processes from ``/proc``,
  told apart by PID and start time, so that a reused PID is never taken for the old process.
* :func:`poll_for`: wait for a predicate with a deadline, where no event exists.
* :func:`run_script`: run a benchmark script to its end, stopping it (SIGTERM, then
  SIGKILL to its group) if it overruns.
* :func:`clean_env`, :func:`summary`, :func:`digits_rows`: a child's environment, a
  run's ``summary.json``, the digits training data's row count and labels.

Tests import these as ``from _procs import ...``: pytest puts ``tests/`` on ``sys.path``
(the rootdir-relative "prepend" import mode; ``tests/`` has no ``__init__.py``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "topologies" / "data" / "digits"
WAIT = 30.0  # bound on a run or a line that should come within seconds


# -- processes in /proc -------------------------------------------------------------------


def _stat(pid: int | str) -> tuple[int, int, str] | None:
    """(ppid, start time in clock ticks, state) of a process, or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[19]), fields[0]


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, start time in clock ticks, state) for every process now."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(entry)) is not None:
            out[int(entry)] = st
    return out


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live process below ``root``."""
    table = _proc_table()
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, start, _state) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks, or None if there is none."""
    st = _stat(pid)
    return None if st is None else st[1]


def alive(pid: int, start: int | None = None) -> bool:
    """Whether the process ``pid`` (the one that started at ``start``, if given) still runs.

    Zombies count as gone: they have exited, and their parent (or init) reaps them.
    """
    st = _stat(pid)
    return st is not None and st[2] not in ("Z", "X") and (start is None or st[1] == start)


def poll_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Return once ``predicate()`` is true; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# -- subprocesses ---------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without ``QPIPE_*`` settings, unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPIPE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A ``python -m qpipe.cli ...`` subprocess with its output collected line by line.

    ``prefix`` goes before the interpreter (``["ip", "netns", "exec", NS]``, say).
    """

    def __init__(self, args: list, *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 prefix: list[str] | None = None) -> None:
        self.args = [*(prefix or []), sys.executable, "-m", "qpipe.cli", *map(str, args)]
        self.lines: list[tuple[str, str]] = []  # (stream, line)
        self._cond = threading.Condition()
        self._open = 2
        self.popen = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, text=True, env=env or clean_env(), cwd=cwd,
                                      start_new_session=True)
        self.pid = self.popen.pid
        self.known: dict[int, int | None] = {}  # pids seen below this process -> start time
        self._threads = [threading.Thread(target=self._pump, args=(s, n), daemon=True)
                         for s, n in ((self.popen.stdout, "out"), (self.popen.stderr, "err"))]
        for t in self._threads:
            t.start()

    def _pump(self, stream, name: str) -> None:
        for line in stream:
            with self._cond:
                self.lines.append((name, line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    @property
    def stdout(self) -> str:
        with self._cond:
            return "\n".join(line for s, line in self.lines if s == "out")

    def wait_for(self, pattern: str, timeout: float = WAIT, stream: str | None = None) -> re.Match:
        """The first line matching ``pattern``; fails on timeout or when the output ends without one."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for s, line in self.lines:
                    m = rx.search(line)
                    if m and (stream is None or s == stream):
                        return m
                left = deadline - time.monotonic()
                if self._open == 0 or left <= 0:
                    why = "output ended" if self._open == 0 else f"timed out after {timeout:g} s"
                    raise AssertionError(f"{why} without a line matching {pattern!r} from {self.args[-4:]};"
                                         f" output:\n{self.output_unlocked()}")
                self._cond.wait(left)

    def output_unlocked(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def results(self) -> dict:
        """The ``QPIPE-RESULT`` JSON lines on stdout (a node's results), merged."""
        out: dict = {}
        with self._cond:
            for s, line in self.lines:
                if s == "out" and line.startswith("QPIPE-RESULT "):
                    out.update(json.loads(line[len("QPIPE-RESULT "):]))
        return out

    def track_children(self) -> dict[int, int | None]:
        """Remember every process now below this one (for the orphan check and teardown)."""
        self.known.update(descendants(self.pid))
        return self.known

    def wait(self, timeout: float = WAIT) -> int:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.args[-4:]} still running after {timeout:g} s; output:\n"
                                 f"{self.output}") from None
        for t in self._threads:
            t.join(WAIT)
        return rc

    def stop(self) -> None:
        """Kill this process's group and every process ever seen below it, by PID."""
        if self.popen.poll() is None:
            self.track_children()
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(WAIT)
        for pid, start in self.known.items():
            if alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for s in (self.popen.stdout, self.popen.stderr):
            s.close()


def run_script(argv: list[str], timeout: float, *, env: dict[str, str] | None = None, cwd: Path | None = None,
               grace: float = 15.0) -> subprocess.CompletedProcess:
    """Run ``argv`` in its own session to its end, capturing its output as text.

    On timeout, SIGTERM it (the benchmarks stop their children on SIGTERM), give it
    ``grace`` seconds, then SIGKILL its process group, and fail the test.
    """
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        try:
            out, err = p.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        pytest.fail(f"{shlex.join(map(str, argv))} did not finish within {timeout:g} s\n{out}\n{err}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# -- run outputs and data ---------------------------------------------------------------------


def summary(run_dir: Path) -> dict:
    """The ``summary.json`` that ``qpipe run`` wrote into ``run_dir``."""
    return json.loads((run_dir / "summary.json").read_text())


def digits_rows() -> tuple[int, Counter]:
    """Rows and label histogram of the training shards, read here rather than hard-coded."""
    labels: Counter = Counter()
    for path in sorted(DIGITS.glob("train-*.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                labels[row["label"]] += 1
    return sum(labels.values()), labels
