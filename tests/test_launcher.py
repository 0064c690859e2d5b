"""End-to-end runs of ``qpipe run`` / ``validate`` / ``node`` through the CLI, as subprocesses.

Every process a test starts is a :class:`_procs.Proc` from the ``procs`` fixture
(``conftest.py``): its own session, output pumped by a thread, and at teardown it
and every process it spawned (found through ``/proc``) are killed by PID. Waits are
on output lines or process exits, each with a bound; no test sleeps to order events.
"""

from __future__ import annotations

import json
import os
import re
import signal
import textwrap
import time
from pathlib import Path

import pytest
from _procs import WAIT, Proc, alive, clean_env, digits_rows, poll_for, start_time, summary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "topologies" / "data" / "digits"


# -- data and topologies -------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


USER_NODES = '''
import os
import pathlib
import time

import numpy as np


def produce(ctx):
    """Write params.n int64 items 0..n-1, in batches of 10 (enqueue_many)."""
    q, = ctx.outputs()
    n = int(ctx.params.get("n", 100))
    for start in range(0, n, 10):
        q.enqueue_many((np.arange(start, min(n, start + 10), dtype=np.int64),))
    ctx.log.info("produced %d items", n)
    ctx.metric(items=n)


def produce_scalars(ctx):
    """Write params.n items one by one with enqueue(i), as the runtime docstring shows."""
    q, = ctx.outputs()
    for i in range(int(ctx.params.get("n", 10))):
        q.enqueue(i)


def crash(ctx):
    ctx.log.info("about to fail")
    print("last words of the crashing node", flush=True)
    if ctx.params.get("mode") == "exit":
        os._exit(3)
    raise RuntimeError("boom from the crashing node")


def hang(ctx):
    """Loop until asked to stop (by SIGTERM, after the grace period)."""
    ctx.outputs()
    ctx.log.info("hanging until stopped")
    while not ctx.coord.should_stop():
        time.sleep(0.05)


def spawn_helper(ctx):
    """Start a helper process (as data loaders do), then fail or hang."""
    import subprocess
    quiet = {} if ctx.params.get("inherit_stdout") else {"stdout": subprocess.DEVNULL,
                                                         "stderr": subprocess.DEVNULL}
    helper = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, **quiet)
    ctx.log.info("helper pid %d", helper.pid)
    if ctx.params.get("then") == "fail":
        raise RuntimeError("failed after starting a helper")
    while not ctx.coord.should_stop():
        time.sleep(0.05)


def fail_once(ctx):
    marker = pathlib.Path(ctx.params["marker"])
    if not marker.exists():
        marker.write_text("failed once")
        raise RuntimeError("first attempt fails on purpose")
    ctx.log.info("second attempt")
    produce(ctx)
'''


def user_module(tmp_path: Path) -> dict[str, str]:
    """Write the user node module into tmp_path; returns the env that finds it."""
    (tmp_path / "usernodes_e2e.py").write_text(USER_NODES)
    return clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep))


def user_topology(tmp_path: Path, src_kind: str, src_extra: str = "", *, timeout: float = 20.0) -> Path:
    """A fifo of int64 scalars from one user node into a counting consumer."""
    return write(tmp_path / "user.toml", f"""
        [pipeline]
        name = "user"
        default_timeout = {timeout}

        [queues.q]
        kind = "fifo"
        capacity = 8
        dtypes = ["int64"]
        shapes = [[]]

        [nodes.src]
        kind = "{src_kind}"
        writes = ["q"]
        {src_extra}

        [nodes.sink]
        kind = "consumer"
        reads = ["q"]
        [nodes.sink.params]
        batch_size = 4
        """)


# -- qpipe run: the default pipeline ------------------------------------------------------


