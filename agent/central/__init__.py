"""Everything MQTT: the link (``mqtt``), what central sends (``inbound``: verdict intake, look-ups,
commands), the durable ``outbox``, the ``verdicts`` store, ``messages`` and their strict parsing,
``security`` (secrets, signatures), ``alarms`` and the kept ``mode_store``."""
