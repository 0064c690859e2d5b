"""qpipe's built-in node kinds: each module has ``run(ctx)`` and ``main(argv)``.

``kind = "reader"`` in a topology runs :func:`nodes.reader.run` with a
:class:`qpipe.runtime.NodeContext`; ``python -m nodes.reader FILE NAME
--replica I`` runs the same thing as ``qpipe node``.
"""

from collections.abc import Sequence


def node_main(argv: Sequence[str] | None = None) -> int:
    """Run ``qpipe node FILE NAME [--replica I]``: every node module's ``main``."""
    import sys

    from qpipe.cli import main as cli_main

    return cli_main(["node", *(sys.argv[1:] if argv is None else argv)])
