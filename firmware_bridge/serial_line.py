"""One serial line's settings (RS-232 readers, the RS-485 controller in Modbus RTU)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SerialLine"]


@dataclass(frozen=True, slots=True)
class SerialLine:
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"  # "N" | "E" | "O"
    stopbits: int = 1

    def describe(self) -> str:
        """As technicians write it, e.g. 19200 8E1."""
        return f"{self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"
