"""The on-device image check (``check``: sources, classifier, deadline, kept images) and its
measurement (``model_eval``). Loaded only on lines that run the check (OpenCV, LiteRT)."""
