"""Reader node: decode files (CSV, .npy, fixed-length records) and enqueue their records.

Params are documented in ``topologies/README.md`` ("Params of reader").
Files are split among the node's replicas (``files[replica::replicas]``) and
read by ``read_threads`` threads per replica, epoch after epoch with the file
order shuffled per epoch. When the node reads a *filename queue* (one scalar
``string`` component), replica 0 fills it with the file names of every epoch
and closes it, and every thread of every replica takes its next file from it.

Records go out with ``enqueue_many`` in batches of ``batch_size``. When every
replica has finished, the runtime closes the output queues (exactly once).
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

import qpipe
from qpipe.inputs import CsvDecoder, FixedLengthRecordDecoder, NpyDecoder, filename_epochs, list_files, shard_files
from qpipe.runtime import NodeContext
from nodes import node_main


def _csv_header(path: str, delimiter: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline().rstrip("\r\n")
    return [c.strip() for c in first.split(delimiter)]


def _select(spec: Any, names: list[str], where: str) -> list[str]:
    """Column names picked by a component's ``columns`` (index, "a:b", name, or list)."""
    if isinstance(spec, int):
        return [names[spec]]
    if isinstance(spec, str):
        if ":" in spec:
            a, b = (int(x) for x in spec.split(":"))
            if not 0 <= a < b <= len(names):
                raise ValueError(f"{where}: columns {spec!r} is outside the file's {len(names)} columns")
            return names[a:b]
        if spec not in names:
            raise ValueError(f"{where}: no column named {spec!r} in the header")
        return [spec]
    return [n for s in spec for n in _select(s, names, where)]


def make_decoder(params: dict[str, Any], first_file: str) -> tuple[Any, list[tuple[int, ...]]]:
    """The decoder for the params, and each component's item shape."""
    fmt = params.get("format", "csv")
    comps = params["components"]
    shapes = [tuple(c.get("shape", ())) for c in comps]
    if fmt == "csv":
        delimiter = params.get("delimiter", ",")
        if params.get("header", True):
            names = _csv_header(first_file, delimiter)
        else:
            with open(first_file, encoding="utf-8") as f:
                names = [f"c{i}" for i in range(len(f.readline().split(delimiter)))]
        columns: dict[str, str] = {}
        defaults: dict[str, Any] = {}
        selectors: list[Any] = []
        for i, c in enumerate(comps):
            picked = _select(c["columns"], names, f"params.components[{i}]")
            for n in picked:
                columns[n] = c["dtype"]
                if "default" in c:
                    defaults[n] = c["default"]
            selectors.append(picked[0] if len(picked) == 1 and not c.get("shape") else picked)
            if "shape" not in c:
                shapes[i] = () if len(picked) == 1 else (len(picked),)
        # The decoder finds columns by header name; without a header the order is the file's.
        if not params.get("header", True):
            columns = {n: columns.get(n, "string") for n in names}
        decoder = CsvDecoder(columns, defaults=defaults, components=selectors, header=params.get("header", True),
                             delimiter=delimiter, on_error=params.get("on_error", "raise"))
        return decoder, shapes
    if fmt == "npy":
        if len(comps) != 1:
            raise ValueError("params.components: the npy reader takes one component per file (a plain array)")
        return NpyDecoder(comps[0]["dtype"], shapes[0]), shapes
    if fmt == "fixed":
        specs = [(c["dtype"], c.get("shape", ())) for c in comps]
        record = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for d, s in specs)
        decoder = FixedLengthRecordDecoder(record, specs, header_bytes=params.get("header_bytes", 0),
                                           footer_bytes=params.get("footer_bytes", 0))
        return decoder, shapes
    raise ValueError(f"params.format: unknown format {fmt!r}")


def _is_filename_queue(q: qpipe.Queue) -> bool:
    return q.spec.dtypes == ("string",) and (q.spec.shapes is None or q.spec.shapes == ((),))


