"""qpipe's built-in node kinds: each module has ``run(ctx)`` and ``main(argv)``.

``kind = "reader"`` in a topology runs :func:`nodes.reader.run` with a
:class:`qpipe.runtime.NodeContext`; ``python -m nodes.reader FILE NAME
--replica I`` runs the same thing as ``qpipe node``.
"""
