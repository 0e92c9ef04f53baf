"""The simulated controller's rules (the reference for PLC programmers), driven by a fake clock."""

from __future__ import annotations

from firmware_bridge import contract as c
from hw_sim.controller import ControllerModel, ControllerParams


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def model(**kw: object) -> tuple[ControllerModel, Clock]:
    clock = Clock()
    m = ControllerModel(ControllerParams(**kw), clock=clock)  # type: ignore[arg-type]
    return m, clock


def heartbeat(m: ControllerModel, value: int) -> None:
    assert m.on_write(c.REG_AGENT_HEARTBEAT, [value]) is None


def command(m: ControllerModel, counter: int, seq: int, lane: int) -> c.AckCode:
    assert m.on_write(c.MAILBOX_BASE, [counter, seq, lane]) is None
    assert m.regs[c.REG_ACK_COUNTER] == counter and m.regs[c.REG_ACK_SEQ] == seq
    return c.AckCode(m.regs[c.REG_ACK_CODE])


def test_powers_up_tripped_until_first_heartbeat() -> None:
    m, clock = model()
    m.tick()
    assert m.status & c.StatusBit.WATCHDOG_TRIPPED
    heartbeat(m, 1)
    assert not m.status & c.StatusBit.WATCHDOG_TRIPPED


def test_accepted_release_command_is_obeyed() -> None:
    m, clock = model()
    heartbeat(m, 1)
    t = m.trigger(150)
    assert command(m, 1, t.seq, 2) is c.AckCode.ACCEPTED
    clock.t += m.decision_delay_s()
    assert m.decision_point(t).lane_reached == 2
    clock.t += 0.2
    entry = m.lane_exit(t)
    assert (entry.lane_commanded, entry.lane_reached, entry.disposition) == (2, 2, c.Disposition.SORTED)
    assert m.regs[c.REG_RESULT_HEAD] == entry.rseq


def test_no_command_defaults_to_inspection() -> None:
    m, clock = model()
    heartbeat(m, 1)
    t = m.trigger(150)
    clock.t += m.decision_delay_s()
    assert m.decision_point(t).lane_reached == 1
    assert m.lane_exit(t).disposition == c.Disposition.DEFAULTED_NO_COMMAND


def test_late_command_is_refused_by_encoder_position() -> None:
    m, clock = model()
    heartbeat(m, 1)
    t = m.trigger(150)
    clock.t += m.decision_delay_s() + 0.001  # past the decision point, not yet processed
    heartbeat(m, 2)
    assert command(m, 1, t.seq, 2) is c.AckCode.LATE
    assert m.decision_point(t).lane_reached == 1


def test_watchdog_trips_and_parcels_triggered_while_tripped_stay_default() -> None:
    m, clock = model(watchdog_ms=500)
    heartbeat(m, 1)
    clock.t += 0.6
    m.tick()
    assert m.status & c.StatusBit.WATCHDOG_TRIPPED
    assert m.regs[c.REG_WATCHDOG_TRIPS] == 1
    t = m.trigger(150)
    heartbeat(m, 2)  # agent is back
    assert command(m, 1, t.seq, 2) is c.AckCode.WATCHDOG
    clock.t += m.decision_delay_s()
    assert m.decision_point(t).lane_reached == 1
    assert m.lane_exit(t).disposition == c.Disposition.DEFAULTED_WATCHDOG


def test_accepted_command_is_overridden_by_trip_before_decision_point() -> None:
    m, clock = model(watchdog_ms=500)
    heartbeat(m, 1)
    t = m.trigger(150)
    assert command(m, 1, t.seq, 2) is c.AckCode.ACCEPTED
    clock.t += 0.6  # agent dies before the parcel reaches the gates
    assert m.decision_point(t).lane_reached == 1