def test_digits_pipeline_runs_to_completion_and_writes_its_run_dir(tmp_path, procs):
    rows, labels = digits_rows()
    run_dir = tmp_path / "run"
    p = procs(["run", REPO / "topologies" / "digits.toml", "--run-dir", run_dir, "--quiet"], cwd=tmp_path)
    assert p.wait() == 0, p.output

    s = summary(run_dir)
    assert s["status"] == "completed" and s["exit_code"] == 0 and s["failed"] is None
    epochs = 3
    assert s["results"]["count"]["consumed"] == {"instances": epochs * rows}
    assert s["results"]["count"]["labels"] == {k: epochs * v for k, v in sorted(labels.items())}
    assert [r["exit_code"] for n in s["nodes"].values() for r in n["replicas"]] == [0, 0, 0]
    assert sum(r["metrics"]["items"] for r in s["nodes"]["reader"]["replicas"]) == epochs * rows
    logs = sorted(f.name for f in (run_dir / "logs").iterdir())
    assert logs == ["count-0.log", "qh.log", "reader-0.log", "reader-1.log"]  # one per replica, one per host
    assert "consumed instances: %d" % (epochs * rows) in (run_dir / "logs" / "count-0.log").read_text()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics and {m["proc"] for m in metrics} >= {"reader/0", "reader/1", "count/0"}
    assert "pipeline digits: completed" in p.stdout


def test_a_user_node_kind_module_function_runs(tmp_path, procs):
    env = user_module(tmp_path)
    topo = user_topology(tmp_path, "usernodes_e2e:produce", "[nodes.src.params]\nn = 95")
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir, "--quiet"], env=env, cwd=tmp_path)
    assert p.wait() == 0, p.output
    s = summary(run_dir)
    assert s["status"] == "completed"
    assert s["nodes"]["src"]["kind"] == "usernodes_e2e:produce"
    assert s["nodes"]["src"]["replicas"][0]["metrics"] == {"items": 95}
    assert s["results"]["sink"]["consumed"] == {"q": 95}
    assert "produced 95 items" in (run_dir / "logs" / "src-0.log").read_text()


def test_a_user_node_can_enqueue_scalar_items_one_by_one(tmp_path, procs):
    env = user_module(tmp_path)
    topo = user_topology(tmp_path, "usernodes_e2e:produce_scalars", "[nodes.src.params]\nn = 10")
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir, "--quiet"], env=env, cwd=tmp_path)
    assert p.wait() == 0, p.output
    assert summary(run_dir)["results"]["sink"]["consumed"] == {"q": 10}


# -- failures -------------------------------------------------------------------------


@pytest.mark.parametrize("mode, status", [("raise", 1), ("exit", 3)])
def test_a_failing_node_fails_the_run_and_is_named_with_its_last_lines(tmp_path, procs, mode, status):
    env = user_module(tmp_path)
    topo = user_topology(tmp_path, "usernodes_e2e:crash", f'[nodes.src.params]\nmode = "{mode}"')
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir, "--quiet", "--grace", "2"], env=env, cwd=tmp_path)
    assert p.wait() == 1, p.output

    out = p.stdout
    assert f"node src/0 exited with status {status}; last lines of its log" in out
    assert "last words of the crashing node" in out and "about to fail" in out
    if mode == "raise":
        assert "RuntimeError: boom from the crashing node" in out
    s = summary(run_dir)
    assert s["status"] == "failed" and s["failed"] == "src/0" and s["exit_code"] == 1
    assert s["nodes"]["src"]["replicas"][0]["exit_code"] == status


def test_a_node_killed_from_outside_fails_the_run_and_nothing_is_left(tmp_path, procs):
    env = user_module(tmp_path)
    topo = user_topology(tmp_path, "usernodes_e2e:hang")
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir, "--grace", "2"], env=env, cwd=tmp_path)
    m = p.wait_for(r"^\[src/0\] .*starting src/0 \(.*pid (\d+)\)")
    p.wait_for(r"^\[src/0\] .*hanging until stopped")
    p.wait_for(r"^\[sink/0\] .*starting sink/0")
    pid = int(m.group(1))
    assert pid in p.track_children()
    os.kill(pid, signal.SIGKILL)
    assert p.wait() == 1, p.output

    out = p.stdout
    assert "node src/0 exited with status -9; last lines of its log" in out
    assert re.search(r"^    .*hanging until stopped$", out, re.M), out
    s = summary(run_dir)
    assert s["failed"] == "src/0" and s["nodes"]["src"]["replicas"][0]["exit_code"] == -9
    assert [pid for pid, start in p.known.items() if alive(pid, start)] == []


