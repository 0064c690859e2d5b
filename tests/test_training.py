"""Data-parallel training end to end: ``qpipe run`` on the data-parallel topologies, as subprocesses.

Processes are ``_procs.Proc`` objects from the ``procs`` fixture in ``conftest.py``
(own session, output pumped by a thread, the launcher's process group and every
process seen below it killed by PID at teardown). Waits are on output lines or
exits, each with a bound.
"""

from __future__ import annotations

import json
import os
import re
import signal
from itertools import pairwise
from pathlib import Path

import pytest
from _procs import summary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[1]
TOPOLOGIES = REPO / "topologies"
DIGITS = TOPOLOGIES / "data" / "digits"
RUN = 45.0  # bound on one training run (each takes ~5-8 s)


def ps_shards(s: dict) -> list[dict]:
    """The final stats of every PS shard, from summary.json's results."""
    shards = [stats for name, res in sorted(s["results"].items()) if name.startswith("ps/") for stats in res.values()]
    assert len(shards) == 2, s["results"]
    return shards


def variant(tmp_path: Path, source: str, name: str, replace: dict[str, str]) -> Path:
    """A copy of a topology in tmp_path with absolute data paths and some lines replaced."""
    text = (TOPOLOGIES / source).read_text()
    replace = {
        'files = "data/digits/train-*.csv"': f'files = "{DIGITS}/train-*.csv"',
        'validation = "data/digits/validation.csv"': f'validation = "{DIGITS}/validation.csv"',
        'test = "data/digits/test.csv"': f'test = "{DIGITS}/test.csv"',
        **replace,
    }
    for old, new in replace.items():
        assert old in text, f"{source} no longer contains {old!r}"
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def checkpoint_versions(run_dir: Path, shard: int) -> list[int]:
    d = run_dir / "checkpoints" / f"ps-{shard}"
    return sorted(json.loads(j.read_text())["version"] for j in d.glob("ckpt-*.json") if j.with_suffix(".npz").exists())


@pytest.mark.parametrize("topology", ["data_parallel_sync.toml", "data_parallel_async.toml"])
def test_a_data_parallel_topology_trains_to_96_5_percent_and_writes_its_outputs(tmp_path, procs, topology):
    run_dir = tmp_path / "run"
    p = procs(["run", TOPOLOGIES / topology, "--run-dir", run_dir, "--quiet"], cwd=tmp_path)
    assert p.wait(RUN) == 0, p.output

    s = summary(run_dir)
    assert s["status"] == "completed" and s["exit_code"] == 0, s
    assert [r["exit_code"] for n in s["nodes"].values() for r in n["replicas"]] == [0] * 9
    assert s["test_accuracy"] >= 0.965, f"{topology}: test accuracy {s['test_accuracy']:.4f}"
    assert (run_dir / "training.png").stat().st_size > 1000
    assert (run_dir / "model" / "model.npz").exists() and (run_dir / "model" / "model.json").exists()
    history = json.loads((run_dir / "eval_history.json").read_text())
    assert len(history) >= 2 and history[-1]["val_accuracy"] > history[0]["val_accuracy"]

    shards = ps_shards(s)
    for j, st in enumerate(shards):
        versions = checkpoint_versions(run_dir, j)
        assert versions and versions[-1] == st["version"], (versions, st)  # the final checkpoint
        assert len(versions) >= 2 and all(b - a >= 200 for a, b in pairwise(versions[:-1]))
        assert st["clients_left"] == 5 and st["clients_gone"] == 0
        hist = {int(k): v for k, v in st["staleness"].items()}
        assert sum(hist.values()) == st["pushes"]
    trainers = s["nodes"]["trainer"]["replicas"]
    assert all(st["pushes"] == sum(r["metrics"]["steps"] for r in trainers) for st in shards)
    if topology == "data_parallel_sync.toml":
        for st in shards:  # 3 of 4 aggregated: the spare replica's pushes are dropped as late
            assert st["dropped_late"] > 0 and st["dropped_late"] == st["pushes"] - st["aggregated"], st
            assert st["updates"] == st["version"] and st["dropped_stale"] == 0
        assert sum(r["metrics"]["dropped_pushes"] for r in trainers) == sum(st["dropped_late"] for st in shards)
    else:
        for st in shards:  # applied on arrival; pushes staler than max_staleness = 6 dropped and counted
            hist = {int(k): v for k, v in st["staleness"].items()}
            assert any(k > 0 for k in hist), hist
            assert st["dropped_stale"] == sum(v for k, v in hist.items() if k > 6), st
            assert st["applied"] == st["pushes"] - st["dropped_stale"] == st["version"], st
            assert st["dropped_late"] == 0 and st["aggregated"] == 0


