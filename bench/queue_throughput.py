"""Queue throughput: qpipe against raw ZeroMQ PUSH/PULL (a thin wrapper over ``qpipe.bench``).

Usage::

    python bench/queue_throughput.py                 # the full run, about 1-2 minutes
    python bench/queue_throughput.py --quick         # a smoke run
    python bench/queue_throughput.py --sizes 64,4MiB --transports ipc --json out.json

Same options as ``qpipe bench``; see ``python bench/queue_throughput.py --help``.
"""

import os
import sys

try:
    import qpipe.bench
except ImportError:  # run from a checkout without installing qpipe
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import qpipe.bench

if __name__ == "__main__":
    sys.exit(qpipe.bench.main())
