"""Model parallelism: every sliced variant trains exactly like the unsliced model.

The pure-math tests run the K slice programs and the driver in one process
(``nodes.slicing.simulate``, explicit messages); the queue tests run the same
programs in threads over a ``qpipe.QueueServer`` on inproc; one test runs a
small topology through ``qpipe run`` and compares the saved model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from _procs import clean_env

import qpipe
from nodes import model, slicing
from nodes.model_slice import Link, run_driver, run_slice, traffic_results
from nodes.slicing import SliceConfig

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "topologies" / "data" / "digits"
TOL = {"float64": 1e-10, "float32": 1e-5}
LAYERS = {"vertical": [12, 16, 12, 16, 5], "pipeline": [12, 16, 12, 16, 5], "blocks": [12, 16, 12, 16, 5]}


def batches(n_batches: int, n: int, d: int, classes: int, dtype: str, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, d)).astype(dtype), rng.integers(0, classes, n)) for _ in range(n_batches)]


def rel_err(got: dict, ref: dict) -> float:
    """Largest ``max|got - ref| / max|ref|`` over the parameters (exact zeros must stay exact)."""
    worst = 0.0
    for name, r in ref.items():
        scale = float(np.abs(r).max())
        diff = float(np.abs(np.asarray(got[name], dtype=np.float64) - r).max())
        worst = max(worst, diff / scale if scale else diff)
    return worst


def assert_same_params(got: dict, ref: dict, dtype: str, what: str) -> None:
    assert list(got) == list(ref), f"{what}: parameter names {list(got)} != reference {list(ref)}"
    err = rel_err(got, ref)
    assert err <= TOL[dtype], f"{what}: sliced vs unsliced relative difference {err:.3g} > {TOL[dtype]:g} ({dtype})"


# -- pure math: simulated slices against the unsliced model -------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("scheme", slicing.SCHEMES)
def test_sliced_training_equals_unsliced_training(scheme, k, dtype):
    cfg = SliceConfig(scheme, LAYERS[scheme], k, optimizer="momentum", lr=0.1, momentum=0.9, micro_batches=3)
    p0 = slicing.init_params(cfg, seed=3, dtype=dtype)
    data = batches(6, 10, 12, 5, dtype) + batches(1, 7, 12, 5, dtype, seed=2)  # a short last batch too
    ref, ref_losses = slicing.reference_train(cfg, p0, data)
    got, pieces, traffic = slicing.simulate(cfg, p0, data)
    assert_same_params(got, ref, dtype, f"{scheme} K={k}")
    np.testing.assert_allclose(traffic.losses, ref_losses, rtol=TOL[dtype])
    assert traffic.steps == len(data)
    for j, piece in enumerate(pieces):  # what each slice holds is its part of the gathered model
        assert list(piece) == slicing.piece_names(cfg, j)
        for name, a in slicing.split_params(cfg, got, j).items():
            np.testing.assert_array_equal(piece[name], a, err_msg=f"slice {j} {name}")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("scheme", slicing.SCHEMES)
def test_every_optimizer_keeps_the_equivalence(scheme, optimizer):
    cfg = SliceConfig(scheme, LAYERS[scheme], 2, optimizer=optimizer, lr=0.01, micro_batches=2)
    p0 = slicing.init_params(cfg, seed=5, dtype="float64")
    data = batches(4, 8, 12, 5, "float64")
    assert_same_params(slicing.simulate(cfg, p0, data)[0], slicing.reference_train(cfg, p0, data)[0], "float64",
                       f"{scheme} {optimizer}")


def test_blocks_reference_is_the_masked_dense_network_and_zero_blocks_stay_zero():
    cfg = SliceConfig("blocks", [12, 16, 12, 16, 5], 4, optimizer="momentum", lr=0.1)
    p0 = slicing.init_params(cfg, seed=0, dtype="float64")
    masks = slicing.block_mask(cfg.layers, 4)
    assert masks["W0"].all() and masks["W3"].all()
    assert masks["W1"].sum() == 4 * 4 * 3 and masks["W2"].sum() == 3 * 4 * 4
    got, _, _ = slicing.simulate(cfg, p0, batches(3, 8, 12, 5, "float64"))
    for name, m in masks.items():
        assert not np.any(got[name][m == 0]), f"{name}: an off-diagonal weight moved"
        assert np.all(got[name][m == 1] != 0)


@pytest.mark.parametrize("micro", [1, 2, 5, 64])
def test_pipeline_result_does_not_depend_on_the_number_of_micro_batches(micro):
    cfg = SliceConfig("pipeline", [12, 16, 12, 16, 5], 4, optimizer="sgd", lr=0.1, micro_batches=micro)
    p0 = slicing.init_params(cfg, seed=1, dtype="float64")
    data = batches(3, 9, 12, 5, "float64")  # 9 rows: 64 micro-batches become 9 of one row
    assert_same_params(slicing.simulate(cfg, p0, data)[0], slicing.reference_train(cfg, p0, data)[0], "float64",
                       f"pipeline M={micro}")


def test_pipeline_with_explicit_stages_equals_unsliced():
    cfg = SliceConfig("pipeline", [12, 16, 12, 16, 5], 2, stages=(3, 1), micro_batches=2)
    p0 = slicing.init_params(cfg, seed=1, dtype="float64")
    data = batches(3, 8, 12, 5, "float64")
    assert_same_params(slicing.simulate(cfg, p0, data)[0], slicing.reference_train(cfg, p0, data)[0], "float64",
                       "pipeline stages (3, 1)")


def test_blocks_move_far_fewer_bytes_than_vertical_slices_and_no_activations_between_slices():
    layers, n = [64, 512, 512, 512, 10], 32
    sent = {}
    for scheme in ("vertical", "blocks"):
        cfg = SliceConfig(scheme, layers, 4)
        _, _, traffic = slicing.simulate(cfg, slicing.init_params(cfg, 0), batches(1, n, 64, 10, "float32"))
        sent[scheme] = traffic
    v, b = sent["vertical"], sent["blocks"]
    assert b.by_kind["act"] == b.by_kind["grad"] == 0
    # vertical: 3 all-gathers and 3 reduce-scatters of n x 512 floats over 4 slices (3/4 of each leaves a slice)
    assert v.by_kind["act"] == v.by_kind["grad"] == 3 * 4 * 3 * n * 128 * 4
    assert b.bytes_per_step * 5 < v.bytes_per_step


def test_pipeline_moves_only_the_stage_boundaries():
    cfg = SliceConfig("pipeline", [64, 100, 30, 100, 10], 2, stages=(2, 2), micro_batches=4)
    _, _, traffic = slicing.simulate(cfg, slicing.init_params(cfg, 0), batches(1, 32, 64, 10, "float32"))
    assert traffic.by_kind["act"] == traffic.by_kind["grad"] == 32 * 30 * 4


def test_unit_ranges_match_numpy_array_split():
    for n, k in [(10, 4), (128, 2), (5, 5), (7, 3)]:
        got = [b - a for a, b in slicing.unit_ranges(n, k)]
        assert got == [len(p) for p in np.array_split(np.arange(n), k)]


def test_default_stages_balance_the_parameter_count():
    assert slicing.stage_layers([64, 128, 128, 10], 2) == (1, 2)
    assert slicing.stage_layers([256, 4096, 4096, 4096, 4096, 10], 4) == (1, 1, 1, 2)
    assert sum(slicing.stage_layers([8] * 9, 3)) == 8


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "diagonal", "layers": [4, 4, 2], "slices": 2}, "scheme must be one of"),
    ({"scheme": "pipeline", "layers": [4, 4, 2], "slices": 3}, "a pipeline of 3 stages needs at least 3 layers"),
    ({"scheme": "pipeline", "layers": [4, 4, 4, 2], "slices": 2, "stages": (1, 1)}, "summing to 3"),
    ({"scheme": "vertical", "layers": [4, 4, 2], "slices": 4}, "4 slices need at least 4 units"),
    ({"scheme": "blocks", "layers": [4, 2], "slices": 2}, "needs at least one hidden layer"),
    ({"scheme": "vertical", "layers": [4, 4, 4], "slices": 2, "stages": (1, 1)}, "pipeline scheme only"),
])
def test_bad_configurations_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SliceConfig(**kwargs)


def test_programs_waiting_for_messages_nobody_sends_are_reported_as_a_deadlock():
    def waits_for(src):
        yield slicing.Send(src, slicing.ACT, 0, 0, np.zeros(1))
        yield slicing.Recv(src, slicing.GRAD, 0, 0)

    with pytest.raises(RuntimeError, match=r"deadlock: .*\{0: \(1, 3, 0, 0\), 1: \(0, 3, 0, 0\)\}"):
        slicing.run_programs({0: waits_for(1), 1: waits_for(0)})


# -- through real queues: driver and slices in threads over an inproc queue host ------------


def run_over_queues(cfg: SliceConfig, p_seed: int, dtype: str, data: list, timeout: float = 20.0):
    k = cfg.slices
    names = {e: f"to-{e}" for e in range(k + 1)}
    with qpipe.QueueServer(f"inproc://slicing-{os.getpid()}-{id(cfg)}") as server:
        clients = [qpipe.connect(server.address, timeout=timeout) for _ in range(k + 1)]
        try:
            def link(e: int) -> Link:
                qs = {i: clients[e].fifo_queue(names[i], capacity=64, dtypes=["int64", dtype]) for i in names}
                return Link(e, qs[e], {i: q for i, q in qs.items() if i != e}, dtype)

            links = [link(e) for e in range(k + 1)]
            errors: list[BaseException] = []

            def slice_thread(j: int) -> None:
                try:
                    run_slice(cfg, j, links[j], p_seed, dtype)
                except Exception as e:  # reported by the main thread
                    errors.append(e)

            threads = [threading.Thread(target=slice_thread, args=(j,), daemon=True) for j in range(k)]
            for t in threads:
                t.start()
            params, stats = run_driver(cfg, links[k], data)
            for t in threads:
                t.join(timeout)
                assert not t.is_alive(), "a slice thread did not finish"
            assert not errors, errors
            return params, stats
        finally:
            for c in clients:
                c.close()


@pytest.mark.parametrize("scheme, k", [("vertical", 2), ("pipeline", 4), ("blocks", 4), ("vertical", 4)])
def test_slices_over_qpipe_queues_end_with_the_unsliced_parameters(scheme, k):
    dtype = "float64"
    cfg = SliceConfig(scheme, LAYERS[scheme], k, optimizer="momentum", lr=0.1, micro_batches=3)
    data = batches(4, 10, 12, 5, dtype)
    params, stats = run_over_queues(cfg, 7, dtype, data)
    ref, _ = slicing.reference_train(cfg, slicing.init_params(cfg, 7, dtype), data)
    assert_same_params(params, ref, dtype, f"{scheme} K={k} over queues")
    # The costs each node reports are the messages the simulation counts, plus a 40-byte header each.
    _, _, sim = slicing.simulate(cfg, slicing.init_params(cfg, 7, dtype), data)
    for e, s in stats.items():
        assert s.steps == len(data)
        assert s.bytes_sent == sim.sent[e] + 40 * sim.messages[e], f"endpoint {e}"
        assert 0.0 <= s.wait_fraction <= 1.0
    res = traffic_results(stats, {e: ("driver" if e == k else f"slice/{e}") for e in stats})
    assert set(res["bytes_per_step"]) == {"driver", *(f"slice/{j}" for j in range(k))}
    assert res["total_bytes_per_step"] == sum(res["bytes_sent_per_step"].values())


# -- through `qpipe run`: a small topology, a saved model, the summary -----------------------


TOPOLOGY = """
[pipeline]
name = "sliced-e2e"
default_timeout = 30.0

