"""The runtime: ``runtime.Agent`` (the composition root and its tasks), the ``controller``
supervisor, systemd ``health`` integration and ``logs``."""
