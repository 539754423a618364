"""AWS's event-stream framing (application/vnd.amazon.eventstream), the one botocore's EventStreamBuffer reads:
what InvokeEndpointWithResponseStream answers with, one message per part of the model's answer.

A message is its prelude (total length, headers length, the prelude's CRC32), its headers (name, type 7 for a
string, value), its payload, and the CRC32 of all that came before. botocore has the decoder only, and the framing
is this small: it is written here, and the tests read it back with botocore's decoder.
"""

from __future__ import annotations

import json
import struct
import zlib

_STRING = 7  # the header value type of a UTF-8 string


def _headers(headers: dict[str, str]) -> bytes:
    encoded = []
    for name, value in headers.items():
        name_bytes, value_bytes = name.encode(), value.encode()
        encoded.append(struct.pack("!B", len(name_bytes)) + name_bytes)
        encoded.append(struct.pack("!BH", _STRING, len(value_bytes)) + value_bytes)
    return b"".join(encoded)


def message(headers: dict[str, str], payload: bytes) -> bytes:
    """One framed message."""
    head = _headers(headers)
    prelude = struct.pack("!II", 12 + len(head) + len(payload) + 4, len(head))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    framed = prelude + head + payload
    return framed + struct.pack("!I", zlib.crc32(framed))


def event(event_type: str, payload: bytes, content_type: str = "application/octet-stream") -> bytes:
    """An event of the stream, e.g. a PayloadPart carrying ``payload`` as its Bytes."""
    return message({":event-type": event_type, ":content-type": content_type, ":message-type": "event"}, payload)


def exception(exception_type: str, fields: dict[str, str]) -> bytes:
    """An error inside the stream, e.g. ModelStreamError with its Message and ErrorCode."""
    headers = {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"}
    return message(headers, json.dumps(fields).encode())
