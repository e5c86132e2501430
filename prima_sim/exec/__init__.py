"""Real execution: layer-window shards, llama.cpp workers on a ZeroMQ ring, prefetch, measurements.

See ``docs/exec.md``. Only this package (and the ``run``, ``worker`` and ``shard`` commands) imports
``llama_cpp`` or ``zmq``; importing the package itself imports neither.
"""
