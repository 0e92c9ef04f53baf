"""The shipped image-check models, installed as the package ``sortgate_models``.

This folder is mapped to that import name in ``pyproject.toml`` so that a wheel carries the
models and the agent finds them with ``importlib.resources`` wherever it is installed
(``agent.vision.check.resolve_model``). ``tools/train_xray.py`` writes here; see MODEL_CARD.md.
"""
