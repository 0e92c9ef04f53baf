"""Fixtures for integration tests: a real mosquitto on loopback, and runs of the whole line.

Every run uses its own line name, so retained status and persistent sessions of one test never
leak into another on the shared broker.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from hw_sim.broker import Mosquitto

_lines = itertools.count(1)


@pytest.fixture(scope="session")
def broker() -> Iterator[Mosquitto]:
    with Mosquitto() as m:
        yield m


@pytest.fixture
def line_name() -> str:
    return f"T{next(_lines)}"
