"""Replicated serving: ServingClient routing by id, predictor replicas, `qpipe request`, the benchmark.

The first tests drive :class:`qpipe.serving.ServingClient` against replicas played by
threads of the test (so the order, timing and ids of answers are under control); the
later ones start real predictor processes, a serving topology and the benchmark.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _procs import clean_env, run_script

import qpipe
from nodes import model
from qpipe.serving import LoadStats, ServingClient, read_csv_inputs

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "topologies" / "data" / "digits"
WAIT = 10.0
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.timeout(120)

REQUEST_SPEC = dict(capacity=256, dtypes=["int64", "string", "float32"], shapes=[[], [], [4]])


# -- replicas played by the test ------------------------------------------------------------


def answer_for(x: np.ndarray) -> np.ndarray:
    """What the fake replicas answer: a function of the input, so a mix-up shows."""
    return np.concatenate([x, np.zeros(6, np.float32)]).astype(np.float32)


class FakeReplica:
    """A thread that serves the request queue with a policy chosen by the test."""

    def __init__(self, address: str, *, batch: int = 1, delay: float = 0.0, reverse: bool = False,
                 extra_ids: tuple[int, ...] = (), hold: threading.Event | None = None) -> None:
        self.client = qpipe.connect(address, timeout=WAIT)
        self.requests = self.client.queue("requests")
        self.batch, self.delay, self.reverse, self.extra_ids, self.hold = batch, delay, reverse, extra_ids, hold
        self.served = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        outs: dict[str, qpipe.Queue] = {}
        try:
            while True:
                try:
                    ids, reply_to, xs = self.requests.dequeue_many(self.batch, timeout=0.5)
                except qpipe.DeadlineExceededError:
                    continue
                except qpipe.OutOfRangeError:
                    return
                if self.hold is not None:
                    self.hold.wait(WAIT)
                time.sleep(self.delay)
                rows = list(range(len(ids)))[::-1] if self.reverse else range(len(ids))
                for i in rows:
                    name = reply_to[i].decode()
                    q = outs.get(name) or outs.setdefault(name, self.client.queue(name))
                    for extra in self.extra_ids:
                        q.enqueue((extra, np.full(10, -1, np.float32)))
                    with contextlib.suppress(qpipe.QueueClosedError):
                        q.enqueue((ids[i], answer_for(xs[i])))
                    self.served += 1
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def join(self) -> None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "fake replica did not stop"
        self.client.close()
        assert not self.errors, self.errors


@pytest.fixture
def serving(make_server):
    """A queue host with a request queue; ``replica(**policy)`` starts fake replicas, stopped at teardown."""
    server = make_server("tcp")
    with qpipe.connect(server.address, timeout=WAIT) as c:
        c.fifo_queue("requests", **REQUEST_SPEC)
    replicas: list[FakeReplica] = []

    class Env:
        address = server.address

        @staticmethod
        def replica(**kw) -> FakeReplica:
            r = FakeReplica(server.address, **kw)
            replicas.append(r)
            return r

    yield Env
    with qpipe.connect(server.address, timeout=WAIT) as c:
        c.queue("requests").close()
    for r in replicas:
        r.join()


def rows(n: int, offset: float = 0.0) -> np.ndarray:
    return (np.arange(n * 4, dtype=np.float32).reshape(n, 4) + offset).astype(np.float32)


# -- the client against fake replicas -----------------------------------------------------


def test_answers_out_of_order_are_matched_to_their_queries_by_id(serving):
    serving.replica(batch=8, reverse=True)
    with ServingClient(serving.address, "requests", timeout=WAIT) as sc:
        xs = rows(8)
        probs = sc.predict_many(xs)
        np.testing.assert_array_equal(probs, np.stack([answer_for(x) for x in xs]))
        assert sc.counters()["answered"] == 8 and sc.counters()["pending"] == 0


def test_answers_for_ids_never_sent_are_counted_and_never_handed_to_a_query(serving):
    serving.replica(extra_ids=(12345, -7))
    with ServingClient(serving.address, "requests", timeout=WAIT) as sc:
        xs = rows(5)
        for x in xs:
            np.testing.assert_array_equal(sc.predict(x), answer_for(x))
        c = sc.counters()
        assert c["unknown"] == 10 and c["answered"] == 5 and c["late"] == 0


def test_a_query_without_answer_times_out_and_its_late_answer_is_counted_not_reused(serving):
    release = threading.Event()
    serving.replica(hold=release)
    with ServingClient(serving.address, "requests", timeout=WAIT) as sc:
        t0 = time.monotonic()
        with pytest.raises(qpipe.DeadlineExceededError):
            sc.predict(rows(1)[0], timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 3.0
        release.set()
        x = rows(1, offset=100.0)[0]
        np.testing.assert_array_equal(sc.predict(x), answer_for(x))  # not the stale answer
        c = sc.counters()
        assert (c["timeouts"], c["late"], c["answered"], c["unknown"]) == (1, 1, 1, 0)


def test_several_clients_and_replicas_each_get_only_their_own_answers(serving):
    for _ in range(3):
        serving.replica(batch=1, delay=0.002)
    failures: list[str] = []

    def client(k: int) -> None:
        with ServingClient(serving.address, "requests", timeout=WAIT) as sc:
            xs = rows(40, offset=1000.0 * k)
            futs = [sc.submit(x) for x in xs]
            for x, f in zip(xs, futs):
                got = f.result(WAIT)
                if not np.array_equal(got, answer_for(x)):
                    failures.append(f"client {k}: query {f.id} got {got[:4]} for {x}")
            c = sc.counters()
            if c["unknown"] or c["late"] or c["answered"] != 40:
                failures.append(f"client {k}: counters {c}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * WAIT)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures


def test_run_load_keeps_the_concurrency_and_reports_sane_latencies(serving):
    for _ in range(2):
        serving.replica(delay=0.01)
    with ServingClient(serving.address, "requests", timeout=WAIT) as sc:
        st = sc.run_load(rows(10), concurrency=4, n=80)
    assert (st.sent, st.answered, st.timeouts, st.errors, st.late, st.unknown) == (80, 80, 0, 0, 0, 0)
    assert 10.0 <= st.p50_ms <= st.p90_ms <= st.p99_ms <= st.max_ms < 5000
    # 2 replicas at 10 ms each serve at most ~200 queries/s; 4 in flight keep both busy
    assert 60 < st.queries_per_s < 210
    assert st.seconds * st.queries_per_s == pytest.approx(80)
    assert "answered 80/80" in st.summary()
    json.dumps(st.as_dict())


def test_an_open_loop_load_sends_on_schedule(serving):
    serving.replica()
    with ServingClient(serving.address, "requests", timeout=WAIT) as sc:
        st = sc.run_load(rows(3), concurrency=None, rate=100.0, duration=0.5)
    assert 45 <= st.sent <= 51 and st.answered == st.sent
    assert st.rate == 100.0


def test_closing_the_client_closes_its_reply_queue_and_fails_waiting_queries(serving):
    hold = threading.Event()
    serving.replica(hold=hold)
    sc = ServingClient(serving.address, "requests", timeout=WAIT)
    q = sc.submit(rows(1)[0])
    sc.close()
    with pytest.raises(RuntimeError, match="closed"):
        q.result(WAIT)
    with qpipe.connect(serving.address, timeout=WAIT) as c:
        assert c.queue(sc.reply_name).is_closed()
    hold.set()  # the replica's answer now meets a closed queue, which it tolerates
    with pytest.raises(RuntimeError, match="closed"):
        sc.submit(rows(1)[0])


def test_a_queue_that_does_not_hold_requests_or_a_wrong_input_is_rejected_before_sending(make_server):
    server = make_server("tcp")
    with qpipe.connect(server.address, timeout=WAIT) as c:
        c.fifo_queue("plain", 4, ["int64", "float32"], [[], [4]])
        c.fifo_queue("requests", **REQUEST_SPEC)
    with pytest.raises(qpipe.InvalidArgumentError, match="request queue holds"):
        ServingClient(server.address, "plain", timeout=WAIT)
    with pytest.raises(qpipe.NotFoundError):
        ServingClient(server.address, "nope", timeout=WAIT)
    with ServingClient(server.address, "requests", timeout=WAIT) as sc:
        with pytest.raises(qpipe.InvalidArgumentError, match=r"shape \[4\], got \[5\]"):
            sc.submit(np.zeros(5))
        with pytest.raises(qpipe.InvalidArgumentError, match=r"\[n, 4\]"):
            sc.predict_many(np.zeros((2, 3)))
        assert sc.counters()["sent"] == 0
        with qpipe.connect(server.address, timeout=WAIT) as c:
            assert c.queue("requests").size() == 0


def test_load_stats_from_settled_queries():
    st = LoadStats.from_queries([], 0.0, 1.0)
    assert st.answered == 0 and np.isnan(st.p50_ms)
    assert json.dumps(st.as_dict())  # nan becomes null


def test_csv_inputs_come_with_labels_when_the_file_has_a_label_column():
    xs, labels, names = read_csv_inputs(str(DIGITS / "test.csv"), 64)
    assert xs.shape == (360, 64) and xs.dtype == np.float32 and labels.shape == (360,)
    assert names[0] == "pixel0" and names[-1] == "pixel63"
    xs2, none, _ = read_csv_inputs(str(DIGITS / "test.csv"), 64, columns="0:64", label=None)
    assert none is None and np.array_equal(xs, xs2)
    with pytest.raises(ValueError, match="2 input column"):
        read_csv_inputs(str(DIGITS / "test.csv"), 64, columns="pixel0,pixel1")


# -- real predictor processes ---------------------------------------------------------------


def _env() -> dict[str, str]:
    return clean_env(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


SERVING_TOML = """
[pipeline]
name = "test-serving"
default_timeout = 30.0

