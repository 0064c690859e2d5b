import json
import multiprocessing

import numpy as np
import pytest

from qpipe import bench

pytestmark = pytest.mark.timeout(120)


def _own_children() -> list[str]:
    return [p.name for p in multiprocessing.active_children()]


def test_a_quick_run_measures_every_cell_and_conserves_items(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = bench.main(
        ["--quick", "--sizes", "64", "--transports", "ipc", "--modes", "single,batched",
         "--seconds", "0.2", "--warmup", "0.05", "--json", str(out)]
    )
    assert status == 0
    report = json.loads(out.read_text())

    cells = {(r["system"], r["mode"]): r for r in report["results"]}
    assert set(cells) == {("raw", "single"), ("qpipe", "single"), ("qpipe", "batched")}
    assert cells["qpipe", "batched"]["batch"] == 1000
    for r in report["results"]:
        assert r["transport"] == "ipc" and r["size"] == 64
        assert r["conserved"] and r["enqueued"] == r["dequeued"] > 0
        assert 0 < r["items"] <= r["dequeued"]
        assert r["elapsed"] >= 0.2
        assert r["items_per_s"] > 0
        assert r["mb_per_s"] == pytest.approx(r["items_per_s"] * 64 / 1e6)

    targets = {(t["size"], t["mode"]): t for t in report["targets"]}
    assert targets[64, "single"]["status"] in ("PASS", "FAIL")
    assert targets[64, "batched"]["status"] in ("PASS", "FAIL")
    assert targets[4 << 20, "single"]["status"] == "SKIP"

    printed = capsys.readouterr().out
    assert "qpipe/raw" in printed and "64 B single over ipc" in printed
    assert _own_children() == []


def test_a_lost_item_fails_the_cell_loudly():
    cell = bench.Cell("qpipe", "ipc", 64, "single", 1, 1000)
    window = {"items": 10, "elapsed": 1.0}
    consumed = {"dequeued": 99, "first_intact": True, "last_intact": True, "window_closed": True}
    with pytest.raises(bench.BenchmarkError, match="enqueued 100 items but the consumer dequeued 99"):
        bench._result(cell, window, {"enqueued": 100}, consumed)


def test_corrupted_data_fails_the_cell_loudly():
    cell = bench.Cell("raw", "tcp", 64, "single", 1, 1000)
    window = {"items": 10, "elapsed": 1.0}
    consumed = {"dequeued": 100, "first_intact": True, "last_intact": False, "window_closed": True}
    with pytest.raises(bench.BenchmarkError, match="last item's data differs"):
        bench._result(cell, window, {"enqueued": 100}, consumed)


@pytest.mark.parametrize(
    ("text", "size"), [("64", 64), ("64B", 64), ("4K", 4096), ("4 KiB", 4096), ("256KiB", 262144), ("4MiB", 4 << 20)]
)
def test_sizes_parse_with_binary_units(text, size):
    assert bench.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "6", "0", "-4"])
def test_sizes_that_are_not_float32_vectors_are_rejected(text):
    with pytest.raises(ValueError, match="item size"):
        bench.parse_size(text)


def test_batches_keep_messages_within_4_mib():
    assert [bench.batch_for(s) for s in bench.DEFAULT_SIZES] == [1000, 1000, 16, 1]
    for s in bench.DEFAULT_SIZES:
        assert bench.batch_for(s) * s <= 4 << 20
        assert bench.capacity_for(s, bench.batch_for(s)) >= 2 * bench.batch_for(s)


def test_a_failing_child_fails_the_cell_and_is_reaped():
    children = bench.Children("qpipe/ipc/64 B/single")
    try:
        children.spawn("consumer", bench._raw_consumer_body)
        children.send("consumer", {})  # no job fields: the child raises KeyError
        with pytest.raises(bench.BenchmarkError, match="(?s)consumer .*KeyError"):
            children.expect("consumer", "ready", 60)
    finally:
        children.stop(grace=5.0)
    assert _own_children() == []


@pytest.mark.parametrize(
    ("seqs", "message"),
    [
        ([5, 6, 8, 9], "item #7 carries sequence number 8"),  # one lost
        ([5, 6, 6, 7], "item #7 carries sequence number 6"),  # one duplicated
        ([5, 7, 6, 8], "item #6 carries sequence number 7"),  # reordered
        ([4, 5, 6, 7], "item #5 carries sequence number 4"),  # repeated from the previous batch
    ],
)
def test_a_batch_that_breaks_the_sequence_fails_loudly(seqs, message):
    xs = np.zeros((4, 16), dtype=np.float32)
    xs.view(np.uint32)[:, 0] = seqs
    ramp, scratch = np.arange(8, dtype=np.uint32), np.empty(8, dtype=np.uint32)
    with pytest.raises(bench.BenchmarkError, match=message):
        bench._check_sequence("qpipe/ipc/64 B/batched", xs, 5, ramp, scratch)


def test_a_batch_in_sequence_passes():
    xs = np.zeros((4, 16), dtype=np.float32)
    xs.view(np.uint32)[:, 0] = [5, 6, 7, 8]
    ramp, scratch = np.arange(8, dtype=np.uint32), np.empty(8, dtype=np.uint32)
    assert bench._check_sequence("qpipe/ipc/64 B/batched", xs, 5, ramp, scratch) == 4