def test_a_killed_trainer_is_tolerated_and_the_run_still_reaches_96_percent(tmp_path, procs):
    topo = variant(tmp_path, "data_parallel_sync.toml", "sync_kill.toml", {
        "num_epochs = 40": "num_epochs = 60",
        "checkpoint_every_steps = 200": "checkpoint_every_steps = 200\nclient_timeout = 2.0",
    })
    run_dir = tmp_path / "run"
    p = procs(["run", topo, "--run-dir", run_dir], cwd=tmp_path)
    pid = int(p.wait_for(r"^\[trainer/1\] .*starting trainer/1 \(.*pid (\d+)\)").group(1))
    # NOTE: metrics.jsonl is block-buffered by the launcher, so progress lines are the live signal:
    # steps (summed over trainers) >= 200 means the PS passed version ~50 (3 of 4 pushes make a step).
    p.wait_for(r"^\[\s*[\d.]+s\] nodes .*\bsteps=(?:[2-9]\d\d|\d{1,3}(?:,\d{3})+)\b", RUN, stream="out")
    assert pid in p.track_children(), f"pid {pid} is not a process of this run"
    os.kill(pid, signal.SIGKILL)
    assert p.wait(RUN) == 0, p.output

    assert re.search(r"trainer/1 exited with status -9; tolerated \(1 of 1 allowed failures", p.stdout), p.stdout
    s = summary(run_dir)
    assert s["status"] == "completed" and s["exit_code"] == 0 and s["failed"] is None
    assert [r["exit_code"] for r in s["nodes"]["trainer"]["replicas"]] == [0, -9, 0, 0]
    assert s["test_accuracy"] >= 0.96, f"test accuracy {s['test_accuracy']:.4f} after losing a trainer"
    for st in ps_shards(s):
        assert st["clients_gone"] == 1 and st["clients_left"] == 4, st  # reaped after client_timeout
        assert st["version"] > 50


def test_resume_restarts_each_shard_from_its_latest_checkpoint(tmp_path, procs):
    topo = variant(tmp_path, "data_parallel_sync.toml", "sync_resume.toml", {
        "num_epochs = 40": "num_epochs = 8",
        "checkpoint_every_steps = 200": "checkpoint_every_steps = 10",
    })
    run_dir = tmp_path / "run"
    first = procs(["run", topo, "--run-dir", run_dir, "--quiet"], cwd=tmp_path)
    assert first.wait(RUN) == 0, first.output
    ended = [st["version"] for st in ps_shards(summary(run_dir))]
    for j, v in enumerate(ended):
        versions = checkpoint_versions(run_dir, j)
        assert len(versions) == 3 and versions[-1] == v > 10, versions  # keep=3, the last one final

    second = procs(["run", topo, "--run-dir", run_dir, "--quiet", "--resume"], cwd=tmp_path)
    assert second.wait(RUN) == 0, second.output
    for j, v in enumerate(ended):
        log = (run_dir / "logs" / f"ps-{j}.log").read_text()
        m = re.search(r"resumed from (\S+) \(version (\d+)\)", log)
        assert m, log
        assert int(m.group(2)) == v > 0 and Path(m.group(1)).name == f"ckpt-{v:08d}.npz"
    s = summary(run_dir)
    assert s["status"] == "completed"
    assert all(st["version"] > v for st, v in zip(ps_shards(s), ended)), (ps_shards(s), ended)
    assert s["test_accuracy"] >= 0.9
