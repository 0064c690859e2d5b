# Leaf module: imports nothing from qpipe. Reads every QPIPE_* setting; picks CuPy or NumPy.
"""Settings from ``QPIPE_*`` environment variables, and the array module (CuPy or NumPy).

Every environment variable qpipe reads is read here and listed in the
README's settings table:

=========================  ==========  ===============================================
variable                   default     meaning
=========================  ==========  ===============================================
QPIPE_MAX_MESSAGE_SIZE     1073741824  largest request a queue host accepts (bytes)
QPIPE_LIVENESS             10          seconds without any answer from a queue host
                                       before a waiting client reports it unavailable
QPIPE_TIMEOUT              (none)      default timeout in seconds for every blocking
                                       client call (a node's default timeout)
QPIPE_DEVICE               cpu         ``gpu`` to place arrays with CuPy when possible
QPIPE_GPU_MEMORY_FRACTION  (none)      share of the GPU's memory CuPy's pool may use
=========================  ==========  ===============================================

:func:`array_module` returns ``cupy`` when a GPU is asked for and usable and
NumPy otherwise, logging the fallback once ("soft placement").
"""

from __future__ import annotations

import dataclasses
import logging
import os
from types import ModuleType

import numpy

__all__ = ["Settings", "array_module", "describe", "settings"]

log = logging.getLogger("qpipe.xp")


def _env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={raw!r} must be >= 0")
    return value


def _env_size(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    units = {"k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
    text = raw.strip().lower()
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)].strip(), units[suffix]
            break
    else:
        number, scale = text, 1
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a size (e.g. 1073741824 or 1GiB)") from None


@dataclasses.dataclass(frozen=True)
class Settings:
    """qpipe's environment settings, read once per call of :func:`settings`."""

    max_message_size: int
    liveness: float
    timeout: float | None
    device: str
    gpu_memory_fraction: float | None


def settings() -> Settings:
    """Read the ``QPIPE_*`` environment variables (cheap; call where needed)."""
    return Settings(
        max_message_size=_env_size("QPIPE_MAX_MESSAGE_SIZE", 1 << 30),
        liveness=_env_float("QPIPE_LIVENESS", 10.0) or 10.0,
        timeout=_env_float("QPIPE_TIMEOUT", None),
        device=os.environ.get("QPIPE_DEVICE", "cpu") or "cpu",
        gpu_memory_fraction=_env_float("QPIPE_GPU_MEMORY_FRACTION", None),
    )


_warned: set[str] = set()


def array_module(device: str | None = None) -> ModuleType:
    """Return ``cupy`` for ``device="gpu"`` when CuPy imports and sees a GPU, else ``numpy``.

    Falling back logs one warning saying why, so a node's log shows where
    its arrays live.
    """
    device = (device or settings().device).lower()
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if device == "cpu":
        return numpy
    try:
        import cupy  # type: ignore[import-not-found]

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device visible")
    except Exception as e:  # ImportError, CUDA errors
        reason = f"{type(e).__name__}: {e}"
        if reason not in _warned:
            _warned.add(reason)
            log.warning("device 'gpu' requested but CuPy is unusable (%s); falling back to NumPy", reason)
        return numpy
    fraction = settings().gpu_memory_fraction
    if fraction is not None and "limit" not in _warned:
        _warned.add("limit")
        cupy.get_default_memory_pool().set_limit(fraction=min(1.0, fraction))
        log.info("CuPy memory pool limited to %.0f%% of the GPU's memory", 100 * fraction)
    return cupy


def describe(xp: ModuleType) -> str:
    """Where arrays of ``xp`` live, for a node's log: ``"CPU (NumPy)"`` or ``"GPU 0 (CuPy)"``."""
    if xp is numpy:
        return "CPU (NumPy)"
    return f"GPU {xp.cuda.runtime.getDevice()} (CuPy, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')})"
