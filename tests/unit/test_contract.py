"""The register map in code matches docs/controller-contract.md, and the codec round-trips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from firmware_bridge import contract as c

DOC = Path(__file__).resolve().parents[2] / "docs" / "controller-contract.md"


def _doc_rows() -> dict[str, int]:
    """name -> first address, from every '| addr | NAME | ...' row of the document."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| (\d+)(?:–\d+)? \| ([A-Z_0-9]+) \|", line)
        if m:
            rows[m.group(2)] = int(m.group(1))
    return rows


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("MAGIC", c.REG_MAGIC), ("CONTRACT_MAJOR", c.REG_CONTRACT_MAJOR),
        ("CONTRACT_MINOR", c.REG_CONTRACT_MINOR), ("COUNTS_PER_METRE", c.REG_COUNTS_PER_METRE),
        ("GATE_COUNT", c.REG_GATE_COUNT), ("LANE_COUNT", c.REG_LANE_COUNT),
        ("WATCHDOG_MS", c.REG_WATCHDOG_MS), ("TRIGGER_RING_LEN", c.REG_TRIGGER_RING_LEN),
        ("RESULT_RING_LEN", c.REG_RESULT_RING_LEN), ("DECISION_DISTANCE", c.REG_DECISION_DISTANCE),
        ("DEFAULT_LANE", c.REG_DEFAULT_LANE), ("CTRL_HEARTBEAT", c.REG_CTRL_HEARTBEAT),
        ("STATUS_BITS", c.REG_STATUS_BITS), ("ENCODER", c.REG_ENCODER),
        ("TRIGGER_HEAD", c.REG_TRIGGER_HEAD), ("RESULT_HEAD", c.REG_RESULT_HEAD),
        ("ACK_COUNTER", c.REG_ACK_COUNTER), ("ACK_SEQ", c.REG_ACK_SEQ), ("ACK_CODE", c.REG_ACK_CODE),
        ("LANE_FULL_BITS", c.REG_LANE_FULL_BITS), ("WATCHDOG_TRIPS", c.REG_WATCHDOG_TRIPS),
        ("DEFAULTED_COUNT", c.REG_DEFAULTED_COUNT), ("CTRL_BOOT", c.REG_CTRL_BOOT),
        ("AGENT_HEARTBEAT", c.REG_AGENT_HEARTBEAT),
        ("MODE_REQUEST", c.REG_MODE_REQUEST), ("MAINT_FIRE_GATE", c.REG_MAINT_FIRE_GATE),
        ("CMD_COUNTER", c.REG_CMD_COUNTER), ("CMD_SEQ", c.REG_CMD_SEQ), ("CMD_LANE", c.REG_CMD_LANE),
        ("NEWEST_SEQ", c.NEWEST_TRIGGER_BASE),
    ],
)
def test_documented_address(name: str, address: int) -> None:
    assert _doc_rows()[name] == address


def test_documented_enums_match() -> None:
    text = DOC.read_text()
    for enum in (c.AckCode, c.Disposition):
        for member in enum:
            assert re.search(rf"^\| {member.value} \| {member.name} \|", text, re.M), member
    for bit in c.StatusBit:
        assert re.search(rf"^\| {bit.value.bit_length() - 1} \| {bit.name} \|", text, re.M), bit


def test_documented_version_is_the_codes() -> None:
    assert f"version {c.CONTRACT_MAJOR}.{c.CONTRACT_MINOR}" in DOC.read_text().splitlines()[0]


@pytest.mark.parametrize(
    ("old", "new", "back"),
    [
        (0, 0, False), (0, 5, False), (5, 5, False), (5, 6, False), (5, 0, True), (5000, 3, True),
        (65535, 1, False), (65530, 4, False),  # a wrap is a step forward
        (100, 99, True), (3, 40000, True),  # a "step forward" of more than half the space is one back
    ],
)
def test_a_head_that_goes_back_means_a_restart(old: int, new: int, back: bool) -> None:
    assert c.seq_went_back(old, new) is back


def test_ring_and_area_sizes() -> None:
    assert c.TriggerEntry.slot(0) == c.TRIGGER_RING_BASE == 100
    assert c.TriggerEntry.slot(17) == 104
    assert c.ResultEntry.slot(64) == c.RESULT_RING_BASE == 200
    assert c.ResultEntry.slot(65) == 208
    assert c.LAST_ADDRESS == 711
    assert c.POLL_BASE == 16 and c.POLL_LEN == 27  # 16..42 in one read


def test_u32_high_word_first_and_wrap() -> None:
    assert c.split_u32(0x12345678) == [0x1234, 0x5678]
    assert c.u32([0x1234, 0x5678], 0) == 0x12345678
    assert c.encoder_delta(0xFFFFFFF0, 0x10) == 0x20
    assert c.encoder_delta(0x10, 0xFFFFFFF0) == -0x20


def test_sequence_wraps_past_zero() -> None:
    assert c.next_seq(65535) == 1
    assert c.next_seq(0) == 1
    assert c.seq_distance(65534, 2) == 3
    assert c.ring_entries_between(65534, 2, 16) == [65535, 1, 2]
    assert c.ring_entries_between(0, 3, 16) == [1, 2, 3]
    assert len(c.ring_entries_between(1, 100, 16)) == 16  # older ones are overwritten


def test_slot_ranges_split_at_wrap_and_read_size() -> None:
    # trigger ring: seqs 14..18 occupy slots 14, 15, then 0, 1, 2
    assert c.slot_ranges([14, 15, 16, 17, 18], 100, 4, 16) == [(156, 8), (100, 12)]
    # result ring: 20 consecutive entries of 8 registers need two reads of at most 120
    ranges = c.slot_ranges(list(range(1, 21)), 200, 8, 64)
    assert ranges == [(208, 120), (328, 40)]
    assert all(n <= c.MAX_READ for _, n in ranges)


def test_result_entry_roundtrip() -> None:
    e = c.ResultEntry(7, 1042, 0x00ABCDEF, 2, 2, int(c.Disposition.SORTED))
    assert c.ResultEntry.decode(e.encode()) == e
    assert len(e.encode()) == c.RESULT_ENTRY_LEN


def test_identity_roundtrip_and_mismatch() -> None:
    ident = c.Identity(c.MAGIC, 1, 0, (2, 3, 4), 1000, 1, 2, 500, 16, 64, 1500, 1)
    assert c.Identity.decode(ident.encode()) == ident
    assert ident.problems() == []
    from dataclasses import replace

    assert "contract version 2.0 is not supported" in replace(ident, contract_major=2).problems()[0]
    assert "not a sortgate controller" in replace(ident, magic=0x1234).problems()[0]


def test_the_newest_trigger_copy_in_the_status_block_is_decoded_and_absent_as_zero() -> None:
    regs = [0] * c.POLL_LEN
    assert c.Status.decode(regs).newest_trigger is None  # a 1.0/1.1 controller: 36..39 read 0
    entry = c.TriggerEntry(513, 0xFFFF_FFF0, 240)
    at = c.NEWEST_TRIGGER_BASE - c.POLL_BASE
    regs[at : at + c.TRIGGER_ENTRY_LEN] = entry.encode()
    assert c.Status.decode(regs).newest_trigger == entry
    assert c.AGENT_BASE + c.AGENT_LEN == c.NEWEST_TRIGGER_BASE  # between the agent area and the mailbox
    assert c.NEWEST_TRIGGER_BASE + c.TRIGGER_ENTRY_LEN == c.MAILBOX_BASE