class _Files:
    """Thread-safe source of file names: a local epoch iterator or a filename queue."""

    def __init__(self, it: Iterator[str] | None, queue: qpipe.Queue | None) -> None:
        self._it, self._queue = it, queue
        self._lock = threading.Lock()

    def next(self) -> str | None:
        if self._queue is not None:
            try:
                return self._queue.dequeue().item().decode()
            except qpipe.OutOfRangeError:
                return None
        with self._lock:
            return next(self._it, None)  # type: ignore[arg-type]


def run(ctx: NodeContext) -> None:
    p = ctx.params
    patterns = p["files"] if isinstance(p["files"], (list, tuple)) else [p["files"]]
    files = list_files([str(ctx.path(f)) for f in patterns])
    epochs = p.get("num_epochs", 1)
    epochs = None if epochs in (None, float("inf")) else int(epochs)
    seed = p.get("seed")
    shuffle = p.get("shuffle_files", True)
    name_queues = [q for q in ctx.inputs() if _is_filename_queue(q)]
    outputs = [q for q in ctx.outputs() if not _is_filename_queue(q)]
    decoder, shapes = make_decoder(p, files[0])
    if name_queues:
        names_q = name_queues[0]
        fillers = []
        if ctx.replica == 0:
            # A thread of its own: the queue may hold fewer names than files x epochs.
            def fill() -> None:
                count = 0
                for f in filename_epochs(files, epochs, shuffle=shuffle, seed=seed):
                    if ctx.coord.should_stop():
                        return
                    names_q.enqueue(f.encode())
                    count += 1
                names_q.close()
                ctx.log.info("filled filename queue %r with %d names (%s epochs)", names_q.name, count, epochs)

            fillers.append(threading.Thread(target=_guarded, args=(ctx, fill), name="filenames"))
        source = _Files(None, names_q)
    else:
        fillers = []
        mine = shard_files(files, ctx.replica, ctx.replicas) if len(files) >= ctx.replicas else files
        if len(files) < ctx.replicas:
            ctx.log.warning("%d files for %d replicas: every replica reads all files", len(files), ctx.replicas)
        rseed = None if seed is None else seed + 1000 * ctx.replica
        source = _Files(filename_epochs(mine, epochs, shuffle=shuffle, seed=rseed), None)
    batch_size = int(p.get("batch_size", 1))
    counts = itertools.count()
    sent = [0]
    lock = threading.Lock()
    last = [time.monotonic(), 0]

    def report(n: int, force: bool = False) -> None:
        with lock:
            sent[0] += n
            now = time.monotonic()
            if force or now - last[0] >= 0.5:
                ctx.metric(items=sent[0] - last[1])
                last[0], last[1] = now, sent[0]

    def loop() -> None:
        while not ctx.coord.should_stop():
            path = source.next()
            if path is None:
                return
            next(counts)
            for batch in decoder.read_batches(path, batch_size):
                batch = tuple(b.reshape((b.shape[0], *s)) for b, s in zip(batch, shapes))
                for q in outputs:
                    q.enqueue_many(batch)
                report(batch[0].shape[0])
                if ctx.coord.should_stop():
                    return

    threads = fillers + [threading.Thread(target=_guarded, args=(ctx, loop), name=f"read-{i}")
                         for i in range(int(p.get("read_threads", 1)))]
    for t in threads:
        t.start()
    ctx.coord.join(threads, stop_grace_period_secs=ctx.timeout or 60)
    report(0, force=True)
    skipped = getattr(decoder, "skipped", 0)
    if skipped:
        ctx.log.warning("skipped %d bad records; first: %s", skipped, "; ".join(decoder.skip_messages[:3]))
    ctx.log.info("read %d records from %d files", sent[0], next(counts))
    ctx.result(records=sent[0], skipped_records=skipped)


def _guarded(ctx: NodeContext, fn: Any) -> None:
    with ctx.coord.stop_on_exception():
        fn()




main = node_main  # `python -m nodes.KIND FILE NAME --replica I`, as `qpipe node`

if __name__ == "__main__":
    sys.exit(main())