def test_a_queue_host_killed_from_outside_fails_the_run(tmp_path, procs):
    env = user_module(tmp_path)
    topo = user_topology(tmp_path, "usernodes_e2e:hang")
    p = procs(["run", topo, "--run-dir", tmp_path / "run", "--grace", "1"], env=env, cwd=tmp_path)
    p.wait_for(r"^queue host default ready at")
    p.wait_for(r"^\[sink/0\] .*starting sink/0")
    p.wait_for(r"^\[src/0\] .*hanging until stopped")
    hosts = [pid for pid, start in p.track_children().items()
             if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2:] == [b"default", b""]]
    assert len(hosts) == 1, p.known
    os.kill(hosts[0], signal.SIGKILL)
    assert p.wait() == 1, p.output
    assert "queue host default exited with status -9" in p.stdout
    assert summary(tmp_path / "run")["failed"] == "default"
    assert [pid for pid, start in p.known.items() if alive(pid, start)] == []


def test_on_failure_restarts_a_failed_replica_and_the_run_completes(tmp_path, procs):
    env = user_module(tmp_path)
    marker = tmp_path / "failed-once"
    topo = user_topology(tmp_path, "usernodes_e2e:fail_once",
                         f'restart = "on-failure"\nmax_restarts = 2\n[nodes.src.params]\nmarker = "{marker}"\n'
                         "n = 40")
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir], env=env, cwd=tmp_path)
    assert p.wait() == 0, p.output
    assert marker.exists()
    assert "src/0 exited with status 1; restarting (1 of 2)" in p.stdout
    s = summary(run_dir)
    assert s["status"] == "completed"
    src = s["nodes"]["src"]["replicas"]
    assert len(src) == 1 and src[0]["restarts"] == 1 and src[0]["exit_code"] == 0
    assert s["results"]["sink"]["consumed"] == {"q": 40}
    log = (run_dir / "logs" / "src-0.log").read_text()
    assert "first attempt fails on purpose" in log and "second attempt" in log  # both attempts, one log


def test_on_failure_gives_up_after_max_restarts(tmp_path, procs):
    env = user_module(tmp_path)
    topo = user_topology(tmp_path, "usernodes_e2e:crash", 'restart = "on-failure"\nmax_restarts = 2')
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir, "--quiet", "--grace", "1"], env=env, cwd=tmp_path)
    assert p.wait() == 1, p.output
    out = p.stdout
    assert "restarting (1 of 2)" in out and "restarting (2 of 2)" in out and "(3 of 2)" not in out
    assert "node src/0 exited with status 1; last lines of its log" in out
    s = summary(run_dir)
    assert s["failed"] == "src/0" and s["nodes"]["src"]["replicas"][0]["restarts"] == 2
    assert (run_dir / "logs" / "src-0.log").read_text().count("RuntimeError: boom from the crashing node") == 3


def _helper(p: Proc) -> tuple[int, int | None]:
    pid = int(p.wait_for(r"^\[src/0\] .*helper pid (\d+)").group(1))
    start = start_time(pid)
    p.known[pid] = start  # so that teardown kills it, whatever happens
    return pid, start


def test_a_helper_process_of_a_node_does_not_outlive_the_run(tmp_path, procs):
    env = user_module(tmp_path)
    topo = user_topology(tmp_path, "usernodes_e2e:spawn_helper")
    p = procs(["run", topo, "--run-dir", tmp_path / "run", "--grace", "1"], env=env, cwd=tmp_path)
    helper, start = _helper(p)
    p.wait_for(r"^\[sink/0\] .*starting sink/0")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait() == 130, p.output
    poll_for(lambda: not alive(helper, start), 1, f"the helper process {helper} of src/0 to be stopped")