[queues.rows]
kind = "fifo"
capacity = 1000
dtypes = ["float32", "int64"]
shapes = [[64], []]

[queues.to_driver]
kind = "fifo"
capacity = 64
dtypes = ["int64", "float64"]

[queues.to_s0]
kind = "fifo"
capacity = 64
dtypes = ["int64", "float64"]

[queues.to_s1]
kind = "fifo"
capacity = 64
dtypes = ["int64", "float64"]

[nodes.reader]
kind = "reader"
writes = ["rows"]
[nodes.reader.params]
files = "{train}"
shuffle_files = false
batch_size = 100
components = [
  {{ name = "image", columns = "0:64", dtype = "float32" }},
  {{ name = "label", columns = "label", dtype = "int64" }},
]

[nodes.driver]
kind = "model_slice"
reads = ["rows", "to_driver"]
writes = ["to_s0", "to_s1"]
[nodes.driver.params]
role = "driver"
slices = "slice"
inbox = "to_driver"
scheme = "{scheme}"
layers = [64, 32, 32, 10]
dtype = "float64"
batch_size = 16
max_steps = 6
micro_batches = 3
input_scale = 0.0625
optimizer = "momentum"
lr = 0.05
test = "{test}"
components = [
  {{ name = "image", columns = "0:64", dtype = "float32" }},
  {{ name = "label", columns = "label", dtype = "int64" }},
]

