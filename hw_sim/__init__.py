"""The simulated line: the far side of every wire sortgate talks to.

``hw_sim`` is a real backend, chosen like any other (after python-can's virtual bus): the agent
talks to it over Modbus TCP/RTU, serial ptys and a real MQTT broker, exactly as on the floor. It
knows the ground truth — what each parcel carries, where it had to go, where it ended up — and the
harness (``hw_sim.harness``) turns that into the benchmark figures.

Modules:
  plan        parcel mix and timing (pure, seeded)
  waybills    generators of valid and deliberately broken codes
  controller  the controller side of the Modbus contract, as a pymodbus server
  readers     barcode readers on ptys
  central     the central customs system over MQTT (verdict pushes, record collection)
  broker      start a mosquitto on loopback
  harness     runs simulator, broker and the agent process together
  chaos       faults on the far side of every wire (controller, readers, broker, disk), per-fault report
"""