def test_a_failed_node_is_noticed_while_its_helper_still_runs(tmp_path, procs):
    env = user_module(tmp_path)
    topo = user_topology(tmp_path, "usernodes_e2e:spawn_helper",
                         '[nodes.src.params]\ninherit_stdout = true\nthen = "fail"')
    p = procs(["run", topo, "--run-dir", tmp_path / "run", "--grace", "1"], env=env, cwd=tmp_path)
    _helper(p)
    p.wait_for(r"^\[src/0\] RuntimeError: failed after starting a helper")
    assert p.wait(timeout=4) == 1, p.output  # a failure is noticed in well under a second; the helper sleeps 60 s


# -- stopping the launcher ----------------------------------------------------------------


def endless_topology(tmp_path: Path) -> Path:
    """digits with num_epochs = inf: runs until stopped."""
    text = (REPO / "topologies" / "digits.toml").read_text()
    text = text.replace("num_epochs = 3", "num_epochs = inf")
    text = text.replace('"data/digits/train-*.csv"', json.dumps(str(DIGITS / "train-*.csv")))
    assert "num_epochs = inf" in text and str(DIGITS) in text
    return write(tmp_path / "endless.toml", text)


def _started_pids(p: Proc, names: list[str]) -> dict[str, int]:
    return {n: int(p.wait_for(rf"^\[{re.escape(n)}\] .*starting {re.escape(n)} \(.*pid (\d+)\)").group(1))
            for n in names}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_closes_queues_stops_the_nodes_and_leaves_no_process(tmp_path, procs, sig):
    run_dir = tmp_path / "run"
    p = procs(["run", endless_topology(tmp_path), "--run-dir", run_dir, "--grace", "2"], cwd=tmp_path)
    pids = _started_pids(p, ["reader/0", "reader/1", "count/0"])
    p.wait_for(r"nodes 3/3 running \| instances \d+/512")  # a progress line: data is flowing
    children = p.track_children()
    assert set(pids.values()) <= set(children) and len(children) == 4  # three nodes and the queue host
    t0 = time.monotonic()
    os.kill(p.pid, sig)
    assert p.wait() == 130, p.output
    took = time.monotonic() - t0
    assert took < 2 + 10, f"the launcher took {took:.1f} s to stop"

    out = p.stdout
    assert f"{sig.name}: closing queues; nodes have 2 s to finish" in out
    assert "pipeline digits: interrupted" in out
    s = summary(run_dir)
    assert s["status"] == "interrupted" and s["exit_code"] == 130 and s["message"] == f"stopped by {sig.name}"
    # Queues were closed: the readers' enqueues failed, the consumer drained what was left and ended cleanly.
    assert s["nodes"]["count"]["replicas"][0]["exit_code"] == 0
    assert s["results"]["count"]["consumed"]["instances"] > 0
    assert [pid for pid, start in children.items() if alive(pid, start)] == []


def test_a_node_that_ignores_the_stop_is_terminated_after_the_grace_period(tmp_path, procs):
    env = user_module(tmp_path)
    topo = user_topology(tmp_path, "usernodes_e2e:hang")
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir, "--grace", "2"], env=env, cwd=tmp_path)
    _started_pids(p, ["src/0", "sink/0"])
    p.wait_for(r"^\[src/0\] .*hanging until stopped")
    children = p.track_children()
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait() == 130, p.output
    took = time.monotonic() - t0
    assert 2 <= took < 2 + 10, f"took {took:.1f} s; the grace period is 2 s"
    s = summary(run_dir)
    assert s["status"] == "interrupted"
    assert s["nodes"]["sink"]["replicas"][0]["exit_code"] == 0  # its queue was closed: it ended by itself
    # SIGTERM after the grace period asked it to stop (the runtime turns SIGTERM into a
    # coordinator stop request), and it did.
    assert s["nodes"]["src"]["replicas"][0]["exit_code"] == 0
    assert [pid for pid, start in children.items() if alive(pid, start)] == []


