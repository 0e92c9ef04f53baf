"""The one exception tree of the wire side."""

from __future__ import annotations


class BridgeError(Exception):
    """Base of all wire-side errors."""


class LinkError(BridgeError):
    """The controller link failed: not connected, timed out, or an exception response."""


class FunctionUnsupported(LinkError):
    """The controller answered exception 01 (illegal function): it does not implement the
    function code asked for. Nothing was done; the link is fine."""


class ContractMismatch(BridgeError):
    """The controller does not speak a contract this agent supports. Never retried."""


class SerialPortError(BridgeError):
    """A reader's serial port cannot be opened or read."""
