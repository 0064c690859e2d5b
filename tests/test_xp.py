import importlib.util
import logging

import numpy as np
import pytest

from qpipe import xp

HAS_CUPY = importlib.util.find_spec("cupy") is not None


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed: the fallback path is not taken")
def test_gpu_request_without_cupy_falls_back_to_numpy_and_says_so(caplog):
    xp._warned.clear()
    with caplog.at_level(logging.WARNING, logger="qpipe.xp"):
        assert xp.array_module("gpu") is np
    assert "falling back to NumPy" in caplog.text
    assert xp.describe(np) == "CPU (NumPy)"


def test_cpu_request_is_numpy_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="qpipe.xp"):
        assert xp.array_module("cpu") is np
    assert caplog.text == ""


def test_unknown_device_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'cpu' or 'gpu'"):
        xp.array_module("tpu")


def test_settings_read_sizes_and_numbers_from_the_environment(monkeypatch):
    monkeypatch.setenv("QPIPE_MAX_MESSAGE_SIZE", "64MiB")
    monkeypatch.setenv("QPIPE_LIVENESS", "2.5")
    monkeypatch.setenv("QPIPE_GPU_MEMORY_FRACTION", "0.5")
    s = xp.settings()
    assert (s.max_message_size, s.liveness, s.gpu_memory_fraction) == (64 << 20, 2.5, 0.5)


@pytest.mark.parametrize("var, value", [("QPIPE_LIVENESS", "soon"), ("QPIPE_MAX_MESSAGE_SIZE", "big")])
def test_a_bad_setting_names_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        xp.settings()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUPY, reason="CuPy not installed")
def test_gpu_request_with_cupy_places_arrays_on_the_gpu():
    cupy = pytest.importorskip("cupy")
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA device")
    assert xp.array_module("gpu") is cupy