[nodes.slice]
kind = "model_slice"
replicas = 2
reads = ["to_s0", "to_s1"]
writes = ["to_s0", "to_s1", "to_driver"]
[nodes.slice.params]
role = "slice"
driver = "driver"
"""


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_qpipe_run_of_a_sliced_topology_saves_the_unsliced_models_parameters(tmp_path):
    train = DIGITS / "train-0.csv"
    topo = tmp_path / "sliced.toml"
    topo.write_text(TOPOLOGY.format(train=train, test=DIGITS / "test.csv", scheme="pipeline"))
    proc = subprocess.run([sys.executable, "-m", "qpipe.cli", "run", str(topo), "--run-dir", str(tmp_path / "run"),
                           "--quiet"], check=False, capture_output=True, text=True, timeout=50, env=clean_env(),
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert set(summary["bytes_per_step"]) == {"driver", "slice/0", "slice/1"}
    assert all(v > 0 for v in summary["bytes_per_step"].values())
    assert set(summary["wait_fraction"]) == {"driver", "slice/0", "slice/1"}
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["steps"] == 6
    # The reader keeps file order and the queue is FIFO: the driver's batches are rows 0-15, 16-31, ...
    rows = np.loadtxt(train, delimiter=",", skiprows=1)
    x = rows[:, :64].astype(np.float32).astype(np.float64) * 0.0625
    y = rows[:, 64].astype(np.int64)
    cfg = SliceConfig("pipeline", [64, 32, 32, 10], 2, optimizer="momentum", lr=0.05, micro_batches=3)
    ref, _ = slicing.reference_train(cfg, slicing.init_params(cfg, 0, "float64"),
                                     [(x[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)])
    saved, meta = model.load_model(tmp_path / "run" / "model")
    assert meta["scheme"] == "pipeline" and meta["steps"] == 6
    assert_same_params(saved, ref, "float64", "qpipe run pipeline")


# -- wiring mistakes in a topology are named ---------------------------------------------------


def wiring_error(tmp_path, **replace) -> str:
    from nodes.model_slice import _Wiring
    from qpipe.runtime import NodeContext
    from qpipe.topology import load

    text = TOPOLOGY.format(train=DIGITS / "train-0.csv", test=DIGITS / "test.csv", scheme="vertical")
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "t.toml"
    path.write_text(text)
    topo = load(path)
    with pytest.raises(ValueError) as err:
        _Wiring(NodeContext(topo, topo.node("slice"), 0, addresses={}))
    return str(err.value)


def test_a_slice_node_must_read_one_inbox_per_replica(tmp_path):
    msg = wiring_error(tmp_path, **{'replicas = 2\nreads = ["to_s0", "to_s1"]': 'replicas = 3\nreads = ["to_s0", "to_s1"]'})
    assert "node 'slice': reads must list one inbox per replica (3), in slice order, got ['to_s0', 'to_s1']" in msg


def test_an_inbox_must_carry_the_models_dtype(tmp_path):
    msg = wiring_error(tmp_path, **{'dtype = "float64"': 'dtype = "float32"'})
    assert "queue 'to_s0'" in msg and '["int64", "float32"]' in msg and "['int64', 'float64']" in msg


def test_model_params_on_a_slice_are_refused_with_a_pointer_to_the_driver(tmp_path):
    msg = wiring_error(tmp_path, **{'driver = "driver"': 'driver = "driver"\nlr = 0.5'})
    assert "move params ['lr'] to node 'driver'" in msg


def test_shipped_sliced_topologies_validate():
    from qpipe.topology import load

    for name in ("vertical", "pipeline", "blocks"):
        topo = load(REPO / "topologies" / f"sliced_{name}.toml")
        assert topo.node("driver").params["scheme"] == name
        assert topo.node("slice").replicas == len(topo.node("slice").reads)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_benchmark_runs_a_sliced_cell_in_processes_and_reports_its_costs():
    from bench import model_parallel as bench

    args = {"layers": [16, 32, 32, 32, 10], "batch": 8, "micro_batches": [2], "steps": 2, "warmup": 1,
            "dtype": "float32"}
    row = bench.run_cell("blocks K=2", "queues", {"scheme": "blocks", "layers": args["layers"], "slices": 2}, args)
    assert row["ms"] > 0 and 0 < row["total_mb"] < 0.01 and 0 <= row["wait"] <= 1
    assert "blocks K=2" in bench.format_table([row])
