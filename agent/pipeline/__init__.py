"""One parcel, in order: ``intake`` (inputs tied to triggers by ``matching``) -> ``parcel_task``
(deadline, look-up, image check, ``decision``, command) -> ``recorder`` (results to durable
``records``). ``pipeline.Pipeline`` composes them over one ``state.LineState``."""
