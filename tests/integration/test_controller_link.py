"""ControllerLink against the simulated controller over Modbus TCP on loopback (no agent)."""

from __future__ import annotations

import asyncio

import pytest

from firmware_bridge import contract as c
from firmware_bridge.modbus_link import ControllerLink, LinkSettings
from hw_sim.controller import ControllerModel, ControllerParams, serve_tcp

pytestmark = pytest.mark.integration


async def test_concurrent_commands_each_get_their_own_acknowledgement() -> None:
    """The mailbox holds one command: two parcels commanding at the same moment must not read each
    other's acknowledgement (a record saying 'none' for a command the controller accepted)."""
    model = ControllerModel(ControllerParams())
    server, port = await serve_tcp(model)
    link = ControllerLink(LinkSettings(host="127.0.0.1", port=port))
    try:
        await link.connect()
        await link.heartbeat(1)  # clears the watchdog trip of a controller without an agent
        a, b = model.trigger(150), model.trigger(150)
        acks = await asyncio.gather(link.command(1, a.seq, 2, 0.5), link.command(2, b.seq, 1, 0.5))
        assert acks == [c.AckCode.ACCEPTED, c.AckCode.ACCEPTED]
        assert (a.cmd_lane, b.cmd_lane) == (2, 1)
    finally:
        link.close()
        await server.shutdown()  # type: ignore[no-untyped-call]
