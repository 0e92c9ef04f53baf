"""MqttLink in-process against a real mosquitto: connected only after CONNACK, back after a broker
restart, and publishing never raises."""

from __future__ import annotations

import asyncio

import pytest

from agent.central.mqtt import MqttLink
from hw_sim.broker import Mosquitto

pytestmark = pytest.mark.integration


async def test_the_link_reconnects_after_a_broker_restart() -> None:
    with Mosquitto() as broker:
        got: list[str] = []
        link = MqttLink("127.0.0.1", broker.port, "link-test", "sortgate/T/L9", keepalive_s=5, reconnect_max_s=1.0,
                        on_message=lambda topic, payload, meta: got.append(topic), on_ack=lambda mid: None,
                        birth=lambda: {"schema": "sortgate.status/1", "state": "online"})
        link.start()
        try:
            async with asyncio.timeout(10):
                await link.connected.wait()
            await asyncio.to_thread(broker.stop)
            async with asyncio.timeout(10):
                while link.connected.is_set():  # noqa: ASYNC110 - the link reports the loss on its own thread
                    await asyncio.sleep(0.05)
            link.publish("sortgate/T/L9/stats", b"{}", qos=0)  # while the broker is down: never raises
            assert link.publish("sortgate/T/L9/#", b"{}") is None  # a wildcard topic: refused, not raised
            await asyncio.to_thread(broker.start)
            async with asyncio.timeout(15):
                await link.connected.wait()
            assert link.thread_alive
        finally:
            link.stop()
