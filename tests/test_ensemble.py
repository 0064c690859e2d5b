"""Sweeps and ensembles: the aggregator's matching logic (pure), then ``qpipe run`` end to end.

The end-to-end runs use ``_procs.Proc`` from the ``procs`` fixture in ``conftest.py``
(own session, output pumped by a thread, the launcher's group and every process seen
below it killed by PID at teardown). Waits are on output lines, files or exits, each
with a bound.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from _procs import poll_for, summary

from nodes.aggregator import GONE, HEALTHY, STARTING, SUSPECT, Matcher, combine
from nodes.leaderboard import rank
from nodes.solo_trainer import expand_grid, make_config, replica_configs

REPO = Path(__file__).resolve().parents[1]
TOPOLOGIES = REPO / "topologies"
DIGITS = TOPOLOGIES / "data" / "digits"
RUN = 45.0  # bound on one run (each takes a few seconds)


def onehot(k: int, n: int = 10, p: float = 0.9) -> np.ndarray:
    v = np.full(n, (1 - p) / (n - 1), dtype=np.float32)
    v[k] = p
    return v


# -- the matcher: pure, with times passed in ----------------------------------------------


def test_answers_are_matched_by_id_whatever_order_they_arrive_in():
    m = Matcher(["a", "b"], timeout=1.0, now=0.0)
    for i in range(3):
        m.add_request(i, label=i, now=0.0)
    assert m.add_answer("a", 2, onehot(2), 0.1) == "accepted"
    assert m.add_answer("b", 0, onehot(0), 0.1) == "accepted"
    assert m.add_answer("a", 0, onehot(0), 0.1) == "accepted"
    assert [(d.id, d.cls, d.members) for d in m.decide(0.2)] == [(0, 0, ["a", "b"])]
    m.add_answer("b", 2, onehot(2), 0.3)
    m.add_answer("b", 1, onehot(1), 0.3)
    m.add_answer("a", 1, onehot(1), 0.3)
    assert [(d.id, d.cls) for d in m.decide(0.3)] == [(1, 1), (2, 2)]


def test_a_late_answer_is_counted_and_never_given_to_another_request():
    m = Matcher(["a", "b"], timeout=1.0, startup_timeout=1.0, now=0.0)
    m.add_request(0, label=3, now=0.0)
    m.add_answer("a", 0, onehot(3), 0.1)
    (d0,) = m.decide(1.0)  # b missed request 0
    assert (d0.members, d0.timed_out) == (["a"], ["b"])
    m.add_request(1, label=5, now=1.1)
    assert m.add_answer("b", 0, onehot(7), 1.2) == "late"  # b's answer to request 0, now late
    m.add_answer("a", 1, onehot(5), 1.2)
    (d1,) = m.decide(1.3)  # b is suspect: 0.1 s probe
    assert (d1.id, d1.cls, d1.members) == (1, 5, ["a"])
    assert m.late == {"a": 0, "b": 1} and m.timed_out == {"a": 0, "b": 2}


def test_a_dead_member_costs_one_timeout_per_window_then_only_probes():
    m = Matcher(["a", "dead"], timeout=1.0, probe_timeout=0.1, startup_timeout=1.0, now=0.0)
    for i in range(10):  # ten requests in flight, seen 0.0 .. 0.9
        m.add_request(i, label=1, now=i / 10)
        m.add_answer("a", i, onehot(1), i / 10 + 0.01)
    assert m.decide(0.95) == []
    assert m.next_deadline() == pytest.approx(1.0)
    decided = m.decide(1.0)  # request 0 expires: "dead" is suspect, and the others stop waiting too
    assert [d.id for d in decided] == list(range(10))
    assert max(d.latency for d in decided) <= 1.0 + 1e-9
    assert m.state["dead"] == SUSPECT
    m.add_request(10, label=1, now=2.0)
    m.add_answer("a", 10, onehot(1), 2.01)
    assert m.decide(2.05) == []
    assert m.next_deadline() == pytest.approx(2.1)
    (d,) = m.decide(2.1)
    assert d.members == ["a"] and d.latency == pytest.approx(0.1)


def test_a_suspect_member_that_answers_in_time_is_healthy_again():
    m = Matcher(["a", "b"], timeout=1.0, probe_timeout=0.1, startup_timeout=1.0, now=0.0)
    m.add_request(0, label=0, now=0.0)
    m.add_answer("a", 0, onehot(0), 0.0)
    m.decide(1.0)
    assert m.state["b"] == SUSPECT
    m.add_request(1, label=0, now=1.5)
    assert m.add_answer("b", 1, onehot(0), 1.55) == "accepted"
    assert m.state["b"] == HEALTHY
    m.add_answer("a", 1, onehot(0), 1.55)
    assert [d.members for d in m.decide(1.6)] == [["a", "b"]]
    m.add_request(2, label=0, now=2.0)
    m.add_answer("a", 2, onehot(0), 2.0)
    assert m.next_deadline() == pytest.approx(3.0)  # the full timeout again


def test_a_suspect_member_whose_late_answer_came_within_the_timeout_is_healthy_again():
    m = Matcher(["a", "b"], timeout=1.0, probe_timeout=0.1, startup_timeout=1.0, now=0.0)
    m.add_request(0, label=0, now=0.0)
    m.add_answer("a", 0, onehot(0), 0.0)
    m.decide(1.0)
    m.add_request(1, label=0, now=2.0)
    m.add_answer("a", 1, onehot(0), 2.0)
    m.decide(2.1)  # b was waited for 0.1 s only
    assert m.add_answer("b", 0, onehot(0), 2.2) == "late" and m.state["b"] == SUSPECT  # 2.2 s after request 0
    assert m.add_answer("b", 1, onehot(0), 2.5) == "late" and m.state["b"] == HEALTHY  # 0.5 s: within the timeout
    assert m.late["b"] == 2


def test_requests_seen_while_a_member_was_starting_are_timed_from_its_first_answer():
    m = Matcher(["a"], timeout=1.0, startup_timeout=30.0, now=0.0)
    for i in range(3):
        m.add_request(i, label=0, now=0.0)  # a burst, while "a" loads its model
    m.add_answer("a", 0, onehot(0), 5.0)
    assert m.decide(5.0)[0].id == 0
    assert m.next_deadline() == pytest.approx(6.0)  # not 0.0 + 1.0
    m.add_answer("a", 1, onehot(0), 5.5)
    m.add_answer("a", 2, onehot(0), 5.9)
    assert [d.id for d in m.decide(5.9)] == [1, 2]


def test_a_member_still_starting_gets_the_startup_timeout():
    m = Matcher(["a", "slow_start"], timeout=0.5, startup_timeout=10.0, now=0.0)
    m.add_request(0, label=4, now=0.0)
    m.add_answer("a", 0, onehot(4), 0.1)
    assert m.decide(5.0) == [] and m.state["slow_start"] == STARTING
    m.add_answer("slow_start", 0, onehot(4), 6.0)
    (d,) = m.decide(6.0)
    assert d.members == ["a", "slow_start"] and m.state["slow_start"] == HEALTHY


def test_answers_that_come_before_their_request_are_held_for_it():
    m = Matcher(["a"], timeout=1.0, now=0.0)
    assert m.add_answer("a", 7, onehot(2), 0.0) == "early"
    assert m.early == 1 and m.orphans() == {"a": 1}
    m.add_request(7, label=2, now=0.5)
    (d,) = m.decide(0.5)
    assert (d.id, d.cls, d.members) == (7, 2, ["a"]) and m.orphans() == {"a": 0}


def test_fewer_answers_than_min_members_leave_a_request_unanswered():
    m = Matcher(["a", "b", "c"], timeout=1.0, startup_timeout=1.0, min_members=2, now=0.0)
    m.add_request(0, label=1, now=0.0)
    m.add_answer("a", 0, onehot(1), 0.1)
    (d,) = m.decide(1.0)
    assert not d.answered and d.cls is None and d.members == ["a"] and d.timed_out == ["b", "c"]


def test_a_gone_member_is_not_waited_for_and_a_duplicate_answer_is_counted():
    m = Matcher(["a", "b"], timeout=1.0, now=0.0)
    m.add_request(0, label=0, now=0.0)
    assert m.add_answer("a", 0, onehot(0), 0.1) == "accepted"
    assert m.add_answer("a", 0, onehot(0), 0.1) == "duplicate"
    m.member_gone("b", 0.2)
    (d,) = m.decide(0.2)
    assert d.members == ["a"] and d.timed_out == [] and m.state["b"] == GONE
    assert m.duplicates == {"a": 1, "b": 0}


def test_all_gone_needs_every_member_closed_or_missing_probes_for_give_up_after():
    m = Matcher(["a", "b"], timeout=0.5, probe_timeout=0.1, startup_timeout=0.5, give_up_after=2.0, now=0.0)
    m.add_request(0, label=0, now=0.0)
    m.decide(0.5)  # both miss: suspect since 0.5
    assert not m.all_gone(3.0), "suspect without a missed probe is not gone (no request came since)"
    m.add_request(1, label=0, now=1.0)
    m.decide(1.1)  # both miss their probe
    assert not m.all_gone(2.0) and m.all_gone(2.5)
    m2 = Matcher(["a", "b"], timeout=0.5, now=0.0)
    m2.member_gone("a", 0.0)
    assert not m2.all_gone(0.0)
    m2.member_gone("b", 0.0)
    assert m2.all_gone(0.0)


def test_combine_by_mean_and_by_vote_with_ties_broken_by_mean_probability():
    a, b = onehot(1, p=0.6), onehot(2, p=0.95)
    assert combine([a, a, b], "vote") == 1
    assert combine([a, b], "mean") == 2
    assert combine([a, b], "vote") == 2  # a tie: class 2 has the higher mean probability
    with pytest.raises(ValueError, match="combine"):
        combine([a], "median")


def test_matcher_rejects_bad_settings_with_clear_messages():
    with pytest.raises(ValueError, match="min_members must be between 1 and the 2 members"):
        Matcher(["a", "b"], timeout=1.0, min_members=3)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Matcher(["a"], timeout=0)


# -- configs and ranking -------------------------------------------------------------------


def test_a_grid_expands_in_file_order_with_the_last_key_fastest():
    points = expand_grid({"lr": [0.1, 0.5], "hidden": [[128], [64, 32]], "batch_size": [16]})
    assert points == [{"lr": 0.1, "hidden": [128], "batch_size": 16}, {"lr": 0.1, "hidden": [64, 32], "batch_size": 16},
                      {"lr": 0.5, "hidden": [128], "batch_size": 16}, {"lr": 0.5, "hidden": [64, 32], "batch_size": 16}]
    cfgs = replica_configs({"epochs": 7, "grid": {"lr": [0.1, 0.5]}}, "sweep")
    assert [(c["lr"], c["epochs"]) for c in cfgs] == [(0.1, 7), (0.5, 7)]


def test_config_mistakes_name_the_key():
    with pytest.raises(ValueError, match=r'params.configs\[1\].lrr: unknown hyperparameter; did you mean "lr"'):
        replica_configs({"configs": [{"lr": 0.1}, {"lrr": 0.1}]}, "sweep")
    with pytest.raises(ValueError, match=r"params.grid.lr: expected a non-empty list"):
        replica_configs({"grid": {"lr": 0.1}}, "sweep")
    with pytest.raises(ValueError, match=r"x.hidden: expected a list of layer widths"):
        make_config({}, {"hidden": [0]}, "x")
    with pytest.raises(ValueError, match="not both"):
        replica_configs({"grid": {"lr": [0.1]}, "configs": [{}]}, "sweep")


def test_ranking_is_by_validation_accuracy_then_member():
    r = rank([{"member": 0, "validation_accuracy": 0.9}, {"member": 2, "validation_accuracy": 0.95},
              {"member": 1, "validation_accuracy": 0.95}])
    assert [(e["rank"], e["member"]) for e in r] == [(1, 1), (2, 2), (3, 0)]


# -- end to end ----------------------------------------------------------------------------


def variant(tmp_path: Path, replace: dict[str, str], source: str = "ensemble.toml", append: str = "") -> Path:
    """A copy of a shipped topology with absolute data paths, some text replaced (every occurrence), more appended."""
    text = (TOPOLOGIES / source).read_text().replace('"data/digits/', f'"{DIGITS}/')
    for old, new in replace.items():
        assert old in text, f"{source} no longer contains {old!r}"
        text = text.replace(old, new)
    text += append
    path = tmp_path / source
    path.write_text(text)
    return path


def answers(run_dir: Path) -> list[dict]:
    path = run_dir / "ensemble_answers.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def member_exit(s: dict, member: str) -> int:
    return s["nodes"][member]["replicas"][0]["exit_code"]


FAST = {"epochs = 30": "epochs = 8"}  # members train quickly; accuracy does not matter here


def paced(rate: int, limit: int) -> dict[str, str]:
    return {"[nodes.feeder.params]\n": f"[nodes.feeder.params]\nrate = {rate}\nlimit = {limit}\n"}


AGGREGATOR_READS = 'reads = ["labels", "pred_a", "pred_b", "pred_c"]\n'
OUTPUT = {AGGREGATOR_READS: AGGREGATOR_READS + 'writes = ["answers"]\n'}  # the aggregator's optional output
OUTPUT_SINK = """
[queues.answers]
kind = "fifo"
capacity = 512
dtypes = ["int64", "int64", "int32"]
shapes = [[], [], []]

