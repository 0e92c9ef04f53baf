"""Wire side of sortgate: the controller contract over Modbus, and barcode reader framing.

Three layers, kept apart (after Klipper's msgproto/serialhdl split):

* ``contract``      — the register map and codec. Pure; no I/O. The PLC programmer's spec is
                      ``docs/controller-contract.md``; this module is the same map in code.
* ``modbus_link``   — the agent's transport to the controller (TCP or RTU): one I/O thread per
                      connection owns the wire (``wire``: pymodbus frames on a socket or a serial
                      port) and runs the status poll (``poller``), waking the event loop only for
                      the polls it has a use for.
* ``reader_codec``  — barcode reader frame decoding. Pure; no I/O.
* ``serial_port``   — the serial transport for readers (pyserial on the event loop).
"""
