"""Stream analyzers (``relay.analysis.streams``) for the netns tests
(``test_relay_streams.py``).

``tunrelay run`` loads them by ``stream_analyzers:...`` with this directory on
its PYTHONPATH (the tests arrange that).
"""

from __future__ import annotations

import json
import os

import h11
import trio

from relay.analysis.hooks import FlowInfo

HTTP_LOG_ENV = "TUNRELAY_HTTP_STREAM_LOG"  # where H11Parser writes its JSON lines
IDLE_PORT = 9101  # Idle never reads the flows to this server port
INLINE_PORT = 9102  # SlowInline reads the flows to this server port slowly
INLINE_DELAY = 0.05  # seconds SlowInline sleeps before each read


async def _event(conn: h11.Connection, side: trio.abc.ReceiveStream) -> object:
    """h11's next event, reading the stream for as long as it needs data."""
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await side.receive_some())  # b"" at the end: ConnectionClosed
    return event


async def _body(conn: h11.Connection, side: trio.abc.ReceiveStream) -> bytes:
    body = bytearray()
    while not isinstance(event := await _event(conn, side), h11.EndOfMessage):
        if not isinstance(event, h11.Data):
            raise ValueError(f"expected a message body, got {event!r}")
        body += event.data
    return bytes(body)


def _mirror(conn: h11.Connection, head: h11.Request | h11.Response, body: bytes) -> None:
    """Send a parsed message on the other parser, which h11 needs to expect its answer."""
    conn.send(head)
    if body:
        conn.send(h11.Data(data=body))
    conn.send(h11.EndOfMessage())


class H11Parser:
    """Parses HTTP/1.1 both ways with h11, one exchange after another, and writes
    a JSON line per exchange to ``$TUNRELAY_HTTP_STREAM_LOG``."""

    def __init__(self) -> None:
        self.path = os.environ[HTTP_LOG_ENV]

    async def stream(
        self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
    ) -> None:
        requests = h11.Connection(h11.SERVER)  # parses what the client sends
        responses = h11.Connection(h11.CLIENT)  # parses what the server sends
        while isinstance(req := await _event(requests, c2s), h11.Request):
            req_body = await _body(requests, c2s)
            _mirror(responses, req, req_body)
            while isinstance(resp := await _event(responses, s2c), h11.InformationalResponse):
                pass
            if not isinstance(resp, h11.Response):
                return
            resp_body = await _body(responses, s2c)
            self._write(flow, req, req_body, resp, resp_body)
            _mirror(requests, resp, resp_body)
            try:
                requests.start_next_cycle()
                responses.start_next_cycle()
            except h11.LocalProtocolError:  # Connection: close
                return

    def _write(
        self, flow: FlowInfo, req: h11.Request, req_body: bytes, resp: h11.Response, body: bytes
    ) -> None:
        row = {
            "uid": flow.uid,
            "client_port": flow.client_port,
            "method": req.method.decode(),
            "target": req.target.decode(),
            "request_body": req_body.decode(errors="replace"),
            "status": resp.status_code,
            "response_body": body.decode(errors="replace"),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class Idle:
    """Never reads the flows to ``IDLE_PORT`` (and leaves the others at once)."""

    async def stream(
        self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
    ) -> None:
        if flow.server_port == IDLE_PORT:
            await trio.sleep_forever()


class SlowInline:
    """Inline: reads the flows to ``INLINE_PORT`` slowly, so they wait for it; leaves
    the others at once."""

    inline = True

    async def stream(
        self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
    ) -> None:
        if flow.server_port != INLINE_PORT:
            return
        while True:
            await trio.sleep(INLINE_DELAY)
            if not await s2c.receive_some():
                return
