"""sortgate agent: decisions and orchestration. Wire formats live in ``firmware_bridge``."""

__version__ = "0.2.0"
