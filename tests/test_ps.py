"""Parameter servers: sharding, the shard state machine, optimizers, wire casts, checkpoints, sockets.

The state machine (:class:`qpipe.ps.ShardState`) is driven directly with known
arrays and compared with updates computed by hand. The socket tests run a
:class:`qpipe.ps.ParameterServer` in a thread on ``tcp://127.0.0.1:0`` with
:class:`qpipe.ps.ParameterClient` trainers in threads; every thread is joined
under a bound, every client socket is closed by the thread that used it, and
waits are on replies or polled predicates, never on sleeps.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from _procs import poll_for
from nodes import model
from qpipe import kernels, wire
from qpipe.errors import DeadlineExceededError, InvalidArgumentError, UnavailableError
from qpipe.ps import (
    Optimizer,
    ParameterClient,
    ParameterServer,
    ShardState,
    assign_shards,
    from_wire,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    to_wire,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "topologies" / "data" / "digits"
WAIT = 10.0  # bound on a wait that should end within a second
TEARDOWN = 10.0
MLP = [64, 128, 10]


def f64(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def state_of(params: dict[str, np.ndarray], kind: str = "sgd", lr: float = 0.1, **kwargs: Any) -> ShardState:
    return ShardState({n: np.array(a) for n, a in params.items()}, Optimizer(kind, lr=lr), **kwargs)


def copy(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: a.copy() for n, a in params.items()}


# -- assign_shards ---------------------------------------------------------------------------------


def test_assign_shards_puts_the_largest_first_onto_the_least_loaded_shard():
    shapes = {"a": (5,), "b": (4,), "c": (3,), "d": (3,)}
    # a -> 0 (5); b -> 1 (4); c -> 1 (7); d -> 0 (8)
    assert assign_shards(shapes, 2) == [["a", "d"], ["b", "c"]]
    # ties in load go to the lower shard, ties in size keep the given order
    assert assign_shards({"y": (2,), "x": (2,)}, 2) == [["y"], ["x"]]
    assert assign_shards({"y": (2,), "x": (2,)}, 1) == [["y", "x"]]
    # more shards than names: the rest stay empty
    assert assign_shards({"y": (2,)}, 3) == [["y"], [], []]


@pytest.mark.parametrize("layers", [MLP, [64, 128, 128, 10], [784, 256, 64, 10]])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_assign_shards_is_deterministic_places_every_name_once_and_beats_round_robin(layers, num_shards):
    shapes = model.param_shapes(layers)
    shards = assign_shards(shapes, num_shards)
    assert shards == assign_shards(dict(shapes), num_shards)
    assert len(shards) == num_shards
    placed = [n for s in shards for n in s]
    assert sorted(placed) == sorted(shapes) and len(placed) == len(set(placed))
    for s in shards:  # names keep their given order within a shard
        assert s == [n for n in shapes if n in s]

    def max_load(assignment: list[list[str]]) -> int:
        return max(sum(math.prod(shapes[n]) for n in s) for s in assignment)

    names = list(shapes)
    round_robin = [names[j::num_shards] for j in range(num_shards)]
    assert max_load(shards) <= max_load(round_robin)
    if num_shards == 2:
        # weight/bias alternate, so round-robin puts every weight matrix on shard 0
        assert max_load(shards) < max_load(round_robin)


def test_assign_shards_for_the_example_mlp_matches_the_ps_log():
    assert assign_shards(model.param_shapes(MLP), 2) == [["W0"], ["b0", "W1", "b1"]]


@pytest.mark.parametrize("num_shards", [0, -1])
def test_assign_shards_needs_at_least_one_shard(num_shards):
    with pytest.raises(InvalidArgumentError, match=f"num_shards must be >= 1, got {num_shards}"):
        assign_shards({"w": (3,)}, num_shards)


# -- ShardState: sync ------------------------------------------------------------------------------

P0 = {"w": f64(1.0, 2.0, 3.0), "b": f64(0.5)}
G = [
    {"w": f64(0.1, 0.2, 0.3), "b": f64(1.0)},
    {"w": f64(0.3, -0.2, 0.5), "b": f64(-3.0)},
    {"w": f64(7.0, 7.0, 7.0), "b": f64(7.0)},
    {"w": f64(-1.0, 0.0, 1.0), "b": f64(2.0)},
]


def test_sync_averages_the_first_n_gradients_applies_them_and_drops_the_late_one():
    s = state_of(P0, "sgd", lr=0.1, mode="sync", replicas_to_aggregate=2)
    for t in ("t0", "t1", "t2"):
        s.hello(t)
    before = copy(G[0])
    r = s.push("t0", 0, G[0])
    assert r == {"accepted": True, "applied": False, "staleness": 0, "version": 0}
    assert s.version == 0 and all(np.array_equal(s.params[n], P0[n]) for n in P0)
    r = s.push("t1", 0, G[1])
    assert r == {"accepted": True, "applied": True, "staleness": 0, "version": 1}
    for n, p0 in P0.items():
        expected = p0 - 0.1 * (G[0][n] + G[1][n]) / 2
        np.testing.assert_allclose(s.params[n], expected, rtol=0, atol=1e-15, err_msg=n)
    assert all(np.array_equal(G[0][n], before[n]) for n in before), "the caller's gradients were modified"
    after_step = copy(s.params)

    r = s.push("t2", 0, G[2])  # the spare replica, one version late
    assert r == {"accepted": False, "reason": "late", "staleness": 1, "version": 1}
    assert all(np.array_equal(s.params[n], after_step[n]) for n in P0)
    assert s.version == 1
    assert s.counters == {"pushes": 3, "applied": 2, "aggregated": 2, "dropped_late": 1, "dropped_stale": 0,
                          "scaled": 0, "updates": 1}
    assert s.staleness_hist == {0: 2, 1: 1}


def test_sync_version_increments_once_per_step_over_many_steps():
    s = state_of(P0, "sgd", lr=0.01, mode="sync", replicas_to_aggregate=3)
    trainers = [f"t{i}" for i in range(4)]
    for t in trainers:
        s.hello(t)
    expected = copy(P0)
    for step in range(5):
        order = trainers[step % 4:] + trainers[:step % 4]  # a different straggler each step
        results = [s.push(t, step, G[i]) for i, t in enumerate(order)]
        assert [r["accepted"] for r in results] == [True, True, True, False]
        assert [r.get("applied") for r in results[:3]] == [False, False, True]
        assert s.version == step + 1
        for n in expected:
            expected[n] = expected[n] - 0.01 * (G[0][n] + G[1][n] + G[2][n]) / 3
    for n in expected:
        np.testing.assert_allclose(s.params[n], expected[n], rtol=1e-14, err_msg=n)
    assert s.counters["updates"] == 5 and s.counters["dropped_late"] == 5 and s.counters["aggregated"] == 15
    assert s.counters["dropped_late"] == s.counters["pushes"] - s.counters["aggregated"]


def test_sync_bye_lowers_the_number_needed_so_a_partial_last_step_applies():
    s = state_of(P0, "sgd", lr=0.1, mode="sync", replicas_to_aggregate=3)
    for t in ("t0", "t1", "t2", "t3"):
        s.hello(t)
    assert s.needed == 3
    s.push("t0", 0, G[0])
    s.push("t1", 0, G[1])
    assert s.bye("t2") is False and s.needed == 3 and s.version == 0  # t0, t1, t3 still train
    assert s.bye("t3") is True  # 2 left: the 2 gradients waiting are a whole step now
    assert s.needed == 2 and s.version == 1
    for n, p0 in P0.items():
        np.testing.assert_allclose(s.params[n], p0 - 0.1 * (G[0][n] + G[1][n]) / 2, atol=1e-15, err_msg=n)
    assert s.bye("t0") is False and s.needed == 1
    r = s.push("t1", 1, G[3])  # the last trainer steps alone
    assert r["applied"] is True and s.version == 2
    assert s.counters["updates"] == 2 and s.counters["applied"] == 3


def test_sync_bye_with_nothing_pending_applies_nothing():
    s = state_of(P0, mode="sync", replicas_to_aggregate=2)
    s.hello("t0")
    s.hello("t1")
    assert s.bye("t1") is False and s.version == 0
    assert s.bye("someone-unknown") is False


# -- ShardState: async -----------------------------------------------------------------------------


def test_async_applies_each_gradient_on_arrival_and_measures_staleness():
    s = state_of(P0, "sgd", lr=0.1, mode="async")
    expected = copy(P0)
    for i, (version, g) in enumerate([(0, G[0]), (0, G[1]), (1, G[3]), (0, G[0])]):
        r = s.push(f"t{i}", version, g)
        staleness = i - version
        assert r == {"accepted": True, "applied": True, "staleness": staleness, "version": i + 1}
        for n in expected:
            expected[n] = expected[n] - 0.1 * g[n]  # policy "none": stale gradients at full weight
            np.testing.assert_allclose(s.params[n], expected[n], atol=1e-14, err_msg=f"{n} after push {i}")
    assert s.staleness_hist == {0: 1, 1: 2, 3: 1}
    assert s.counters["applied"] == s.counters["updates"] == s.counters["pushes"] == 4
    assert s.counters["dropped_stale"] == s.counters["scaled"] == 0


def test_async_drop_policy_drops_gradients_staler_than_max_staleness_and_counts_them():
    s = state_of(P0, "sgd", lr=0.1, mode="async", staleness="drop", max_staleness=1)
    s.push("t0", 0, G[0])
    s.push("t0", 1, G[0])  # version 2
    kept = copy(s.params)
    r = s.push("t1", 0, G[2])  # staleness 2 > 1
    assert r == {"accepted": False, "reason": "stale", "staleness": 2, "version": 2}
    assert all(np.array_equal(s.params[n], kept[n]) for n in kept) and s.version == 2
    r = s.push("t1", 1, G[1])  # staleness 1: at the limit, applied
    assert r["accepted"] and r["staleness"] == 1 and s.version == 3
    for n in kept:
        np.testing.assert_allclose(s.params[n], kept[n] - 0.1 * G[1][n], atol=1e-14)
    assert s.counters["dropped_stale"] == 1 and s.counters["applied"] == 3
    assert s.staleness_hist == {0: 2, 2: 1, 1: 1}


def test_async_scale_policy_scales_the_update_by_one_over_one_plus_staleness():
    s = state_of(P0, "sgd", lr=0.1, mode="async", staleness="scale")
    for _ in range(3):
        s.push("t0", s.version, G[0])
    kept = copy(s.params)
    r = s.push("t1", 0, G[1])  # staleness 3: lr * 1/4
    assert r["accepted"] and r["staleness"] == 3
    for n in kept:
        np.testing.assert_allclose(s.params[n], kept[n] - 0.1 / 4 * G[1][n], rtol=0, atol=1e-15, err_msg=n)
    kept = copy(s.params)
    s.push("t0", s.version, G[3])  # fresh gradients are not scaled
    for n in kept:
        np.testing.assert_allclose(s.params[n], kept[n] - 0.1 * G[3][n], rtol=0, atol=1e-15, err_msg=n)
    assert s.counters["scaled"] == 1 and s.counters["updates"] == 5


# -- ShardState: errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("grads, version, match", [
    ({"w": f64(1, 2, 3)}, 0, r"push from trainer/7: .*\['b'\] are missing"),
    ({"w": f64(1, 2, 3), "b": f64(1), "x": f64(1)}, 0, r"push from trainer/7: gradients for \['x'\] are not on"),
    ({"w": f64(1, 2), "b": f64(1)}, 0, r"push from trainer/7: gradient 'w' has shape \[2\], the parameter \[3\]"),
    ({"w": f64(1, 2, 3), "b": f64(1)}, 1, r"push from trainer/7: version 1 is outside the shard's versions 0..0"),
], ids=["missing", "extra", "shape", "ahead"])
def test_a_bad_push_raises_invalid_argument_naming_the_trainer_and_changes_nothing(mode, grads, version, match):
    s = state_of(P0, mode=mode)
    s.hello("trainer/7")
    with pytest.raises(InvalidArgumentError, match=match):
        s.push("trainer/7", version, grads)
    assert s.version == 0 and s.counters["pushes"] == 0 and s.staleness_hist == {}
    assert all(np.array_equal(s.params[n], P0[n]) for n in P0)


def test_a_push_with_a_negative_version_is_rejected():
    s = state_of(P0, mode="async")
    with pytest.raises(InvalidArgumentError, match="trainer/7"):
        s.push("trainer/7", -1, G[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "both"}, "mode must be 'sync' or 'async', got 'both'"),
    ({"staleness": "ignore"}, "staleness policy must be 'none', 'drop' or 'scale', got 'ignore'"),
    ({"replicas_to_aggregate": 0}, "replicas_to_aggregate must be >= 1, got 0"),
])
def test_shard_state_rejects_bad_settings(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        state_of(P0, **kwargs)


# -- Optimizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind, extra", [("sgd", {}), ("momentum", {"momentum": 0.8}),
                                         ("momentum", {"momentum": 0.8, "nesterov": True}),
                                         ("adam", {"beta1": 0.85, "beta2": 0.99, "eps": 1e-6})])
def test_optimizer_equals_the_kernels_applied_by_hand(kind, extra, dtype):
    rng = np.random.default_rng(5)
    params = {"W": rng.standard_normal((4, 3)).astype(dtype), "b": rng.standard_normal(3).astype(dtype)}
    grads = [{n: rng.standard_normal(a.shape).astype(dtype) for n, a in params.items()} for _ in range(3)]
    opt = Optimizer(kind, lr=0.05, **extra)
    mine = copy(params)
    ref = copy(params)
    slots = {n: (np.zeros_like(a), np.zeros_like(a)) for n, a in params.items()}
    for step, g in enumerate(grads, start=1):
        opt.apply(mine, g, lr_scale=0.5 if step == 2 else 1.0)
        lr = 0.05 * (0.5 if step == 2 else 1.0)
        for n in ref:
            if kind == "sgd":
                kernels.sgd_update(ref[n], g[n], lr)
            elif kind == "momentum":
                kernels.momentum_update(ref[n], g[n], slots[n][0], lr, 0.8, extra.get("nesterov", False))
            else:
                kernels.adam_update(ref[n], g[n], slots[n][0], slots[n][1], lr, 0.85, 0.99, 1e-6, step)
    assert opt.steps == 3
    for n in ref:
        assert mine[n].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(mine[n], ref[n], err_msg=f"Optimizer({kind}) vs kernels, {n}")
    if kind == "sgd":
        assert opt.state() == {}
    else:
        assert set(opt.state()) == ({"W:v", "b:v"} if kind == "momentum" else {"W:m", "W:v", "b:m", "b:v"})


def test_momentum_optimizer_matches_the_formula():
    p = {"w": f64(1.0, -1.0)}
    opt = Optimizer("momentum", lr=0.1, momentum=0.9)
    opt.apply(p, {"w": f64(1.0, 2.0)})  # v = g
    opt.apply(p, {"w": f64(1.0, 2.0)})  # v = 0.9 g + g
    np.testing.assert_allclose(p["w"], f64(1.0, -1.0) - 0.1 * (1 + 1.9) * f64(1.0, 2.0), rtol=1e-14)


@pytest.mark.parametrize("kind, lr, match", [
    ("rmsprop", 0.1, "optimizer must be 'sgd', 'momentum' or 'adam', got 'rmsprop'"),
    ("sgd", 0.0, "learning rate must be a finite number > 0, got 0.0"),
    ("adam", -0.1, "learning rate must be a finite number > 0, got -0.1"),
    ("momentum", float("nan"), "learning rate must be a finite number > 0, got nan"),
])
def test_optimizer_rejects_an_unknown_kind_or_a_bad_learning_rate(kind, lr, match):
    with pytest.raises(InvalidArgumentError, match=match):
        Optimizer(kind, lr=lr)


@pytest.mark.parametrize("kwargs", [{"kind": "sgd", "lr": float("inf")}, {"kind": "adam", "beta1": 1.0}],
                         ids=["lr-inf", "beta1-1"])
def test_optimizer_rejects_settings_that_cannot_train(kwargs):
    with pytest.raises(InvalidArgumentError):
        opt = Optimizer(**kwargs)
        opt.apply({"w": f64(1.0)}, {"w": f64(1.0)})


# -- wire casts ------------------------------------------------------------------------------------


def test_float16_on_the_wire_halves_the_bytes_and_round_trips_within_its_precision():
    a = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    w = to_wire(a, "float16")
    assert w.dtype == np.float16 and w.shape == a.shape and w.nbytes * 2 == a.nbytes
    back = from_wire(w, "float16", np.dtype(np.float32))
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, a, rtol=2.0 ** -11, atol=2.0 ** -24)


def test_bfloat16_on_the_wire_halves_the_bytes_with_relative_error_at_most_2_to_the_minus_8():
    rng = np.random.default_rng(2)
    a = (rng.standard_normal(10_000) * 10.0 ** rng.uniform(-30, 30, 10_000)).astype(np.float32)
    w = to_wire(a, "bfloat16")
    assert w.dtype == np.uint16 and w.nbytes * 2 == a.nbytes
    back = from_wire(w, "bfloat16", np.dtype(np.float32))
    assert back.dtype == np.float32
    rel = np.abs(back - a) / np.abs(a)
    assert rel.max() <= 2.0 ** -8, f"bfloat16 relative error {rel.max():.3g} > 2^-8"
    # round to nearest, ties to even; exact values and infinities survive
    exact = np.array([1.0, -2.0, 0.0, 0.5, 3.0, np.inf, -np.inf], np.float32)
    np.testing.assert_array_equal(from_wire(to_wire(exact, "bfloat16"), "bfloat16", np.float32), exact)
    ties = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 3 * 2 ** -9], np.float32)
    np.testing.assert_array_equal(from_wire(to_wire(ties, "bfloat16"), "bfloat16", np.float32),
                                  np.array([1.0, 1 + 2 ** -6, 1 + 2 ** -7], np.float32))
    assert np.isnan(from_wire(to_wire(np.array([np.nan], np.float32), "bfloat16"), "bfloat16", np.float32)).all()
    # float64 parameters come back as float64
    assert from_wire(to_wire(a.astype(np.float64), "bfloat16"), "bfloat16", np.dtype(np.float64)).dtype == np.float64


def test_bfloat16_keeps_every_nan_a_nan():
    nans = np.array([0xFFFFFFFF, 0x7FFFFFFF, 0x7F800001, 0xFFBFFFFF], np.uint32).view(np.float32)
    assert np.isnan(nans).all()
    back = from_wire(to_wire(nans, "bfloat16"), "bfloat16", np.dtype(np.float32))
    assert np.isnan(back).all(), f"NaN payloads came back as {back}"


@pytest.mark.parametrize("wire_dtype", ["float32", "float16", "bfloat16"])
def test_integer_arrays_are_sent_untouched(wire_dtype):
    ints = np.arange(-5, 5, dtype=np.int64)
    assert to_wire(ints, wire_dtype) is ints
    back = from_wire(ints, wire_dtype, ints.dtype)
    assert back.dtype == np.int64 and np.array_equal(back, ints)


def test_an_unknown_wire_dtype_is_rejected():
    with pytest.raises(InvalidArgumentError, match="wire dtype must be one of"):
        to_wire(np.zeros(2, np.float32), "int8")
    with pytest.raises(InvalidArgumentError, match="wire_dtype must be one of"):
        ParameterClient(["tcp://127.0.0.1:1"], "t", wire_dtype="float8")


# -- checkpoints -----------------------------------------------------------------------------------


def trained_state(kind: str = "adam", steps: int = 3, mode: str = "sync") -> ShardState:
    rng = np.random.default_rng(3)
    s = ShardState({"W": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}, Optimizer(kind, lr=0.1),
                   mode=mode)
    for _ in range(steps):
        s.push("t0", s.version, {n: rng.standard_normal(a.shape) for n, a in s.params.items()})
    return s


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_a_checkpoint_round_trip_restores_params_slots_and_version(tmp_path, kind):
    s = trained_state(kind)
    path = save_checkpoint(tmp_path, s, {"note": "hi"})
    assert path == tmp_path / "ckpt-00000003.npz" and path.exists()
    assert latest_checkpoint(tmp_path) == path
    fresh = ShardState({"W": np.zeros((3, 2)), "b": np.zeros(2)}, Optimizer(kind, lr=0.1))
    info = load_checkpoint(path, fresh)
    assert info["version"] == 3 and info["note"] == "hi" and info["optimizer_steps"] == 3
    assert fresh.version == 3 and fresh.optimizer.steps == 3
    for n in s.params:
        np.testing.assert_array_equal(fresh.params[n], s.params[n])
    assert set(fresh.optimizer.state()) == set(s.optimizer.state())
    for k, a in s.optimizer.state().items():
        np.testing.assert_array_equal(fresh.optimizer.state()[k], a, err_msg=k)
    with np.load(path, allow_pickle=False) as z:  # plain arrays, loadable without pickle
        assert sorted(z.files)[:2] == ["param:W", "param:b"]


def test_latest_checkpoint_ignores_temp_files_and_npz_without_json(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    good = save_checkpoint(tmp_path, trained_state(steps=2))
    # a crash while writing a later checkpoint leaves these behind
    (tmp_path / "ckpt-00000009.npz.tmp").write_bytes(b"partial")
    (tmp_path / "ckpt-00000008.npz").write_bytes((good).read_bytes())  # npz written, json not yet
    (tmp_path / "ckpt-00000008.json.tmp").write_text("{")
    (tmp_path / "ckpt-00000007.json").write_text(json.dumps({"version": 7}))  # json whose npz is gone
    assert latest_checkpoint(tmp_path) == good


def test_save_checkpoint_keeps_only_the_newest_n(tmp_path):
    s = trained_state(steps=0)
    for _ in range(5):
        s.push("t0", s.version, {n: np.ones_like(a) for n, a in s.params.items()})
        save_checkpoint(tmp_path, s, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000004.json", "ckpt-00000004.npz", "ckpt-00000005.json", "ckpt-00000005.npz"]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000005.npz"


def test_save_checkpoint_never_prunes_the_checkpoint_it_just_wrote(tmp_path):
    save_checkpoint(tmp_path, trained_state(steps=5), keep=1)  # an earlier, longer run
    path = save_checkpoint(tmp_path, trained_state(steps=2), keep=1)  # a fresh run at version 2
    assert path.exists() and latest_checkpoint(tmp_path) == path


@pytest.mark.parametrize("params, match", [
    ({"W": np.zeros((3, 2)), "c": np.zeros(2)}, r"holds parameters \['W', 'b'\], this shard has \['W', 'c'\]"),
    ({"W": np.zeros((3, 2))}, r"holds parameters \['W', 'b'\], this shard has \['W'\]"),
    ({"W": np.zeros((2, 3)), "b": np.zeros(2)}, r"parameter 'W' has shape \[3, 2\], expected \[2, 3\]"),
])
def test_loading_a_checkpoint_of_other_parameters_is_a_clear_error(tmp_path, params, match):
    path = save_checkpoint(tmp_path, trained_state())
    fresh = ShardState(params, Optimizer("adam"))
    with pytest.raises(InvalidArgumentError, match=f"checkpoint {re.escape(str(path))}.*" + match):
        load_checkpoint(path, fresh)
    assert fresh.version == 0


def test_a_failed_checkpoint_load_leaves_the_shard_unchanged(tmp_path):
    order = list({n for n in ["a", "b"]})  # load_checkpoint iterates a set built in the file's order
    good, bad = order
    saved = ShardState({"a": np.full(2, 9.0), "b": np.full(2, 9.0)}, Optimizer("sgd"))
    saved.params[bad] = np.full(4, 9.0)
    path = save_checkpoint(tmp_path, saved)
    shard = ShardState({"a": np.zeros(2), "b": np.zeros(2)}, Optimizer("sgd"))
    with pytest.raises(InvalidArgumentError, match=f"parameter '{bad}' has shape"):
        load_checkpoint(path, shard)
    np.testing.assert_array_equal(shard.params[good], np.zeros(2), err_msg=f"{good} was overwritten")


def test_loading_a_checkpoint_of_another_optimizer_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, trained_state("momentum"))
    fresh = ShardState({"W": np.zeros((3, 2)), "b": np.zeros(2)}, Optimizer("adam"))
    with pytest.raises(InvalidArgumentError, match="optimizer"):
        load_checkpoint(path, fresh)


# -- checkpoint -> resume equivalence ----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_train() -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([np.loadtxt(p, skiprows=1, delimiter=",") for p in sorted(DIGITS.glob("train-*.csv"))])
    return rows[:, :-1] / 16.0, rows[:, -1].astype(np.int64)


def run_sync_steps(state: ShardState, data: tuple[np.ndarray, np.ndarray], first: int, steps: int,
                   replicas: int = 2, batch: int = 32, seed: int = 7) -> None:
    """Steps ``first .. first+steps-1``: batch (step, replica) is a fixed slice of a seeded permutation."""
    x, y = data
    order = np.random.default_rng(seed).permutation(len(x))
    for step in range(first, first + steps):
        assert state.version == step
        for r in range(replicas):
            start = (step * replicas + r) * batch
            idx = np.take(order, range(start, start + batch), mode="wrap")
            _, grads = model.loss_and_grads(state.params, x[idx], y[idx], xp=np)
            state.push(f"trainer/{r}", state.version, grads)
        assert state.version == step + 1


def fresh_shard(kind: str, seed: int) -> ShardState:
    s = ShardState(model.init_params([64, 32, 10], seed=seed, dtype="float64"),
                   Optimizer(kind, lr=0.05, momentum=0.9), mode="sync", replicas_to_aggregate=2)
    s.hello("trainer/0")
    s.hello("trainer/1")
    return s


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_resuming_from_a_checkpoint_continues_exactly_like_an_uninterrupted_run(tmp_path, digits_train, kind):
    S = 15
    straight = fresh_shard(kind, seed=0)
    run_sync_steps(straight, digits_train, 0, 2 * S)

    first = fresh_shard(kind, seed=0)
    run_sync_steps(first, digits_train, 0, S)
    save_checkpoint(tmp_path, first)
    del first
    resumed = fresh_shard(kind, seed=1)  # other initial values: the checkpoint must overwrite them
    load_checkpoint(latest_checkpoint(tmp_path), resumed)
    assert resumed.version == S and resumed.optimizer.steps == S
    run_sync_steps(resumed, digits_train, S, S)

    assert resumed.version == straight.version == 2 * S
    assert resumed.optimizer.steps == straight.optimizer.steps
    for n in straight.params:
        np.testing.assert_array_equal(resumed.params[n], straight.params[n], err_msg=f"{kind}: {n}")
    for k, a in straight.optimizer.state().items():
        np.testing.assert_array_equal(resumed.optimizer.state()[k], a, err_msg=f"{kind}: slot {k}")
    # and the run learned something (the batches are real)
    x, y = digits_train
    assert model.accuracy(straight.params, x, y, xp=np) > 0.8


# -- over sockets ----------------------------------------------------------------------------------


class Served:
    def __init__(self, server: ParameterServer, thread: threading.Thread, stop: threading.Event,
                 errors: list[BaseException]) -> None:
        self.server, self.thread, self.stop, self.errors = server, thread, stop, errors

    @property
    def address(self) -> str:
        return self.server.address

    def join(self, timeout: float = WAIT) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"serve() on {self.address} still running after {timeout:g} s"
        assert not self.errors, f"serve() on {self.address} raised {self.errors!r}"


@pytest.fixture
def ps_server():
    """``ps_server(state, **kwargs)`` serves a shard on tcp port 0 in a thread; all are stopped at teardown."""
    running: list[Served] = []

    def start(state: ShardState, **kwargs: Any) -> Served:
        kwargs.setdefault("expected_trainers", 1)
        server = ParameterServer(state, "tcp://127.0.0.1:0", **kwargs)
        stop = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                server.serve(stop=stop.is_set)
            except BaseException as e:  # noqa: BLE001  (reported by join() or at teardown)
                errors.append(e)

        t = threading.Thread(target=serve, name=f"ps {server.address}", daemon=True)
        served = Served(server, t, stop, errors)
        running.append(served)
        t.start()
        return served

    yield start
    stuck = []
    for s in running:
        s.stop.set()
    for s in running:
        s.thread.join(TEARDOWN)
        if s.thread.is_alive():
            stuck.append(s.address)
    if stuck:
        pytest.fail(f"parameter servers still serving {TEARDOWN} s after stop: {stuck}")
    for s in running:
        assert not s.errors, f"serve() on {s.address} raised {s.errors!r}"


def run_threads(targets: list[Callable[[], Any]], timeout: float = 3 * WAIT) -> list[Any]:
    """Run each target in a thread; join all under one bound; re-raise the first error."""
    results: list[Any] = [None] * len(targets)
    errors: list[BaseException | None] = [None] * len(targets)

    def wrap(i: int, fn: Callable[[], Any]) -> None:
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            errors[i] = e

    threads = [threading.Thread(target=wrap, args=(i, fn), name=f"worker {i}", daemon=True)
               for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        raise AssertionError(f"threads still running after {timeout:g} s: {stuck}")
    for e in errors:
        if e is not None:
            raise e
    return results


@pytest.fixture
def clients():
    """``clients(addresses, name, **kw)`` for clients used from the test thread; closed at teardown."""
    made: list[ParameterClient] = []

    def make(addresses: list[str], name: str, **kwargs: Any) -> ParameterClient:
        kwargs.setdefault("timeout", WAIT)
        c = ParameterClient(addresses, name, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_sync_over_sockets_two_of_three_trainers_aggregate_and_late_pushes_are_counted(ps_server):
    lr, steps = 0.5, 15
    shards = [ps_server(ShardState({"w": np.zeros(6, np.float32)}, Optimizer("sgd", lr=lr), mode="sync",
                                   replicas_to_aggregate=2), expected_trainers=3),
              ps_server(ShardState({"b": np.zeros(3, np.float32)}, Optimizer("sgd", lr=lr), mode="sync",
                                   replicas_to_aggregate=2), expected_trainers=3)]
    addresses = [s.address for s in shards]

    def trainer(i: int) -> dict[str, Any]:
        pc = ParameterClient(addresses, f"trainer/{i}", timeout=WAIT)
        try:
            assert pc.hello() == [["w"], ["b"]]
            params = pc.pull(0)
            dropped = [0, 0]
            seen = []
            for _ in range(steps):
                grads = {n: np.ones_like(a) for n, a in params.items()}
                versions = list(pc.versions)
                replies = pc.push(grads, versions)
                for j, r in enumerate(replies):
                    dropped[j] += not r["accepted"]
                params = pc.pull([v + 1 for v in versions])
                assert all(v > old for v, old in zip(pc.versions, versions))
                seen.append(list(pc.versions))
                for j, n in enumerate(("w", "b")):  # every step averages gradients of ones
                    np.testing.assert_array_equal(params[n], np.full_like(params[n], -lr * pc.versions[j]))
            return {"dropped": dropped, "last": seen[-1]}
        finally:
            pc.bye()
            pc.close()

    results = run_threads([lambda i=i: trainer(i) for i in range(3)])
    for s in shards:
        s.join()  # serve() returns by itself once all 3 expected trainers said bye
    for j, s in enumerate(shards):
        st = s.server.stats()
        state = s.server.state
        assert st["pushes"] == 3 * steps, st
        assert st["dropped_late"] == st["pushes"] - st["aggregated"], st
        assert st["dropped_late"] == sum(r["dropped"][j] for r in results), st
        assert st["applied"] == st["aggregated"] and st["updates"] == st["version"] == state.version
        assert steps <= state.version <= st["aggregated"], st
        assert max(r["last"][j] for r in results) == state.version  # the last step was seen by a trainer
        assert st["clients_left"] == 3 and st["clients_gone"] == 0
        name = "wb"[j]
        np.testing.assert_array_equal(state.params[name], np.full_like(state.params[name], -lr * state.version))


def digits_batches(data: tuple[np.ndarray, np.ndarray], n: int, batch: int = 32):
    x, y = data
    order = np.random.default_rng(0).permutation(len(x))
    for i in range(n):
        idx = np.take(order, range(i * batch, (i + 1) * batch), mode="wrap")
        yield x[idx].astype(np.float32), y[idx]


@pytest.mark.parametrize("wire_dtype", ["float16", "bfloat16"])
def test_half_width_wire_dtypes_halve_push_bytes_and_training_still_works(ps_server, clients, digits_train,
                                                                         wire_dtype):
    params = model.init_params([64, 32, 10], seed=0)
    served = ps_server(ShardState(params, Optimizer("momentum", lr=0.1), mode="sync"), expected_trainers=2)
    full = clients([served.address], "trainer/0")
    half = clients([served.address], "trainer/1", wire_dtype=wire_dtype)
    full.hello()
    half.hello()
    grads = {n: np.full(a.shape, 1e-3, np.float32) for n, a in params.items()}
    grad_bytes = sum(a.nbytes for a in grads.values())

    def push_bytes(pc: ParameterClient) -> int:
        before = pc.bytes_sent
        pc.push(grads)
        return pc.bytes_sent - before

    half.pull(0)
    sent_full, sent_half = push_bytes(full), push_bytes(half)
    assert sent_full > grad_bytes and sent_half > grad_bytes // 2
    saved = sent_full - sent_half
    assert abs(saved - grad_bytes // 2) <= 64, (sent_full, sent_half, grad_bytes)
    assert 0.49 < sent_half / sent_full < 0.52
    received_before = half.bytes_received
    pulled = half.pull(0)
    assert half.bytes_received - received_before < 0.52 * sent_full
    assert all(a.dtype == np.float32 for a in pulled.values())
    full.bye()

    # train alone (1 of 1) through the half-width wire: the model learns
    x, y = digits_train
    for xb, yb in digits_batches(digits_train, 120):
        params = half.pull(0)
        _, g = model.loss_and_grads(params, xb, yb, xp=np)
        assert half.push(g)[0]["applied"]
    final = half.pull(0)
    assert half.versions == [121] and served.server.state.params["W0"].dtype == np.float32
    acc = model.accuracy(final, x.astype(np.float32), y, xp=np)
    assert acc > 0.9, f"training over {wire_dtype} reached only {acc:.3f}"
    half.bye()
    served.join()


def test_a_pull_of_a_version_never_reached_times_out_with_deadline_exceeded(ps_server, clients):
    served = ps_server(ShardState({"w": np.zeros(3)}, Optimizer()), expected_trainers=1)
    pc = clients([served.address], "trainer/0")
    pc.hello()
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceededError, match=r"pull of version 5 timed out; the shard is at version 0"):
        pc.pull(5, timeout=0.3)
    elapsed = time.monotonic() - t0
    assert 0.29 <= elapsed < 1.3, f"a pull with timeout 0.3 took {elapsed:.2f} s to fail"
    # the client and the server are still usable, and the expired pull is gone
    assert pc.push({"w": np.ones(3)})[0]["applied"] and pc.pull(1, timeout=1.0)["w"].tolist() == [-0.1] * 3
    assert served.server.stats()["version"] == 1
    pc.bye()
    served.join()


def test_a_pull_from_a_server_that_never_answers_times_out_with_deadline_exceeded(clients):
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)  # accepts the connection, never replies
    silent.setsockopt(zmq.LINGER, 0)
    try:
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        pc = clients([f"tcp://127.0.0.1:{port}"], "trainer/0")
        with pytest.raises(UnavailableError) as info:
            pc.pull(0, timeout=0.1)
        assert isinstance(info.value, DeadlineExceededError), f"{type(info.value).__name__}: {info.value}"
    finally:
        silent.close(0)


def test_a_pending_pull_fails_with_unavailable_when_the_server_stops(ps_server):
    served = ps_server(ShardState({"w": np.zeros(3)}, Optimizer()), expected_trainers=1)
    started = threading.Event()

    def waiter() -> None:
        pc = ParameterClient([served.address], "trainer/0", timeout=WAIT)
        try:
            pc.hello()
            started.set()
            with pytest.raises(UnavailableError, match="parameter server is stopping"):
                pc.pull(3)
        finally:
            pc.close()

    def stopper() -> None:
        assert started.wait(WAIT)
        poll_for(lambda: len(served.server._pulls) == 1, WAIT, "the pull to be waiting on the server")
        served.stop.set()

    run_threads([waiter, stopper])
    served.join()


def test_serve_returns_once_every_expected_trainer_and_evaluator_said_bye(ps_server, tmp_path):
    served = ps_server(ShardState({"w": np.zeros(3)}, Optimizer(), mode="async"), expected_trainers=2,
                       expected_evaluators=1, checkpoint_dir=tmp_path)
    left = threading.Barrier(3)

    def trainer(i: int) -> None:
        pc = ParameterClient([served.address], f"trainer/{i}", timeout=WAIT)
        try:
            pc.hello()
            pc.push({"w": np.ones(3)})
            pc.bye()
        finally:
            pc.close()
        left.wait(WAIT)

    def evaluator() -> bool:
        pc = ParameterClient([served.address], "eval/0", role="evaluator", timeout=WAIT)
        try:
            pc.hello()
            left.wait(WAIT)  # both trainers have said bye
            assert served.thread.is_alive(), "serve() returned while the evaluator was still connected"
            pc.pull(0)
            assert pc.done and pc.versions == [2]
            pc.bye()
            return True
        finally:
            pc.close()

    assert run_threads([lambda: trainer(0), lambda: trainer(1), evaluator])[2]
    served.join()
    final = latest_checkpoint(tmp_path)
    assert final is not None and json.loads(final.with_suffix(".json").read_text())["final"] is True
    assert json.loads(final.with_suffix(".json").read_text())["version"] == 2


def test_a_silent_trainer_is_reaped_after_client_timeout_and_no_longer_blocks_sync_steps(ps_server):
    served = ps_server(ShardState({"w": np.zeros(3)}, Optimizer("sgd", lr=0.1), mode="sync",
                                  replicas_to_aggregate=2), expected_trainers=2, client_timeout=0.5)
    quiet = ParameterClient([served.address], "trainer/1", timeout=WAIT)  # says hello, then nothing
    try:
        quiet.hello()
    finally:
        quiet.close()

    def trainer() -> float:
        pc = ParameterClient([served.address], "trainer/0", timeout=WAIT)
        try:
            pc.hello()
            r = pc.push({"w": np.ones(3)})[0]
            assert (r["accepted"], r["applied"], r["version"]) == (True, False, 0), r
            t0 = time.monotonic()
            while True:  # short pulls keep this trainer visibly alive while it waits for the step
                try:
                    params = pc.pull(1, timeout=0.1)
                    break
                except DeadlineExceededError:
                    assert time.monotonic() - t0 < 5.0, "the silent trainer still blocks the step"
            waited = time.monotonic() - t0
            assert pc.versions == [1] and params["w"].tolist() == [-0.1] * 3
            assert pc.stats()[0]["clients_gone"] == 1
            assert pc.push({"w": np.ones(3)})[0]["applied"] is True  # now 1 of 1 makes a step
            pc.bye()
            return waited
        finally:
            pc.close()

    waited = run_threads([trainer])[0]
    assert 0.3 <= waited < 3.0, f"the step waited {waited:.2f} s for a trainer silent for 0.5 s"
    served.join()  # trainer/0 left and trainer/1 is gone: serve() returns
    st = served.server.stats()
    assert st["clients_gone"] == 1 and st["clients_left"] == 1 and st["version"] == 2


def test_a_reaped_trainer_that_comes_back_counts_again_for_sync_steps(ps_server):
    served = ps_server(ShardState({"w": np.zeros(3)}, Optimizer("sgd", lr=0.1), mode="sync",
                                  replicas_to_aggregate=2), expected_trainers=2, client_timeout=0.5)
    gone = threading.Event()
    back = threading.Event()

    def busy() -> dict[str, Any]:
        pc = ParameterClient([served.address], "trainer/0", timeout=WAIT)
        try:
            pc.hello()
            poll_for(lambda: pc.stats()[0]["clients_gone"] == 1, WAIT, "trainer/1 to be reaped")
            gone.set()
            assert back.wait(WAIT)
            r = pc.push({"w": np.ones(3)}, [0])[0]
            pc.bye()
            return r
        finally:
            pc.close()

    def straggler() -> dict[str, Any]:
        pc = ParameterClient([served.address], "trainer/1", timeout=WAIT)
        try:
            pc.hello()
            assert gone.wait(WAIT)
            r = pc.push({"w": 3 * np.ones(3)}, [0])[0]  # back: 2 of 2 trainers are training again
            back.set()
            pc.pull(1)
            pc.bye()
            return r
        finally:
            pc.close()

    r_busy, r_straggler = run_threads([busy, straggler])
    served.join()
    st = served.server.stats()
    assert r_straggler["applied"] is False, "the returning trainer's gradient made a step on its own"
    assert r_busy["applied"] is True and st["aggregated"] == 2 and st["dropped_late"] == 0
    np.testing.assert_allclose(served.server.state.params["w"], [-0.2] * 3)


def test_a_trainer_waiting_in_a_pull_is_not_reaped(ps_server):
    served = ps_server(ShardState({"w": np.zeros(3)}, Optimizer("sgd", lr=0.1), mode="async"),
                       expected_trainers=2, client_timeout=0.5)
    waiting = threading.Event()
    warmup = 8

    def leader() -> int:
        pc = ParameterClient([served.address], "trainer/0", timeout=WAIT)
        try:
            pc.hello()
            assert waiting.wait(WAIT)
            gone = 0
            for _ in range(warmup):  # one update every 0.2 s: alive, but slower than client_timeout overall
                threading.Event().wait(0.2)
                pc.push({"w": np.ones(3)})
                gone = max(gone, pc.stats()[0]["clients_gone"])
            pc.bye()
            return gone
        finally:
            pc.close()

    def follower() -> int:
        pc = ParameterClient([served.address], "trainer/1", timeout=WAIT)
        try:
            pc.hello()
            waiting.set()
            pc.pull(warmup, timeout=5.0)  # the warm-up wait: blocked on the server, not silent
            version = pc.versions[0]
            pc.bye()
            return version
        finally:
            pc.close()

    gone, version = run_threads([leader, follower])
    served.join()
    assert version == warmup
    assert gone == 0, "trainer/1 was reaped while its pull was waiting on the server"


@pytest.mark.parametrize("header", [
    {"op": "pull", "min_version": "soon"},
    {"op": "pull", "min_version": 3, "timeout": "later"},
    {"op": "push", "version": "x", "names": []},
], ids=["min_version", "timeout", "version"])
def test_a_malformed_request_gets_an_error_reply_and_the_server_keeps_serving(ps_server, raw_dealer, header):
    served = ps_server(ShardState({"w": np.zeros(3)}, Optimizer()), expected_trainers=1)
    sock = raw_dealer(served.address)
    try:
        sock.send_multipart(wire.encode({"id": 1, "client": "rogue", **header}))
        poll_for(lambda: sock.poll(10) or not served.thread.is_alive(), WAIT, "a reply or the server's end")
        assert served.thread.is_alive(), f"the parameter server died: {served.errors!r}"
        reply, _ = wire.decode(sock.recv_multipart(), None)
        assert reply.get("error") == InvalidArgumentError.code, reply
    finally:
        served.errors.clear()  # the bug's traceback; keeps the fixture's teardown check for other tests
