"""Exceptions raised by the stack.

A peer's bad packet never raises out of the TCP state machine; the wire layer
raises ``ParseError`` subtypes and the ``Stack`` catches them, counts them and
drops the packet.
"""

from __future__ import annotations


class StackError(Exception):
    """Base class of every error the stack raises."""


class ParseError(StackError, ValueError):
    """A packet could not be parsed."""


class TruncatedError(ParseError):
    """The packet is shorter than its headers or its length fields claim."""


class BadLengthError(ParseError):
    """A length field is inconsistent (total length, payload length, data offset)."""


class BadHeaderError(ParseError):
    """A header field has a value the wire format does not allow (version, IHL, option)."""


class ChecksumError(ParseError):
    """The Internet checksum does not verify."""


class LocalProtocolError(StackError):
    """The caller misused the API, for example ``send()`` after ``close()``."""