[queue_hosts.qh]
port = 0

[queues.requests]
kind = "fifo"
capacity = 256
dtypes = ["int64", "string", "float32"]
shapes = [[], [], [64]]
external = true

[nodes.predictor]
kind = "predictor"
replicas = 3
reads = ["requests"]
[nodes.predictor.params]
model = "model"
batch_size = 4
delay_ms = 2
"""


@pytest.fixture
def predictors(tmp_path, procs):
    """A queue host and 3 predictor processes (batch_size 4) serving a saved model; yields (address, params)."""
    params = model.init_params([64, 32, 10], seed=3)
    model.save_model(tmp_path / "model", params, {"input_scale": 0.0625})
    topo = tmp_path / "serving.toml"
    topo.write_text(SERVING_TOML)
    host = procs(["node", topo, "qh"], env=_env())
    address = host.wait_for(r"^QPIPE-READY (\S+)", WAIT, stream="out").group(1)
    env = _env() | {"QPIPE_QUEUE_HOSTS": json.dumps({"qh": address})}
    replicas = [procs(["node", topo, "predictor", "--replica", i], env=env) for i in range(3)]
    with ServingClient(address, "requests", timeout=WAIT) as sc:
        sc.wait_ready(3, timeout=30.0)
    yield address, params, topo
    with qpipe.connect(address, timeout=WAIT) as c:
        c.queue("requests").close()
    for p in replicas:
        assert p.wait(WAIT) == 0, p.output


@pytest.mark.slow
def test_predictor_replicas_route_every_answer_to_its_own_client(predictors):
    address, params, _ = predictors
    xs_all, _, _ = read_csv_inputs(str(DIGITS / "test.csv"), 64)
    failures: list[str] = []

    def client(k: int) -> None:
        xs = xs_all[k::4][:60] + np.float32(k)  # each client its own inputs
        want = model.probabilities(params, xs * np.float32(0.0625), np)
        with ServingClient(address, "requests", timeout=WAIT) as sc:
            got = np.concatenate([sc.predict_many(xs[:20]), np.stack([sc.predict(x) for x in xs[20:30]])])
            futs = [sc.submit(x) for x in xs[30:]]
            got = np.concatenate([got, np.stack([f.result(WAIT) for f in futs])])
            err = float(np.abs(got - want).max())
            c = sc.counters()
        if err > 1e-5:
            failures.append(f"client {k}: answers differ from the forward pass by {err}")
        if c["unknown"] or c["late"] or c["timeouts"] or c["answered"] != 60:
            failures.append(f"client {k}: counters {c}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(6 * WAIT)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures


@pytest.mark.slow
def test_qpipe_request_prints_answers_and_a_load_summary(predictors):
    address, _, topo = predictors
    base = [sys.executable, "-m", "qpipe.cli", "request", str(topo), "--address", address,
            "--input", str(DIGITS / "test.csv")]
    out = subprocess.run([*base, "--n", "3"], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("class ") == 3 and "answered 3/3" in out.stdout and "accuracy" in out.stdout
    out = subprocess.run([*base, "--concurrency", "6", "--duration", "0.5", "--json"], capture_output=True,
                         text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout.strip().splitlines()[-1])
    assert st["answered"] == st["sent"] > 0 and st["p50_ms"] <= st["p99_ms"] and st["timeouts"] == 0
    out = subprocess.run([*base[:-4], "--input", str(DIGITS / "test.csv")], capture_output=True, text=True,
                         env=_env(), timeout=60)
    assert out.returncode == 2 and "--address" in out.stderr


@pytest.mark.slow
def test_the_shipped_serving_topology_completes_and_reports_its_numbers(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "qpipe.cli", "run", str(ROOT / "topologies" / "serving.toml"),
                          "--run-dir", str(run_dir), "--quiet"], capture_output=True, text=True, env=_env(),
                         timeout=100, start_new_session=True)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["answered"] == 2000 and summary["timeouts"] == 0 and summary["unknown"] == 0
    assert summary["serving_accuracy"] >= 0.9 and summary["queries_per_s"] > 0
    served = [r["metrics"].get("served", 0) for r in summary["nodes"]["predictor"]["replicas"]]
    assert len(served) == 4 and sum(served) == 2000 + 360  # the load run plus the accuracy pass


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_the_benchmark_smoke_run_measures_and_checks(tmp_path):
    out_json = tmp_path / "serving.json"
    p = run_script([sys.executable, str(ROOT / "bench" / "serving.py"), "--quick", "--replicas", "1,2",
                    "--delay-ms", "5", "--seconds", "0.5", "--warmup", "0.2", "--aggregator-requests", "20",
                    "--json", str(out_json)], 120, env=_env(), grace=20)
    stdout, stderr = p.stdout, p.stderr
    assert p.returncode == 0, stdout + stderr
    report = json.loads(out_json.read_text())
    cells = {r["replicas"]: r for r in report["results"]}
    why = json.dumps(report, indent=1)
    assert set(cells) == {1, 2}, why
    for r in cells.values():
        assert r["queries_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"] and len(r["served"]) == r["replicas"], why
        assert r["check_max_abs_diff"] <= 1e-5, why
        assert r["answered"] == round(r["queries_per_s"] * r["seconds"]), why
    assert report["targets"][0]["status"] == "SKIP", why  # not the 1-vs-4, 20 ms configuration
    agg = report["aggregator"]
    assert agg["status"] == "measured" and agg["answered"] == 20 + 10, why  # measured plus warm-up requests
    assert "queries/s" in stdout and "SKIP" in stdout
