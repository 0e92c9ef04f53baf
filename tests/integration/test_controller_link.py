"""ControllerLink against the simulated controller over Modbus TCP on loopback (no agent)."""

from __future__ import annotations

import asyncio

import pytest

from firmware_bridge import contract as c
from firmware_bridge.errors import LinkError
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


@pytest.mark.parametrize("fc23", [True, False], ids=["fc23", "no-fc23"])
async def test_heartbeat_with_poll_and_command_with_ack_with_and_without_function_23(fc23: bool) -> None:
    """Contract 1.2, section 2.1: one FC 23 transaction where the controller has it; where it
    answers exception 01 the link falls back to FC 16 + FC 3 and the results are the same."""
    model = ControllerModel(ControllerParams(fc23=fc23))
    server, port = await serve_tcp(model)
    link = ControllerLink(LinkSettings(host="127.0.0.1", port=port))
    try:
        await link.connect()
        assert link.fc23 is None  # not tried yet
        before = link.requests
        status = await link.heartbeat_poll(41)
        assert status.agent_heartbeat == 41 and model.regs[c.REG_AGENT_HEARTBEAT] == 41
        assert link.fc23 is fc23
        # FC 23: one transaction; without it: the refused FC 23 is no request, then a write and a read
        assert link.requests - before == (1 if fc23 else 2)
        assert not status.bits & c.StatusBit.WATCHDOG_TRIPPED  # the write came before the read
        parcel = model.trigger(150)
        before = link.requests
        ack = await link.command(1, parcel.seq, 2, 0.5)
        assert ack is c.AckCode.ACCEPTED and parcel.cmd_lane == 2
        # the simulator takes a command while it answers: with FC 23 its acknowledgement comes back
        # in the same transaction
        assert link.requests - before == (1 if fc23 else 2)
    finally:
        link.close()
        await server.shutdown()  # type: ignore[no-untyped-call]


async def test_a_function_23_write_outside_the_agent_areas_is_refused_whole() -> None:
    model = ControllerModel(ControllerParams())
    server, port = await serve_tcp(model)
    link = ControllerLink(LinkSettings(host="127.0.0.1", port=port))
    try:
        await link.connect()
        with pytest.raises(LinkError, match="exception"):
            await link.read_write(c.REG_AGENT_HEARTBEAT, [5, 0, 0, 0, 9], c.POLL_BASE, c.POLL_LEN)
        assert model.regs[c.REG_AGENT_HEARTBEAT] != 5  # nothing of the request was written
    finally:
        link.close()
        await server.shutdown()  # type: ignore[no-untyped-call]
