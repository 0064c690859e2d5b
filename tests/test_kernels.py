"""The fused update kernels: each NumPy twin against a plain float64 formula, each CuPy kernel against its twin.

Every case runs the kernel on seeded inputs and returns the arrays it
updated; the reference recomputes them from the same input values in float64.
The GPU tests run the same cases through CuPy and compare with the NumPy twin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from qpipe import kernels as K

SHAPE = (6, 5)
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def make_inputs(seed: int, dtype: Any, grad_dtype: Any, n_grads: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def normal(dt: Any = dtype) -> np.ndarray:
        return rng.standard_normal(SHAPE).astype(dt)

    return {
        "param": normal(),
        "grad": normal(grad_dtype),
        "grads": [normal(grad_dtype) for _ in range(n_grads)],
        "velocity": normal(),
        "m": np.zeros(SHAPE, dtype),
        "v": np.zeros(SHAPE, dtype),
        "out": np.full(SHAPE, np.nan, dtype),  # old contents must be ignored
    }


def as64(inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        k: [g.astype(np.float64) for g in v] if isinstance(v, list) else v.astype(np.float64)
        for k, v in inputs.items()
    }


@dataclass(frozen=True)
class Case:
    run: Callable[[dict[str, Any]], dict[str, Any]]  # apply the kernel; return the updated arrays
    reference: Callable[[dict[str, Any]], dict[str, Any]]  # the same, as a float64 formula
    n_grads: int = 3
    narrow_grads: bool = True  # accepts float16 gradients


def adam_reference(a: dict[str, Any], lr: float = 0.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    p, m, v = a["param"].copy(), a["m"].copy(), a["v"].copy()
    for t, g in enumerate(a["grads"], start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return {"param": p, "m": m, "v": v}


def adam_run(a: dict[str, Any]) -> dict[str, Any]:
    for t, g in enumerate(a["grads"], start=1):
        K.adam_update(a["param"], g, a["m"], a["v"], lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, step=t)
    return {"param": a["param"], "m": a["m"], "v": a["v"]}


def momentum_run(nesterov: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def run(a: dict[str, Any]) -> dict[str, Any]:
        K.momentum_update(a["param"], a["grad"], a["velocity"], lr=0.1, momentum=0.9, nesterov=nesterov)
        return {"param": a["param"], "velocity": a["velocity"]}

    return run


def momentum_reference(nesterov: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def ref(a: dict[str, Any]) -> dict[str, Any]:
        vel = 0.9 * a["velocity"] + a["grad"]
        step = a["grad"] + 0.9 * vel if nesterov else vel
        return {"param": a["param"] - 0.1 * step, "velocity": vel}

    return ref


CASES: dict[str, Case] = {
    "sgd": Case(
        run=lambda a: (K.sgd_update(a["param"], a["grad"], 0.1), {"param": a["param"]})[1],
        reference=lambda a: {"param": a["param"] - 0.1 * a["grad"]},
    ),
    "momentum": Case(run=momentum_run(False), reference=momentum_reference(False)),
    "nesterov": Case(run=momentum_run(True), reference=momentum_reference(True)),
    "adam, three steps": Case(run=adam_run, reference=adam_reference),
    "weight decay": Case(
        run=lambda a: (K.apply_weight_decay(a["param"], a["velocity"], 0.01), {"grad": a["velocity"]})[1],
        reference=lambda a: {"grad": a["velocity"] + 0.01 * a["param"]},
        narrow_grads=False,
    ),
    "average, default scale": Case(
        run=lambda a: (K.average_gradients(a["out"], a["grads"]), {"out": a["out"]})[1],
        reference=lambda a: {"out": sum(a["grads"]) / 3},
    ),
    "average of one": Case(
        run=lambda a: (K.average_gradients(a["out"], a["grads"], scale=0.5), {"out": a["out"]})[1],
        reference=lambda a: {"out": 0.5 * a["grads"][0]},
        n_grads=1,
    ),
    "average of 37 (several fused chunks)": Case(
        run=lambda a: (K.average_gradients(a["out"], a["grads"], scale=0.25), {"out": a["out"]})[1],
        reference=lambda a: {"out": 0.25 * sum(a["grads"])},
        n_grads=37,
    ),
    "average into grads[0]": Case(
        run=lambda a: (K.average_gradients(a["grads"][0], a["grads"]), {"out": a["grads"][0]})[1],
        reference=lambda a: {"out": sum(a["grads"]) / 3},
        narrow_grads=False,
    ),
    "average into grads[2]": Case(
        run=lambda a: (K.average_gradients(a["grads"][2], a["grads"]), {"out": a["grads"][2]})[1],
        reference=lambda a: {"out": sum(a["grads"]) / 3},
        narrow_grads=False,
    ),
    "average of 20 into grads[18]": Case(
        run=lambda a: (K.average_gradients(a["grads"][18], a["grads"]), {"out": a["grads"][18]})[1],
        reference=lambda a: {"out": sum(a["grads"]) / 20},
        n_grads=20,
        narrow_grads=False,
    ),
    "weighted sum": Case(
        run=lambda a: (K.weighted_sum(a["out"], a["grads"], [0.5, 0.25, -0.125]), {"out": a["out"]})[1],
        reference=lambda a: {"out": 0.5 * a["grads"][0] + 0.25 * a["grads"][1] - 0.125 * a["grads"][2]},
    ),
    "weighted sum of 20": Case(
        run=lambda a: (K.weighted_sum(a["out"], a["grads"], [1 / (i + 1) for i in range(20)]), {"out": a["out"]})[1],
        reference=lambda a: {"out": sum(g / (i + 1) for i, g in enumerate(a["grads"]))},
        n_grads=20,
    ),
    "weighted sum into grads[1]": Case(
        run=lambda a: (K.weighted_sum(a["grads"][1], a["grads"], [0.5, 0.25, 2.0]), {"out": a["grads"][1]})[1],
        reference=lambda a: {"out": 0.5 * a["grads"][0] + 0.25 * a["grads"][1] + 2.0 * a["grads"][2]},
        narrow_grads=False,
    ),
}

DTYPES = [np.float32, np.float64]
VARIANTS = [
    pytest.param(name, dt, dt, id=f"{name}-{np.dtype(dt).name}") for name in CASES for dt in DTYPES
] + [
    pytest.param(name, dt, np.float16, id=f"{name}-{np.dtype(dt).name}-float16 grads")
    for name, case in CASES.items()
    if case.narrow_grads
    for dt in DTYPES
]


def assert_same(actual: Any, desired: Any, what: str, dtype: Any) -> None:
    assert actual.dtype == np.dtype(dtype), f"{what}: dtype changed to {actual.dtype}, expected {np.dtype(dtype)}"
    np.testing.assert_allclose(actual, desired, **TOL[dtype], err_msg=what)


# --------------------------------------------------------------------------- NumPy twins vs formulas


@pytest.mark.parametrize(("name", "dtype", "grad_dtype"), VARIANTS)
def test_numpy_twin_matches_the_reference_formula(name: str, dtype: Any, grad_dtype: Any) -> None:
    case = CASES[name]
    inputs = make_inputs(1, dtype, grad_dtype, case.n_grads)
    expected = case.reference(as64(inputs))
    updated = case.run(inputs)
    for key, want in expected.items():
        assert_same(updated[key], want, f"{name}: NumPy twin ({key}) vs float64 reference formula", dtype)


def test_updates_happen_in_place_and_return_none() -> None:
    a = make_inputs(2, np.float32, np.float32)
    param, before = a["param"], a["param"].copy()
    assert K.sgd_update(param, a["grad"], 0.1) is None
    assert a["param"] is param and not np.array_equal(param, before)


def test_strided_views_are_updated_through_the_view() -> None:
    base = np.zeros((6, 10), np.float64)
    param = base[:, ::2]
    grad = np.random.default_rng(3).standard_normal((6, 5))
    K.sgd_update(param, grad, 2.0)
    np.testing.assert_allclose(base[:, ::2], -2.0 * grad, err_msg="strided param view vs -lr * grad")
    assert not base[:, 1::2].any(), "sgd_update wrote outside the view"


def test_float32_stays_float32_with_python_float_scalars() -> None:
    a = make_inputs(4, np.float32, np.float32)
    K.adam_update(a["param"], a["grad"], a["m"], a["v"], lr=1e-3, step=1)
    K.average_gradients(a["out"], a["grads"], scale=1 / 3)
    assert {a["param"].dtype, a["m"].dtype, a["v"].dtype, a["out"].dtype} == {np.dtype(np.float32)}


def test_adam_first_step_moves_each_entry_by_about_lr() -> None:
    # Bias correction makes the first step sign(grad) * lr (up to eps).
    a = make_inputs(5, np.float64, np.float64)
    before = a["param"].copy()
    K.adam_update(a["param"], a["grad"], a["m"], a["v"], lr=0.01, step=1)
    np.testing.assert_allclose(
        before - a["param"], 0.01 * np.sign(a["grad"]), rtol=1e-6, err_msg="adam step 1 vs lr * sign(grad)"
    )


# --------------------------------------------------------------------------- misuse


def f32(*shape: int) -> np.ndarray:
    return np.zeros(shape or SHAPE, np.float32)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda: K.sgd_update(f32(), f32(5, 6), 0.1),
            ValueError,
            r"sgd_update: grad has shape \(5, 6\) but param has shape \(6, 5\)",
            id="shape mismatch",
        ),
        pytest.param(
            lambda: K.sgd_update(np.zeros(SHAPE, np.int64), f32(), 0.1),
            TypeError,
            "param must be float32 or float64, got int64",
            id="integer param",
        ),
        pytest.param(
            lambda: K.sgd_update(f32(), np.zeros(SHAPE), 0.1),
            TypeError,
            r"grad must be a float no wider than param \(float32\), got float64",
            id="grad wider than param",
        ),
        pytest.param(
            lambda: K.sgd_update(f32(), [[0.0] * 5] * 6, 0.1),
            TypeError,
            "every array must be a numpy array",
            id="list instead of array",
        ),
        pytest.param(
            lambda: K.momentum_update(f32(), f32(), np.zeros(SHAPE), 0.1, 0.9),
            TypeError,
            "velocity must have param's dtype float32",
            id="velocity dtype",
        ),
        pytest.param(
            lambda: K.adam_update(f32(), f32(), f32(), f32(), 0.1, step=0),
            ValueError,
            "step counts from 1, got 0",
            id="adam step 0",
        ),
        pytest.param(lambda: K.average_gradients(f32(), []), ValueError, "grads is empty", id="no gradients"),
        pytest.param(
            lambda: K.average_gradients(f32(), f32()),
            TypeError,
            "grads must be a list of arrays",
            id="array instead of list",
        ),
        pytest.param(
            lambda: K.average_gradients(f32(), [f32(), f32().astype(np.float16)]),
            TypeError,
            r"grads\[1\] is float16 but grads\[0\] is float32",
            id="mixed grad dtypes",
        ),
        pytest.param(
            lambda: K.average_gradients(f32(), [f32(), f32(2)]),
            ValueError,
            r"grads\[1\] has shape \(2,\)",
            id="grad shape in list",
        ),
        pytest.param(
            lambda: K.weighted_sum(f32(), [f32(), f32()], [1.0]),
            ValueError,
            "1 weights for 2 gradients",
            id="weights count",
        ),
        pytest.param(
            lambda: K.apply_weight_decay(f32(), f32().astype(np.float16), 0.1),
            TypeError,
            "grad must have param's dtype",
            id="weight decay grad dtype",
        ),
    ],
)
def test_misuse_names_the_argument(call: Callable[[], None], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_read_only_param_is_refused_before_anything_changes() -> None:
    param, velocity = f32(), np.ones(SHAPE, np.float32)
    param.flags.writeable = False
    with pytest.raises(ValueError, match="param is read-only"):
        K.momentum_update(param, f32(), velocity, 0.1, 0.9)
    assert (velocity == 1).all(), "velocity changed although the call was refused"


# --------------------------------------------------------------------------- CuPy kernels vs NumPy twins


@pytest.fixture(scope="module")
def cp() -> Any:
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError:  # also when CUDA's libraries fail to load
        pytest.skip("CuPy not installed")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError when no driver
        pytest.skip(f"no CUDA device ({type(e).__name__}: {e})")
    if count < 1:
        pytest.skip("no CUDA device")
    return cupy


def to_device(cp: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: [cp.asarray(g) for g in v] if isinstance(v, list) else cp.asarray(v) for k, v in inputs.items()}


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "dtype", "grad_dtype"), VARIANTS)
def test_cupy_kernel_matches_its_numpy_twin(cp: Any, name: str, dtype: Any, grad_dtype: Any) -> None:
    case = CASES[name]
    host = make_inputs(6, dtype, grad_dtype, case.n_grads)
    device = to_device(cp, host)
    on_host = case.run(host)
    on_device = case.run(device)
    for key, want in on_host.items():
        got = on_device[key]
        assert isinstance(got, cp.ndarray), f"{name}: {key} left the GPU"
        assert_same(cp.asnumpy(got), want, f"{name}: CuPy kernel ({key}) vs NumPy twin", dtype)


@pytest.mark.gpu
def test_cupy_and_numpy_arrays_do_not_mix(cp: Any) -> None:
    with pytest.raises(TypeError, match="every array must be a cupy array"):
        K.sgd_update(cp.zeros(SHAPE, cp.float32), f32(), 0.1)
