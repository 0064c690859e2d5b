"""Smoke tests of bench/training.py: a tiny run end to end, the report's structure, cleanup."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _procs import alive, run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "training.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import training

pytestmark = pytest.mark.timeout(150)

RUN_TIMEOUT = 120.0


def _run_script(*args: str) -> subprocess.CompletedProcess:
    """Run the harness in its own session; on timeout SIGTERM it (it stops its children), then kill the group."""
    return run_script([sys.executable, str(SCRIPT), *args], RUN_TIMEOUT, cwd=ROOT)


def test_a_quick_run_measures_sync_and_async_with_one_trainer(tmp_path):
    out = tmp_path / "training.json"
    proc = _run_script("--quick", "--trainers", "1", "--wire", "float32", "--compute-ms", "5",
                       "--seconds", "0.3", "--warmup", "0.1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())

    assert {"machine", "date", "settings", "results", "targets", "command"} <= set(report)
    assert report["settings"]["compute_ms"] == 5
    cells = {r["mode"]: r for r in report["results"]}
    assert set(cells) == {"sync", "async"}
    for r in cells.values():
        assert r["trainers"] == 1 and r["wire_dtype"] == "float32" and r["shards"] == 1
        assert r["elapsed"] >= 0.3
        assert r["updates"] > 0 and r["steps_per_s"] > 0
        # one trainer, one gradient per update, in both modes
        assert r["samples_per_s"] == pytest.approx(r["steps_per_s"] * r["batch_size"])
        assert r["ideal"] == pytest.approx(200.0)
        assert r["ratio"] == pytest.approx(r["steps_per_s"] / 200.0)
        assert 0 < r["ratio"] <= 1.05  # a 5 ms sleep per step bounds the rate
        assert r["ps_ms_per_update"] > 0
        # a pull reply and a push carry the 64-128-10 MLP's float32 values, plus headers
        values = 64 * 128 + 128 + 128 * 10 + 10
        assert r["param_values"] == values
        # (the window's two stats snapshots may split a push from its pull: one message of
        # ~4 * values bytes over tens of updates, so allow a few percent below)
        assert 0.95 * 2 * 4 * values < r["bytes_per_step"] < 2 * 4 * values + 4096
        assert r["dropped_late"] == 0 and r["dropped_stale"] == 0
        assert set(r["trainer_ms"]) == {"input", "grad", "sleep", "push", "pull"}
        assert r["trainer_ms"]["sleep"] >= 5.0
        assert all(math.isfinite(x) for x in r["final_loss"])
        # every process of the cell has been stopped
        assert r["pids"] and not [pid for pid in r["pids"] if alive(pid)]

    targets = report["targets"]
    assert {(t["mode"], t["trainers"]) for t in targets} == {("sync", 4), ("async", 4)}
    assert all(t["status"] == "SKIP" for t in targets)  # no 4-trainer cell in this run
    assert "steps/s" in proc.stdout and "SKIP  sync with 4 trainers" in proc.stdout


def test_a_float16_wire_halves_the_bytes_per_step(tmp_path):
    out = tmp_path / "training.json"
    proc = _run_script("--quick", "--trainers", "2", "--modes", "async", "--wire", "float32,float16",
                       "--seconds", "0.3", "--warmup", "0.1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rs = {r["wire_dtype"]: r for r in json.loads(out.read_text())["results"]}
    assert rs["float16"]["bytes_per_step"] == pytest.approx(rs["float32"]["bytes_per_step"] / 2, rel=0.05)
    assert all(r["ratio"] is None and r["ideal"] is None for r in rs.values())  # --compute-ms 0


def test_batches_can_come_through_a_queue_and_parameters_from_two_shards(tmp_path):
    out = tmp_path / "training.json"
    proc = _run_script("--quick", "--trainers", "1", "--modes", "async", "--wire", "float32", "--with-queue",
                       "--shards", "2", "--transport", "ipc", "--seconds", "0.3", "--warmup", "0.1",
                       "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(out.read_text())["results"]
    assert r["with_queue"] and r["shards"] == 2 and len(r["updates_per_shard"]) == 2
    assert r["feeder_batches"] > 0 and r["updates"] > 0
    assert r["trainer_ms"]["input"] > 0
    assert not [pid for pid in r["pids"] if alive(pid)]


def test_ideal_rates():
    assert training.ideal_steps("sync", 4, 20) == pytest.approx(50.0)
    assert training.ideal_steps("async", 4, 20) == pytest.approx(200.0)
    assert training.ideal_steps("async", 1, 0) is None


def test_targets_pass_fail_and_skip():
    def cell(mode, n, ratio):
        return {"mode": mode, "trainers": n, "wire_dtype": "float32", "ratio": ratio, "steps_per_s": 1.0,
                "ideal": 1.0}

    got = {(t["mode"], t["status"]) for t in training.evaluate([cell("sync", 4, 0.9), cell("async", 4, 0.5)], 20)}
    assert got == {("sync", "PASS"), ("async", "FAIL")}
    got = {t["status"] for t in training.evaluate([cell("sync", 4, None), cell("async", 4, None)], 0)}
    assert got == {"SKIP"}


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="wire dtype"):
        training.check_options(training.Options(wire_dtypes=("int8",)))
    with pytest.raises(ValueError, match="shards"):
        training.check_options(training.Options(shards=5))
    with pytest.raises(ValueError, match="trainer counts"):
        training.check_options(training.Options(trainers=(0,)))


def test_a_failing_child_fails_loudly_and_is_stopped():
    children = training._Children("broken")
    phase = training._CTX.RawValue("i", training.WAIT)
    try:
        children.spawn("ps0", training._ps_body, phase)
        # shard 3 of 1 does not exist: the PS process fails while setting up
        children.send("ps0", {"layers": [4, 3], "shards": 1, "shard": 3, "mode": "sync", "trainers": 1,
                              "address": "tcp://127.0.0.1:0"})
        with pytest.raises(training.BenchmarkError, match="IndexError"):
            children.expect("ps0", "ready", 60)
        pid = children.procs["ps0"].pid
    finally:
        children.stop(grace=5.0)
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