def test_children_die_with_a_killed_launcher(tmp_path, procs):
    p = procs(["run", endless_topology(tmp_path), "--run-dir", tmp_path / "run", "--quiet"], cwd=tmp_path)
    poll_for(lambda: len(p.track_children()) == 4, WAIT, "the queue host and three nodes")
    children = dict(p.known)
    os.kill(p.pid, signal.SIGKILL)  # no cleanup possible: PR_SET_PDEATHSIG must stop them
    p.wait()
    poll_for(lambda: not any(alive(pid, start) for pid, start in children.items()), 15,
             f"the children {sorted(children)} of a killed launcher to exit")


# -- validate and node: CLI wiring ----------------------------------------------------------


def test_validate_accepts_a_good_file_and_prints_its_graph(procs):
    p = procs(["validate", REPO / "topologies" / "digits.toml"])
    assert p.wait() == 0, p.output
    assert "pipeline digits:" in p.stdout and "reader x2  --> instances" in p.stdout


def test_validate_names_file_line_and_key_path_of_every_problem(tmp_path, procs):
    bad = write(tmp_path / "bad.toml", """
        [pipeline]
        name = "bad"

        [queues.q]
        kind = "fifo"
        capacity = "10"
        dtypes = ["float"]

        [nodes.src]
        kind = "reader"
        replica = 2
        writes = ["q"]

        [nodes.sink]
        kind = "consumer"
        reads = ["qq"]
        """)
    p = procs(["validate", bad], cwd=tmp_path)
    assert p.wait() == 2, p.output
    err = "\n".join(line for s, line in p.lines if s == "err")
    assert p.stdout == ""
    assert re.search(rf"{re.escape(str(bad))}:6: queues\.q\.capacity: .*\"10\"", err), err
    assert re.search(rf"{re.escape(str(bad))}:7: queues\.q\.dtypes\[0\]: .*float64", err), err
    assert re.search(rf"{re.escape(str(bad))}:11: nodes\.src\.replica: unknown key; did you mean \"replicas\"", err), err
    assert re.search(rf"{re.escape(str(bad))}:16: nodes\.sink\.reads\[0\]: .*\"qq\".*did you mean \"q\"", err), err


def test_validate_reports_syntax_errors_and_missing_files(tmp_path, procs):
    broken = write(tmp_path / "broken.toml", '[pipeline]\nname = "x\n')
    p = procs(["validate", broken], cwd=tmp_path)
    assert p.wait() == 2
    assert re.search(rf"{re.escape(str(broken))}:2:", p.output), p.output
    p = procs(["validate", tmp_path / "missing.toml"], cwd=tmp_path)
    assert p.wait() == 2
    assert "missing.toml" in p.output and "Traceback" not in p.output


def test_run_refuses_a_file_with_remote_hosts(tmp_path, procs):
    topo = write(tmp_path / "remote.toml", """
        [pipeline]
        name = "remote"
        [hosts.far]
        address = "10.1.2.3"
        [queue_hosts.qh]
        host = "far"
        port = 5555
        [queues.q]
        kind = "fifo"
        capacity = 4
        dtypes = ["int64"]
        [nodes.src]
        kind = "usernodes_e2e:produce"
        writes = ["q"]
        [nodes.sink]
        kind = "consumer"
        reads = ["q"]
        """)
    p = procs(["validate", topo], cwd=tmp_path)
    assert p.wait() == 0, p.output
    p = procs(["run", topo, "--run-dir", tmp_path / "run"], cwd=tmp_path)
    assert p.wait() == 2
    assert "places processes on other machines" in p.output and "qpipe node" in p.output
    assert not (tmp_path / "run").exists()