[nodes.sink]
kind = "consumer"
reads = ["answers"]
[nodes.sink.params]
batch_size = 16
"""


def with_params(member: str, **params) -> dict[str, str]:
    """Set params of a member (its batch_size too: the file's line is replaced)."""
    head = f"[nodes.{member}.params]\n"
    params = {"batch_size": 32, **params}
    return {head + "batch_size = 32\n": head + "".join(f"{k} = {v}\n" for k, v in params.items())}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_sweep_ranks_its_four_configs_and_names_the_top_3(tmp_path, procs):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    p = procs(["run", TOPOLOGIES / "sweep.toml", "--run-dir", run_dir, "--quiet"], cwd=tmp_path)
    assert p.wait(RUN) == 0, p.output
    s = summary(run_dir)
    ranking = s["ranking"]
    assert [r["member"] for r in ranking] != [] and len(ranking) == 4, ranking
    accs = [r["validation_accuracy"] for r in ranking]
    assert accs == sorted(accs, reverse=True) and accs[0] >= 0.96, accs
    assert s["top_k"] == [r["model"] for r in ranking[:3]] and s["best"] == ranking[0]
    assert len({json.dumps(r["config"], sort_keys=True) for r in ranking}) == 4, "configs must differ"
    for path in s["top_k"]:
        meta = json.loads((Path(path) / "model.json").read_text())
        assert meta["validation_accuracy"] == pytest.approx(next(r for r in ranking if r["model"] == path)
                                                            ["validation_accuracy"])
    assert json.loads((run_dir / "leaderboard.json").read_text())["top_k"] == s["top_k"]
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_ensemble_is_at_least_as_accurate_as_its_best_member(tmp_path, procs):
    run_dir = tmp_path / "run"
    p = procs(["run", TOPOLOGIES / "ensemble.toml", "--run-dir", run_dir, "--quiet"], cwd=tmp_path)
    assert p.wait(RUN) == 0, p.output
    s = summary(run_dir)
    members = s["member_accuracy"]
    assert set(members) == {"member_a", "member_b", "member_c"}
    assert s["ensemble_accuracy"] >= max(members.values()) >= 0.96, (s["ensemble_accuracy"], members)
    assert (s["answered"], s["unanswered"]) == (360, 0)
    lines = answers(run_dir)
    assert sorted(d["id"] for d in lines) == list(range(360))
    assert all(d["members"] == ["member_a", "member_b", "member_c"] for d in lines)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_member_that_crashes_mid_run_leaves_every_request_answered_by_the_others(tmp_path, procs):
    timeout = 0.5
    topo = variant(tmp_path, {**FAST, **paced(150, 300), **with_params("member_b", fail_after=100),
                              "timeout = 1.0 ": f"timeout = {timeout} "})
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir, "--quiet"], cwd=tmp_path)
    assert p.wait(RUN) == 0, p.output
    s = summary(run_dir)
    assert member_exit(s, "member_b") == 1 and s["status"] == "completed"
    assert (s["answered"], s["unanswered"]) == (300, 0)
    assert s["member_answered"]["member_b"] <= 100 and s["timed_out"]["member_b"] >= 1
    lines = sorted(answers(run_dir), key=lambda d: d["id"])
    after = [d for d in lines if d["id"] >= next(d["id"] for d in lines if "member_b" not in d["members"])]
    assert len(after) >= 150
    assert all(d["members"] == ["member_a", "member_c"] for d in after)
    slowest = max(d["latency_ms"] for d in after)
    assert slowest <= (timeout + 0.5) * 1000, f"a request took {slowest} ms with a {timeout} s timeout"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_member_killed_from_outside_costs_each_request_at_most_about_the_timeout(tmp_path, procs):
    timeout = 0.5
    topo = variant(tmp_path, {**FAST, **paced(100, 360), "timeout = 1.0 ": f"timeout = {timeout} "})
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir], cwd=tmp_path)
    pid = int(p.wait_for(r"starting member_b/0 \(.*pid (\d+)\)").group(1))
    poll_for(lambda: len(answers(run_dir)) >= 60, RUN, "60 answered requests")
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    assert p.wait(RUN) == 0, p.output
    s = summary(run_dir)
    assert member_exit(s, "member_b") == -signal.SIGKILL
    assert (s["answered"], s["unanswered"]) == (360, 0)
    assert s["timed_out"]["member_b"] >= 1
    after = [d for d in answers(run_dir) if d["seen_at"] > killed_at + 0.05]
    assert len(after) >= 100, "the kill came too late to test anything"
    assert all(d["answered"] and "member_b" not in d["members"] for d in after)
    slowest = max(d["latency_ms"] for d in after)
    assert slowest <= (timeout + 0.5) * 1000, f"a request took {slowest} ms with a {timeout} s timeout"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_slow_member_has_its_late_answers_excluded_and_counted(tmp_path, procs):
    timeout = 0.3
    topo = variant(tmp_path, {**FAST, **paced(100, 200), **with_params("member_c", delay_ms=200, batch_size=1),
                              "timeout = 1.0 ": f"timeout = {timeout} ", **OUTPUT}, append=OUTPUT_SINK)
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    p = procs(["run", topo, "--run-dir", run_dir, "--quiet"], cwd=tmp_path)
    assert p.wait(RUN) == 0, p.output
    s = summary(run_dir)
    assert (s["answered"], s["unanswered"]) == (200, 0)
    assert s["late_predictions"]["member_c"] >= 1 and s["timed_out"]["member_c"] >= 100
    assert s["member_answered"]["member_c"] <= 5, s["member_answered"]
    assert s["member_answered"]["member_a"] == s["member_answered"]["member_b"] == 200
    assert s["results"]["sink"]["consumed"] == {"answers": 200}  # one (id, class, n_members) per request
    # Ended by the aggregator closing its queue, not after 200 x 0.2 s of answers nobody waits for.
    assert time.monotonic() - t0 < 25
    assert member_exit(s, "member_c") == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_when_all_members_are_gone_the_aggregator_reports_the_unanswered_requests_and_the_run_ends(tmp_path, procs):
    topo = variant(tmp_path, {**FAST, **paced(100, 360), "timeout = 1.0 ": "timeout = 0.3 ",
                              **with_params("member_a", fail_after=20), **with_params("member_b", fail_after=30),
                              **with_params("member_c", fail_after=40)})
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    p = procs(["run", topo, "--run-dir", run_dir, "--quiet"], cwd=tmp_path)
    assert p.wait(RUN) == 1, p.output
    assert time.monotonic() - t0 < 25
    s = summary(run_dir)
    assert s["failed"] == "aggregator/0" and s["all_members_gone"] is True
    assert re.search(r"all 3 ensemble members are gone: \d+ of \d+ requests unanswered \(ids \d+-\d+", s["message"])
    assert s["unanswered"] >= 1 and s["answered"] >= 20
    assert s["answered"] + s["unanswered"] == s["requests"] == len(answers(run_dir))
    assert [member_exit(s, m) for m in ("member_a", "member_b", "member_c")] == [1, 1, 1]
