"""The ``qpipe`` command: a thin shell over the library.

``qpipe run FILE``       start a topology's queue hosts and nodes here and supervise them
``qpipe node FILE NAME`` run one node replica (or one queue host) of a topology, for multi-machine runs
``qpipe validate FILE``  check a topology file and print its graph
``qpipe serve --bind A`` run a bare queue host
``qpipe request FILE``   send queries from a CSV to a running serving topology; answers or a load summary
``qpipe bench``          measure queue throughput against raw ZeroMQ
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _cmd_validate(args: argparse.Namespace) -> int:
    from .topology import TopologyError, load

    try:
        topo = load(args.file, check_imports=args.check_imports)
    except TopologyError as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:
        print(f"qpipe validate: cannot read {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    print(topo.graph_text())
    return 0


def _load(file: str, cmd: str):
    from .topology import TopologyError, load

    try:
        return load(file)
    except TopologyError as e:
        print(e, file=sys.stderr)
    except OSError as e:
        print(f"qpipe {cmd}: cannot read {file}: {e.strerror}", file=sys.stderr)
    return None


def _cmd_run(args: argparse.Namespace) -> int:
    from .launcher import Launcher

    topo = _load(args.file, "run")
    if topo is None:
        return 2
    if not all(h.is_local for h in topo.hosts.values() if any(
            n.host == h.name for n in topo.nodes.values()) or any(q.host == h.name for q in topo.queue_hosts.values())):
        print(f"qpipe run: {args.file} places processes on other machines; start each with "
              f"'qpipe node {args.file} NAME' on its machine", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{topo.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    launcher = Launcher(topo, run_dir, quiet=args.quiet, grace=args.grace, resume=args.resume)
    return launcher.run()


def _cmd_node(args: argparse.Namespace) -> int:
    from .runtime import READY_PREFIX, run_node

    topo = _load(args.file, "node")
    if topo is None:
        return 2
    if args.name in topo.queue_hosts:
        from .host import QueueServer
        from .runtime import setup_logging

        setup_logging(args.name)
        from .spec import QueueSpec

        qh = topo.queue_hosts[args.name]
        queues = {n: QueueSpec.make(**q.spec_kwargs()) for n, q in topo.queues.items() if q.host == args.name}
        server = QueueServer(qh.bind_address, max_message_size=qh.max_message_size, queues=queues)

        def ready(address: str) -> None:
            if address.startswith("tcp://0.0.0.0:") or address.startswith("tcp://[::]:"):
                address = qh.address
            print(f"queue host {args.name} serving {len(queues)} queue(s) on {address}", file=sys.stderr,
                  flush=True)
            print(READY_PREFIX + address, flush=True)

        server.serve_forever(ready=ready)
        return 0
    if args.name not in topo.nodes:
        known = ", ".join([*topo.nodes, *topo.queue_hosts])
        print(f"qpipe node: {args.file} has no node or queue host {args.name!r} (known: {known})", file=sys.stderr)
        return 2
    node = topo.nodes[args.name]
    replica = args.replica
    if replica is None:
        if node.replicas > 1:
            print(f"qpipe node: node {args.name!r} has {node.replicas} replicas; pass --replica I "
                  f"(0..{node.replicas - 1}) and start each one", file=sys.stderr)
            return 2
        replica = 0
    if not 0 <= replica < node.replicas:
        print(f"qpipe node: --replica {replica} is out of range for node {args.name!r} "
              f"(0..{node.replicas - 1})", file=sys.stderr)
        return 2
    if args.resume:
        import os

        os.environ["QPIPE_RESUME"] = "1"
    return run_node(topo, args.name, replica)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .errors import QueueError
    from .host import QueueServer

    try:
        server = QueueServer(args.bind, max_message_size=args.max_message_size)
        server.serve_forever(ready=lambda a: print(f"qpipe queue host serving on {a}", flush=True))
    except QueueError as e:
        print(f"qpipe serve: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_request(args: argparse.Namespace) -> int:
    import numpy as np

    from .errors import QueueError
    from .serving import LoadStats, ServingClient, read_csv_inputs

    topo = _load(args.file, "request")
    if topo is None:
        return 2
    name = args.queue
    if name is None:
        external = [q for q, spec in topo.queues.items() if spec.external]
        if len(external) != 1:
            print(f"qpipe request: {args.file} has {len(external)} external queues ({', '.join(external) or 'none'}); "
                  f"name the request queue with --queue", file=sys.stderr)
            return 2
        name = external[0]
    if name not in topo.queues:
        print(f"qpipe request: {args.file} has no queue {name!r} (queues: {', '.join(topo.queues)})", file=sys.stderr)
        return 2
    qh = topo.queue_hosts[topo.queues[name].host]
    address = args.address
    if address is None:
        if not qh.port:
            print(f"qpipe request: queue host {qh.name!r} of {args.file} has port 0 (chosen at start); pass "
                  f"--address tcp://127.0.0.1:PORT as 'qpipe run' printed it ('queue host {qh.name} ready at ...')",
                  file=sys.stderr)
            return 2
        address = qh.address
    shapes = topo.queues[name].shapes
    if not shapes or len(shapes) != 3 or None in shapes[2]:
        print(f"qpipe request: queue {name!r} of {args.file} does not hold requests "
              f"(id int64 [], reply_to string [], x float32 [D])", file=sys.stderr)
        return 2
    width = int(np.prod(shapes[2]))
    try:
        xs, labels, _ = read_csv_inputs(args.input, width, columns=args.columns, label=args.label or None)
    except (OSError, ValueError) as e:
        print(f"qpipe request: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    load = args.concurrency is not None or args.rate is not None or args.duration is not None
    n = args.n if args.n is not None else (None if load and args.duration else len(xs))
    try:
        with ServingClient(address, name, timeout=args.timeout, liveness=args.liveness) as sc:
            xs = xs.reshape((len(xs), *sc.input_shape))
            if load:
                stats = sc.run_load(xs, concurrency=args.concurrency or (None if args.rate else 1), rate=args.rate,
                                    duration=args.duration, n=n)
            else:
                queries, t0 = [], time.perf_counter()
                for i in range(n):
                    q = sc.submit(xs[i % len(xs)])
                    queries.append(q)
                    try:
                        p = q.result()
                    except QueueError as e:
                        print(f"row {i % len(xs)}  id {q.id}  no answer: {type(e).__name__}: {e}")
                        continue
                    k = int(np.argmax(p))
                    lab = "" if labels is None else f"  label {int(labels[i % len(xs)])}"
                    print(f"row {i % len(xs)}  id {q.id}  class {k}  p {float(p[k]):.3f}{lab}  "
                          f"{q.latency * 1e3:.2f} ms", flush=True)
                stats = LoadStats.from_queries(queries, t0, time.perf_counter(), concurrency=1)
                if labels is not None and queries:
                    hits = sum(1 for i, q in enumerate(queries) if q.latency is not None
                               and int(np.argmax(q.result())) == int(labels[i % len(xs)]))
                    print(f"accuracy {hits / len(queries):.4f} over {len(queries)} rows (column {args.label!r})")
    except QueueError as e:
        print(f"qpipe request: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"qpipe request: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qpipe request: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(stats.as_dict()))
    else:
        mode = (f"rate {stats.rate:g}/s" if stats.rate else "") + (
            f"{', ' if stats.rate else ''}concurrency {stats.concurrency}" if stats.concurrency else "")
        print(f"{name} @ {address} ({mode}): {stats.summary()}")
    return 0 if stats.answered == stats.sent else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qpipe", description="ML pipelines as processes that talk through queues.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a topology on this machine")
    r.add_argument("file", help="topology TOML file")
    r.add_argument("--run-dir", help="where logs, metrics and summary.json go (default runs/NAME-TIME)")
    r.add_argument("--quiet", action="store_true", help="no progress and no node output on the terminal")
    r.add_argument("--grace", type=float, default=10.0, help="seconds nodes get to finish after Ctrl-C (10)")
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint, if nodes keep any")
    r.set_defaults(fn=_cmd_run)

    n = sub.add_parser("node", help="run one node replica or queue host of a topology (one per machine)")
    n.add_argument("file", help="topology TOML file")
    n.add_argument("name", help="node or queue-host name")
    n.add_argument("--replica", type=int, help="replica index (required when the node has several)")
    n.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (sets QPIPE_RESUME=1)")
    n.set_defaults(fn=_cmd_node)

    v = sub.add_parser("validate", help="check a topology file and print its graph")
    v.add_argument("file", help="topology TOML file")
    v.add_argument("--check-imports", action="store_true", help="also import user node kinds (module:function)")
    v.set_defaults(fn=_cmd_validate)

    s = sub.add_parser("serve", help="run a bare queue host")
    s.add_argument("--bind", required=True, help="endpoint, e.g. tcp://127.0.0.1:5555 or ipc:///tmp/q")
    s.add_argument("--max-message-size", type=int, help="largest request in bytes (default 1 GiB)")
    s.set_defaults(fn=_cmd_serve)

    q = sub.add_parser("request", help="send queries from a CSV file to a running serving topology",
                       description="Send each CSV row as a query to the request queue of a running serving "
                                   "topology (see topologies/serving.toml) and print the answers, or, with "
                                   "--concurrency, --rate or --duration, generate load and print queries/s and "
                                   "latency percentiles.")
    q.add_argument("file", help="topology TOML file (for the request queue's host and spec)")
    q.add_argument("--queue", help="request queue (default: the file's only external queue)")
    q.add_argument("--address", help="queue host endpoint; required when the file's queue host has port 0")
    q.add_argument("--input", required=True, help="CSV file with a header; one query per row")
    q.add_argument("--columns", help="input columns: START:STOP (0-based) or comma-separated names "
                                     "(default: the first columns other than the label)")
    q.add_argument("--label", default="label", help="label column, for accuracy, if present (default 'label'; "
                                                    "'' for none)")
    q.add_argument("--n", type=int, help="queries to send (default: one per row; rows are cycled)")
    q.add_argument("--concurrency", type=int, help="load: queries kept in flight (closed loop)")
    q.add_argument("--rate", type=float, help="load: queries per second (open loop)")
    q.add_argument("--duration", type=float, help="load: seconds to send for")
    q.add_argument("--timeout", type=float, default=30.0, help="seconds a query may take (30)")
    q.add_argument("--liveness", type=float, help="seconds without a word from the host before giving up")
    q.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    q.set_defaults(fn=_cmd_request)

    b = sub.add_parser("bench", help="queue throughput benchmark (see bench/queue_throughput.py)",
                       add_help=False)
    b.set_defaults(fn=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: not an error of ours.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