def test_faults_default_and_writes_outside_agent_areas_are_refused() -> None:
    m, clock = model()
    heartbeat(m, 1)
    m.set_fault_bits(c.StatusBit.ESTOP, True)
    t = m.trigger(150)
    assert command(m, 1, t.seq, 2) is c.AckCode.ACCEPTED
    clock.t += m.decision_delay_s()
    m.decision_point(t)
    assert m.lane_exit(t).disposition == c.Disposition.DEFAULTED_FAULT
    assert m.on_write(c.REG_STATUS_BITS, [0]) is not None
    assert m.on_write(c.TRIGGER_RING_BASE, [1, 2]) is not None
    assert m.on_write(c.REG_CMD_LANE, [1, 2]) is not None  # spills past the mailbox


def test_bad_lane_unknown_seq_and_maintenance() -> None:
    m, clock = model()
    heartbeat(m, 1)
    t = m.trigger(150)
    assert command(m, 1, t.seq, 9) is c.AckCode.BAD_LANE
    assert command(m, 2, 999, 2) is c.AckCode.UNKNOWN_SEQ
    m.on_write(c.REG_MODE_REQUEST, [1])
    assert m.status & c.StatusBit.MAINTENANCE
    assert command(m, 3, t.seq, 2) is c.AckCode.MAINTENANCE
    m.on_write(c.REG_MAINT_FIRE_GATE, [1])
    assert m.gate_fires and m.gate_fires[-1][1] == 1
    assert m.regs[c.REG_MAINT_FIRE_GATE] == 0


def test_stuck_gate_shows_as_missorted() -> None:
    m, clock = model()
    heartbeat(m, 1)
    m.faults.add("gate_stuck")
    t = m.trigger(150)
    command(m, 1, t.seq, 2)
    clock.t += m.decision_delay_s()
    m.decision_point(t)
    entry = m.lane_exit(t)
    assert (entry.lane_commanded, entry.lane_reached, entry.disposition) == (2, 1, c.Disposition.MISSORTED)


def test_power_up_state_after_a_restart_is_the_documented_one() -> None:
    m, clock = model()
    heartbeat(m, 1)
    t = m.trigger(150)
    command(m, 1, t.seq, 2)
    boot = m.regs[c.REG_CTRL_BOOT]
    assert boot != 0
    forgotten = m.power_up()
    assert forgotten == [t]
    r = m.regs
    assert r[c.REG_CTRL_BOOT] not in (0, boot)
    assert (r[c.REG_TRIGGER_HEAD], r[c.REG_RESULT_HEAD], r[c.REG_ACK_COUNTER], r[c.REG_ACK_SEQ],
            r[c.REG_ACK_CODE], r[c.REG_CMD_COUNTER], r[c.REG_AGENT_HEARTBEAT]) == (0, 0, 0, 0, 0, 0, 0)
    assert m.status & c.StatusBit.WATCHDOG_TRIPPED
    # the forgotten parcel gets no gate and no result; new sequences start from 1
    clock.t += m.decision_delay_s()
    assert m.decision_point(t).lane_reached == 1
    assert m.lane_exit(t) is None
    heartbeat(m, 1)
    assert m.trigger(150).seq == 1  # type: ignore[union-attr]


def test_a_halted_program_freezes_its_heartbeat_and_tracks_nothing() -> None:
    m, clock = model()
    heartbeat(m, 1)
    m.halt(True)
    hb = m.regs[c.REG_CTRL_HEARTBEAT]
    clock.t += 2.0
    m.tick()
    assert m.regs[c.REG_CTRL_HEARTBEAT] == hb
    assert m.trigger(150) is None
    m.halt(False)
    clock.t += 0.2
    m.tick()
    assert m.regs[c.REG_CTRL_HEARTBEAT] != hb


