# Row-2 module: imports numpy (and at most qpipe.xp); CuPy only lazily, once CuPy arrays are handed in.
"""Fused update kernels: optimizer steps and gradient sums, for CuPy and NumPy.

Each kernel is a CuPy ``ElementwiseKernel`` (one pass over memory, built on
first use) next to a NumPy twin with the same signature and the same in-place
semantics. The public functions pick the twin from the arrays they are given:
CuPy arrays run the CuPy kernel, NumPy arrays the NumPy twin. CuPy is never
imported here unless it has already been imported elsewhere (no CuPy array can
exist otherwise), so a CPU-only process such as a parameter server never pays
for it.

========================  ==========================================================
function                  update (in place, element by element)
========================  ==========================================================
:func:`sgd_update`        ``param -= lr * grad``
:func:`momentum_update`   ``velocity = momentum * velocity + grad``;
                          ``param -= lr * velocity``
                          (Nesterov: ``param -= lr * (grad + momentum * velocity)``)
:func:`adam_update`       ``m = b1*m + (1-b1)*grad``; ``v = b2*v + (1-b2)*grad**2``;
                          ``param -= lr * m_hat / (sqrt(v_hat) + eps)``
:func:`apply_weight_decay` ``grad += weight_decay * param``
:func:`average_gradients` ``out = scale * (grads[0] + grads[1] + ...)``
:func:`weighted_sum`      ``out = weights[0]*grads[0] + weights[1]*grads[1] + ...``
========================  ==========================================================

Momentum follows TensorFlow's ``MomentumOptimizer`` (the velocity accumulates
raw gradients); Adam uses the bias-corrected estimates of Kingma & Ba
(``m_hat = m / (1 - b1**step)``, ``v_hat = v / (1 - b2**step)``).

Dtypes: parameters and optimizer state (``velocity``, ``m``, ``v``, ``out``)
are float32 or float64 and share one dtype. Gradients may be that dtype or a
narrower float (float16 gradients, halved on the wire, are widened before
use). Scalars (``lr``, ``scale``, ...) are cast to the parameter's dtype, so
float32 stays float32. Every array must have the parameter's shape (no
broadcasting). Misuse raises ``TypeError`` (wrong kind of array or dtype) or
``ValueError`` (shape, empty list, bad ``step``), naming the argument.

None of these functions is thread-safe for the same arrays: two updates of one
parameter at once must be serialised by the caller.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy

__all__ = [
    "adam_update",
    "apply_weight_decay",
    "average_gradients",
    "momentum_update",
    "sgd_update",
    "weighted_sum",
]

_FLOATS = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
_GRAD_FLOATS = (numpy.dtype(numpy.float16),) + _FLOATS
# NOTE: CUDA caps a kernel's parameter block (4 KiB on older toolkits); 16 arrays stay well below.
_MAX_FUSED = 16


# --------------------------------------------------------------------------- dispatch and checks


def _module_of(arrays: Sequence[Any], where: str) -> ModuleType:
    """Return ``cupy`` if the arrays are CuPy arrays, ``numpy`` if NumPy arrays; refuse a mix."""
    cupy = sys.modules.get("cupy")
    xp = numpy if cupy is None else cupy.get_array_module(*arrays)
    for a in arrays:
        if not isinstance(a, xp.ndarray):
            kind = "a NumPy array" if isinstance(a, numpy.ndarray) else type(a).__name__
            raise TypeError(f"{where}: every array must be a {xp.__name__} array like the others, got {kind}")
    return xp


def _check_param(where: str, name: str, param: Any) -> None:
    if param.dtype not in _FLOATS:
        raise TypeError(f"{where}: {name} must be float32 or float64, got {param.dtype}")
    if isinstance(param, numpy.ndarray) and not param.flags.writeable:
        raise ValueError(f"{where}: {name} is read-only; pass a writeable array (it is updated in place)")


def _check_like(where: str, name: str, a: Any, ref_name: str, ref: Any, *, grad: bool) -> None:
    if a.shape != ref.shape:
        raise ValueError(f"{where}: {name} has shape {a.shape} but {ref_name} has shape {ref.shape}")
    if grad:
        if a.dtype not in _GRAD_FLOATS or a.dtype.itemsize > ref.dtype.itemsize:
            raise TypeError(
                f"{where}: {name} must be a float no wider than {ref_name} ({ref.dtype}), got {a.dtype}"
            )
    elif a.dtype != ref.dtype:
        raise TypeError(f"{where}: {name} must have {ref_name}'s dtype {ref.dtype}, got {a.dtype}")
    if isinstance(a, numpy.ndarray) and not grad and not a.flags.writeable:
        raise ValueError(f"{where}: {name} is read-only; pass a writeable array (it is updated in place)")


def _widen(grad: Any, dtype: numpy.dtype) -> Any:
    return grad if grad.dtype == dtype else grad.astype(dtype)


@functools.cache
def _cupy_kernel(name: str, in_params: str, out_params: str, operation: str) -> Any:
    import cupy  # type: ignore[import-not-found]

    return cupy.ElementwiseKernel(in_params, out_params, operation, name=f"qpipe_{name}", no_return=True)


# CuPy kernel sources: (in_params, out_params, operation). T is the parameter's
# dtype and G the gradient's; outputs are references, so they are read and written.
_SGD = ("G grad, T lr", "T param", "param -= lr * (T)grad;")
_MOMENTUM = (
    "G grad, T lr, T momentum",
    "T param, T velocity",
    "velocity = momentum * velocity + (T)grad; param -= lr * velocity;",
)
_NESTEROV = (
    "G grad, T lr, T momentum",
    "T param, T velocity",
    "T g = (T)grad; velocity = momentum * velocity + g; param -= lr * (g + momentum * velocity);",
)
_ADAM = (
    "G grad, T lr_t, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T rsqrt_bc2, T eps",
    "T param, T m, T v",
    "T g = (T)grad;"
    " m = beta1 * m + one_minus_beta1 * g;"
    " v = beta2 * v + one_minus_beta2 * (g * g);"
    " param -= lr_t * m / (sqrt(v) * rsqrt_bc2 + eps);",
)
_DECAY = ("T param, T weight_decay", "T grad", "grad += weight_decay * param;")


def _sum_kernel_source(n: int, weighted: bool, accumulate: bool) -> tuple[str, str, str, str]:
    grads = ", ".join(f"G g{i}" for i in range(n))
    if weighted:
        ins = grads + ", " + ", ".join(f"T w{i}" for i in range(n))
        expr = " + ".join(f"w{i} * (T)g{i}" for i in range(n))
    else:
        ins = grads + ", T scale"
        expr = "scale * (" + " + ".join(f"(T)g{i}" for i in range(n)) + ")"
    op = "+=" if accumulate else "="
    name = f"{'weighted_sum' if weighted else 'average'}{n}{'_acc' if accumulate else ''}"
    return name, ins, "T acc", f"acc {op} {expr};"


# --------------------------------------------------------------------------- optimizer steps


def sgd_update(param: Any, grad: Any, lr: float) -> None:
    """Take one plain gradient-descent step in place: ``param -= lr * grad``.

    Parameters
    ----------
    param : ndarray (NumPy or CuPy), float32 or float64
        The parameter, updated in place.
    grad : ndarray
        Its gradient: same shape, same dtype or a narrower float (float16).
    lr : float
        Learning rate, cast to ``param.dtype``.

    Raises
    ------
    TypeError
        If the arrays are not all NumPy or all CuPy arrays, or a dtype is wrong.
    ValueError
        If the shapes differ or ``param`` is read-only.
    """
    where = "sgd_update"
    xp = _module_of((param, grad), where)
    _check_param(where, "param", param)
    _check_like(where, "grad", grad, "param", param, grad=True)
    lr_t = param.dtype.type(lr)
    if xp is numpy:
        g = _widen(grad, param.dtype)
        param -= g * lr_t
    else:
        _cupy_kernel("sgd", *_SGD)(grad, lr_t, param)


def momentum_update(
    param: Any, grad: Any, velocity: Any, lr: float, momentum: float, nesterov: bool = False
) -> None:
    """Take one momentum step in place (TensorFlow's ``MomentumOptimizer``).

    ``velocity = momentum * velocity + grad``, then ``param -= lr * velocity``,
    or with ``nesterov=True`` ``param -= lr * (grad + momentum * velocity)``.

    Parameters
    ----------
    param : ndarray (NumPy or CuPy), float32 or float64
        The parameter, updated in place.
    grad : ndarray
        Its gradient: same shape, same dtype or a narrower float.
    velocity : ndarray
        The accumulator (start with zeros), same shape and dtype as ``param``;
        updated in place.
    lr, momentum : float
        Learning rate and momentum (e.g. 0.9), cast to ``param.dtype``.
    nesterov : bool, optional
        Use Nesterov's look-ahead form.

    Raises
    ------
    TypeError
        If the arrays are not all NumPy or all CuPy arrays, or a dtype is wrong.
    ValueError
        If the shapes differ or an updated array is read-only.
    """
    where = "momentum_update"
    xp = _module_of((param, grad, velocity), where)
    _check_param(where, "param", param)
    _check_like(where, "grad", grad, "param", param, grad=True)
    _check_like(where, "velocity", velocity, "param", param, grad=False)
    t = param.dtype.type
    lr_t, mu = t(lr), t(momentum)
    if xp is numpy:
        g = _widen(grad, param.dtype)
        velocity *= mu
        velocity += g
        if nesterov:
            step = numpy.multiply(velocity, mu)
            step += g
            step *= lr_t
        else:
            step = numpy.multiply(velocity, lr_t)
        param -= step
    else:
        source = _NESTEROV if nesterov else _MOMENTUM
        _cupy_kernel("nesterov" if nesterov else "momentum", *source)(grad, lr_t, mu, param, velocity)


def adam_update(
    param: Any,
    grad: Any,
    m: Any,
    v: Any,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    step: int = 1,
) -> None:
    """Take one bias-corrected Adam step in place (Kingma & Ba, Algorithm 1).

    ``m = beta1*m + (1-beta1)*grad``; ``v = beta2*v + (1-beta2)*grad**2``;
    ``param -= lr * m_hat / (sqrt(v_hat) + eps)`` with
    ``m_hat = m / (1 - beta1**step)`` and ``v_hat = v / (1 - beta2**step)``.

    Parameters
    ----------
    param : ndarray (NumPy or CuPy), float32 or float64
        The parameter, updated in place.
    grad : ndarray
        Its gradient: same shape, same dtype or a narrower float.
    m, v : ndarray
        First and second moment estimates (start with zeros), same shape and
        dtype as ``param``; updated in place.
    lr, beta1, beta2, eps : float
        Step size, decay rates and denominator guard.
    step : int
        This step's number, counting from 1 (used for the bias correction).

    Raises
    ------
    TypeError
        If the arrays are not all NumPy or all CuPy arrays, or a dtype is wrong.
    ValueError
        If the shapes differ, an updated array is read-only, or ``step < 1``.
    """
    where = "adam_update"
    xp = _module_of((param, grad, m, v), where)
    _check_param(where, "param", param)
    _check_like(where, "grad", grad, "param", param, grad=True)
    _check_like(where, "m", m, "param", param, grad=False)
    _check_like(where, "v", v, "param", param, grad=False)
    if int(step) != step or step < 1:
        raise ValueError(f"{where}: step counts from 1, got {step!r}")
    # Bias corrections in double precision on the host, then folded into two scalars.
    bc1 = 1.0 - float(beta1) ** int(step)
    bc2 = 1.0 - float(beta2) ** int(step)
    t = param.dtype.type
    lr_t, rsqrt_bc2 = t(lr / bc1), t(1.0 / math.sqrt(bc2))
    b1, b2, e = t(beta1), t(beta2), t(eps)
    omb1, omb2 = t(1.0 - beta1), t(1.0 - beta2)
    if xp is numpy:
        g = _widen(grad, param.dtype)
        tmp = numpy.multiply(g, omb1)
        m *= b1
        m += tmp
        numpy.multiply(g, g, out=tmp)
        tmp *= omb2
        v *= b2
        v += tmp
        numpy.sqrt(v, out=tmp)
        tmp *= rsqrt_bc2
        tmp += e
        numpy.divide(m, tmp, out=tmp)
        tmp *= lr_t
        param -= tmp
    else:
        _cupy_kernel("adam", *_ADAM)(grad, lr_t, b1, omb1, b2, omb2, rsqrt_bc2, e, param, m, v)


def apply_weight_decay(param: Any, grad: Any, weight_decay: float) -> None:
    """Add the L2 penalty's gradient to ``grad`` in place: ``grad += weight_decay * param``.

    Call it before an optimizer step so that the step also shrinks ``param``
    (coupled weight decay, as in ``loss + weight_decay/2 * sum(param**2)``).

    Parameters
    ----------
    param : ndarray (NumPy or CuPy), float32 or float64
        The parameter (read only).
    grad : ndarray
        Its gradient, same shape and dtype as ``param``; updated in place.
    weight_decay : float
        The L2 coefficient, cast to ``param.dtype``.

    Raises
    ------
    TypeError
        If the arrays are not all NumPy or all CuPy arrays, or a dtype is wrong.
    ValueError
        If the shapes differ or ``grad`` is read-only.
    """
    where = "apply_weight_decay"
    xp = _module_of((param, grad), where)
    if param.dtype not in _FLOATS:
        raise TypeError(f"{where}: param must be float32 or float64, got {param.dtype}")
    _check_like(where, "grad", grad, "param", param, grad=False)
    wd = param.dtype.type(weight_decay)
    if xp is numpy:
        grad += param * wd
    else:
        _cupy_kernel("weight_decay", *_DECAY)(param, wd, grad)


# --------------------------------------------------------------------------- gradient sums


def _check_sum(where: str, out: Any, grads: Sequence[Any]) -> ModuleType:
    if isinstance(grads, (numpy.ndarray, str, bytes)) or not isinstance(grads, Sequence):
        raise TypeError(f"{where}: grads must be a list of arrays, got {type(grads).__name__}")
    if not grads:
        raise ValueError(f"{where}: grads is empty; there is nothing to sum")
    xp = _module_of((out, *grads), where)
    _check_param(where, "out", out)
    for i, g in enumerate(grads):
        _check_like(where, f"grads[{i}]", g, "out", out, grad=True)
        if g.dtype != grads[0].dtype:
            raise TypeError(f"{where}: grads[{i}] is {g.dtype} but grads[0] is {grads[0].dtype}; use one dtype")
    return xp


def _aliases_later(xp: ModuleType, out: Any, grads: Sequence[Any], first_ok: int) -> bool:
    """True if ``out`` overlaps a gradient that is read after ``out`` is first written."""
    return any(xp.may_share_memory(out, g) for g in grads[first_ok:])


def _numpy_sum(out: Any, grads: Sequence[Any], weights: Sequence[Any] | None, scale: Any) -> None:
    dt = out.dtype
    if weights is None:
        if len(grads) == 1:
            numpy.multiply(grads[0], scale, out=out, dtype=dt)
            return
        numpy.add(grads[0], grads[1], out=out, dtype=dt)
        for g in grads[2:]:
            numpy.add(out, g, out=out, dtype=dt)
        out *= scale
    else:
        numpy.multiply(grads[0], weights[0], out=out, dtype=dt)
        if len(grads) > 1:
            tmp = numpy.empty_like(out)
            for g, w in zip(grads[1:], weights[1:]):
                numpy.multiply(g, w, out=tmp, dtype=dt)
                out += tmp


def _cupy_sum(out: Any, grads: Sequence[Any], weights: Sequence[Any] | None, scale: Any) -> None:
    for start in range(0, len(grads), _MAX_FUSED):
        chunk = list(grads[start : start + _MAX_FUSED])
        kernel = _cupy_kernel(*_sum_kernel_source(len(chunk), weights is not None, start > 0))
        if weights is None:
            kernel(*chunk, scale, out)
        else:
            kernel(*chunk, *weights[start : start + _MAX_FUSED], out)


def _sum_into(xp: ModuleType, out: Any, grads: Sequence[Any], weights: Sequence[Any] | None, scale: Any) -> None:
    # NumPy first writes out after reading grads[0] (and grads[1] when unweighted),
    # CuPy after reading a whole fused chunk; later aliases need a scratch result.
    if xp is numpy:
        first_ok = 1 if weights is not None else 2
    else:
        first_ok = _MAX_FUSED
    target = xp.empty_like(out) if _aliases_later(xp, out, grads, first_ok) else out
    (_numpy_sum if xp is numpy else _cupy_sum)(target, grads, weights, scale)
    if target is not out:
        out[...] = target


def average_gradients(out: Any, grads: Sequence[Any], scale: float | None = None) -> None:
    """Sum gradients and scale the sum in place: ``out = scale * (grads[0] + grads[1] + ...)``.

    Parameters
    ----------
    out : ndarray (NumPy or CuPy), float32 or float64
        Receives the result; its old contents are ignored. It may be one of
        ``grads`` (the sum is then computed safely).
    grads : list of ndarray
        One or more gradients of ``out``'s shape, all of one dtype: ``out``'s
        or a narrower float (widened before summing).
    scale : float, optional
        Factor applied to the sum; defaults to ``1 / len(grads)`` (the mean).

    Raises
    ------
    TypeError
        If ``grads`` is not a list, the arrays are not all NumPy or all CuPy
        arrays, or a dtype is wrong.
    ValueError
        If ``grads`` is empty, the shapes differ or ``out`` is read-only.
    """
    where = "average_gradients"
    xp = _check_sum(where, out, grads)
    s = out.dtype.type(1.0 / len(grads) if scale is None else scale)
    _sum_into(xp, out, grads, None, s)


def weighted_sum(out: Any, grads: Sequence[Any], weights: Sequence[float]) -> None:
    """Weighted sum of gradients in place: ``out = weights[0]*grads[0] + weights[1]*grads[1] + ...``.

    Use it to down-scale stale gradients (e.g. ``weights[i] = 1 / (N * (1 +
    staleness[i]))``) or to mix replicas unequally. The weights are not
    normalised.

    Parameters
    ----------
    out : ndarray (NumPy or CuPy), float32 or float64
        Receives the result; its old contents are ignored. It may be one of ``grads``.
    grads : list of ndarray
        One or more gradients of ``out``'s shape, all of one dtype: ``out``'s
        or a narrower float.
    weights : sequence of float
        One weight per gradient, each cast to ``out.dtype``.

    Raises
    ------
    TypeError
        If ``grads`` is not a list, the arrays are not all NumPy or all CuPy
        arrays, or a dtype is wrong.
    ValueError
        If ``grads`` is empty, ``weights`` has a different length, the shapes
        differ or ``out`` is read-only.
    """
    where = "weighted_sum"
    xp = _check_sum(where, out, grads)
    if len(weights) != len(grads):
        raise ValueError(f"{where}: {len(weights)} weights for {len(grads)} gradients; give one weight per gradient")
    t = out.dtype.type
    _sum_into(xp, out, grads, [t(w) for w in weights], None)