def test_node_needs_a_replica_for_a_multi_replica_node_and_a_known_name(procs):
    topo = REPO / "topologies" / "digits.toml"
    p = procs(["node", topo, "reader"])
    assert p.wait() == 2
    assert "node 'reader' has 2 replicas; pass --replica I (0..1)" in p.output
    p = procs(["node", topo, "reader", "--replica", "2"])
    assert p.wait() == 2
    assert "--replica 2 is out of range for node 'reader' (0..1)" in p.output
    p = procs(["node", topo, "nosuch"])
    assert p.wait() == 2
    assert "'nosuch'" in p.output and "known: reader, count, qh" in p.output


# -- a reader fed by a filename queue ---------------------------------------------------------


def filename_topology(tmp_path: Path, *, writes: str, names_capacity: int, replicas: int,
                      timeout: float) -> Path:
    return write(tmp_path / "names.toml", f"""
        [pipeline]
        name = "names"
        default_timeout = {timeout}

        [queues.names]
        kind = "fifo"
        capacity = {names_capacity}
        dtypes = ["string"]
        shapes = [[]]

        [queues.instances]
        kind = "shuffle"
        capacity = 256
        min_after_dequeue = 32
        dtypes = ["float32", "int64"]
        shapes = [[64], []]

        [nodes.reader]
        kind = "reader"
        replicas = {replicas}
        reads = ["names"]
        writes = {writes}
        [nodes.reader.params]
        files = {json.dumps(str(DIGITS / "train-*.csv"))}
        num_epochs = 2
        read_threads = 2
        batch_size = 16
        seed = 3
        components = [
          {{ name = "image", columns = "0:64", dtype = "float32" }},
          {{ name = "label", columns = "label", dtype = "int64" }},
        ]

        [nodes.count]
        kind = "consumer"
        reads = ["instances"]
        [nodes.count.params]
        batch_size = 32
        """)


def test_validate_requires_a_writer_for_a_filename_queue(tmp_path, procs):
    # The reader fills its own filename queue, but validation only accepts that when the
    # queue is also listed in the reader's `writes` (or marked external).
    topo = filename_topology(tmp_path, writes='["instances"]', names_capacity=16, replicas=2, timeout=5)
    p = procs(["validate", topo], cwd=tmp_path)
    assert p.wait() == 2
    assert re.search(r"names\.toml:\d+: queues\.names: no node writes to this queue", p.output), p.output
    topo = filename_topology(tmp_path, writes='["names", "instances"]', names_capacity=16, replicas=2, timeout=5)
    p = procs(["validate", topo], cwd=tmp_path)
    assert p.wait() == 0, p.output
    assert "reader x2  --> names [fifo 16]" in p.stdout


def test_a_filename_queue_feeds_every_record_exactly_num_epochs_times(tmp_path, procs):
    rows, labels = digits_rows()
    # 4 files x 2 epochs = 8 names through a queue of 4: replica 0 fills it as replica 1 drains it.
    topo = filename_topology(tmp_path, writes='["names", "instances"]', names_capacity=4, replicas=2, timeout=10)
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir, "--quiet", "--grace", "1"], cwd=tmp_path)
    assert p.wait() == 0, p.output
    s = summary(run_dir)
    assert s["results"]["count"]["consumed"] == {"instances": 2 * rows}
    assert s["results"]["count"]["labels"] == {k: 2 * v for k, v in sorted(labels.items())}
    assert sum(r["records"] for k, r in s["results"].items() if k.startswith("reader/")) == 2 * rows


def test_a_single_reader_with_a_small_filename_queue_does_not_deadlock(tmp_path, procs):
    rows, _ = digits_rows()
    topo = filename_topology(tmp_path, writes='["names", "instances"]', names_capacity=2, replicas=1, timeout=2)
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir, "--quiet", "--grace", "1"], cwd=tmp_path)
    rc = p.wait()
    assert "queue 'names': enqueue timed out" not in (run_dir / "logs" / "reader-0.log").read_text()
    assert rc == 0, p.output
    assert summary(run_dir)["results"]["count"]["consumed"] == {"instances": 2 * rows}