def test_writes_are_refused_whole_and_mode_values_checked() -> None:
    from pymodbus.constants import ExcCodes

    m, _ = model()
    assert m.on_write(c.REG_MAINT_FIRE_GATE, [1, 0, 0]) is ExcCodes.ILLEGAL_ADDRESS  # 34..36: 36 is no area
    assert m.regs[c.REG_MAINT_FIRE_GATE] == 0
    assert m.on_write(c.REG_MODE_REQUEST, [2]) is ExcCodes.ILLEGAL_VALUE
    assert m.regs[c.REG_MODE_REQUEST] == 0


def test_a_full_lane_defaults_only_its_own_parcels_from_contract_1_3() -> None:
    lanes = {2: 1, 3: 2, 4: 3}
    m, clock = model(gate_for_lane=lanes, lane_count=4, lane_capacity={3: (2, 0.2)})
    heartbeat(m, 1)
    # lane 3 fills (three parcels, less what drained meanwhile): its bit comes on, once
    for counter in (1, 2, 3):
        t = m.trigger(150)
        assert command(m, counter, t.seq, 3) is c.AckCode.ACCEPTED
        clock.t += m.decision_delay_s()
        heartbeat(m, 10 + counter)
        m.decision_point(t)
        m.lane_exit(t)
    m.tick()
    assert m.regs[c.REG_LANE_FULL_BITS] == 1 << 2 and m.status & c.StatusBit.LANE_FULL
    assert m.lane_full_events == 1
    # a parcel for lane 3 (commanded before it filled, say) defaults; one for lane 2 is sorted
    a, b = m.trigger(150), m.trigger(150)
    command(m, 4, a.seq, 3)
    command(m, 5, b.seq, 2)
    clock.t += m.decision_delay_s()
    heartbeat(m, 20)
    assert m.decision_point(a).lane_reached == 1 and a.disposition == c.Disposition.DEFAULTED_FAULT
    assert m.decision_point(b).lane_reached == 2 and b.disposition == c.Disposition.SORTED
    # it drains to 80 % of capacity and has room again
    clock.t += 7.0
    heartbeat(m, 21)
    m.tick()
    assert m.regs[c.REG_LANE_FULL_BITS] == 0 and not m.status & c.StatusBit.LANE_FULL


def test_a_1_2_controller_defaults_every_parcel_while_any_lane_is_full() -> None:
    m, clock = model(gate_for_lane={2: 1, 3: 2}, lane_count=3, lane_capacity={3: (1, 0.0)}, contract_minor=2)
    heartbeat(m, 1)
    t = m.trigger(150)
    command(m, 1, t.seq, 3)
    clock.t += m.decision_delay_s()
    heartbeat(m, 2)
    m.decision_point(t)
    m.lane_exit(t)
    u = m.trigger(150)
    command(m, 2, u.seq, 2)
    clock.t += m.decision_delay_s()
    heartbeat(m, 3)
    assert m.decision_point(u).lane_reached == 1 and u.disposition == c.Disposition.DEFAULTED_FAULT
    assert m.regs[c.REG_CONTRACT_MINOR] == 2


def test_the_loop_gives_recirculated_and_the_return_carries_its_previous_seq() -> None:
    m, clock = model(gate_for_lane={2: 1, 3: 2}, lane_count=3, recirculation_lane=3)
    heartbeat(m, 1)
    t = m.trigger(150)
    command(m, 1, t.seq, 3)
    clock.t += m.decision_delay_s()
    m.decision_point(t)
    entry = m.lane_exit(t)
    assert entry is not None and (entry.lane_reached, entry.disposition) == (3, c.Disposition.RECIRCULATED)
    back = m.trigger(150, prev_seq=t.seq)
    assert back is not None and back.seq != t.seq
    assert m.regs[c.PREV_SEQ_BASE + back.seq % c.TRIGGER_RING_LEN] == t.seq
    assert m.regs[c.REG_NEWEST_PREV_SEQ] == t.seq
    status = c.Status.decode(m.regs[c.POLL_BASE : c.POLL_BASE + c.POLL_LEN])
    assert status.newest_trigger is not None and status.newest_trigger.prev_seq == t.seq
