"""HTTP/1.x dissector on llhttp (``httptools``): every request and response
of a connection, keep-alive and pipelined.

Records, in stream order:

* ``HttpRequest`` as soon as a request's header block is complete (an inline
  analyzer can act on it before the body or the response);
* ``HttpResponse`` when a final response's header block is complete;
* ``HttpTransaction`` when the response ends (or the connection does),
  pairing the two with both body lengths. Responses match requests in order
  (RFC 9112 §9.3.2); 1xx interim responses are folded into the transaction.

Bodies are framed by llhttp (Content-Length, chunked, or the end of the
connection: ``end(SERVER_TO_CLIENT)`` or ``close`` finishes such a body).
A response to HEAD has no body (RFC 9110 §9.3.2) but llhttp cannot be told,
so while a HEAD response is due the response stream is fed in pieces that
end at header block ends, and the parser is replaced after that response's
header block. A 2xx answer to
CONNECT or a 101 Switching Protocols ends HTTP on the connection: the
dissector becomes ``done``. A header block over ``max_header_bytes`` or more
than ``max_pending`` unanswered requests fail it.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Final

import httptools

from .base import Direction, Malformed, StreamDissector

__all__ = ["HttpDissector", "HttpRecord", "HttpRequest", "HttpResponse", "HttpTransaction"]

MAX_HEADER_BYTES: Final = 64 * 1024
MAX_PENDING: Final = 64
MAX_HELD: Final = 64 * 1024

Headers = tuple[tuple[str, str], ...]


def _header(headers: Headers, name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A request's start line and headers (text decoded as ISO-8859-1).

    Attributes:
        ts: when the header block was complete.
        trans_depth: 1 for the connection's first request, 2 for the next...
        method, uri: from the request line (``uri`` as sent: origin-form,
            absolute-form for proxies, authority-form for CONNECT).
        version: "1.0" or "1.1".
        host, user_agent: those headers, if present.
        headers: every header field in order, names as sent.
    """

    ts: float
    trans_depth: int
    method: str
    uri: str
    version: str
    host: str | None
    user_agent: str | None
    headers: Headers


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A final (non-1xx, or 101) response's status line and headers.

    Attributes:
        ts: when the header block was complete.
        trans_depth: the request's, or the next number if no request was seen.
        version, status_code, status_msg: from the status line.
        headers: every header field in order.
    """

    ts: float
    trans_depth: int
    version: str
    status_code: int
    status_msg: str
    headers: Headers


@dataclass(frozen=True, slots=True)
class HttpTransaction:
    """One request and its response, emitted when the response ended.

    Attributes:
        ts: the request's ``ts`` (the response's without a request).
        trans_depth: as for ``HttpRequest``.
        request: ``None`` for a response with no request seen.
        response: ``None`` when the connection ended before a response.
        request_body_len, response_body_len: body bytes after transfer decoding.
        info_code, info_msg: the last 1xx interim response (e.g. 100 Continue).
    """

    ts: float
    trans_depth: int
    request: HttpRequest | None
    response: HttpResponse | None
    request_body_len: int
    response_body_len: int
    info_code: int | None = None
    info_msg: str | None = None


HttpRecord = HttpRequest | HttpResponse | HttpTransaction


class _Pending:
    __slots__ = ("info_code", "info_msg", "request", "request_body_len")

    def __init__(self, request: HttpRequest) -> None:
        self.request = request
        self.request_body_len = 0
        self.info_code: int | None = None
        self.info_msg: str | None = None


def _text(b: bytes) -> str:
    return b.decode("latin-1")


class _Message:
    """Callbacks common to both parsers: header collection with a size bound."""

    def __init__(self, owner: HttpDissector) -> None:
        self.owner = owner
        self.headers: list[tuple[str, str]] = []
        self.size = 0  # header block bytes seen (an upper bound)
        self.in_headers = False
        self.body_len = 0

    def on_message_begin(self) -> None:
        self.headers = []
        self.size = 0
        self.in_headers = True
        self.body_len = 0

    def _count(self, n: int) -> None:
        self.size += n
        if self.size > self.owner.max_header_bytes:
            raise Malformed("HTTP header block too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        self.headers.append((_text(name), _text(value)))

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)


class _RequestSide(_Message):
    def __init__(self, owner: HttpDissector) -> None:
        super().__init__(owner)
        self.parser = httptools.HttpRequestParser(self)
        # Bytes after a message that closes the connection are dropped, not an error.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.url = b""
        self.current: _Pending | None = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self.url += url

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self.current = self.owner._request(self)

    def on_body(self, body: bytes) -> None:
        if self.current is not None:
            self.current.request_body_len += len(body)

    def on_message_complete(self) -> None:
        self.current = None
        if not self.parser.should_keep_alive():
            self.owner._requests_over = True


class _ResponseSide(_Message):
    def __init__(self, owner: HttpDissector) -> None:
        super().__init__(owner)
        self.parser = httptools.HttpResponseParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.status = b""
        self.interim = False  # the message is a 1xx interim response
        self.started = False  # a final response's headers are complete

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.status = b""
        self.interim = False
        self.started = False

    def on_status(self, status: bytes) -> None:
        self._count(len(status))
        self.status += status

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self.owner._response_headers(self)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.started = False
        self.owner._response_done(self)
        if not self.parser.should_keep_alive():
            self.owner._responses_over = True


class HttpDissector(StreamDissector[HttpRecord]):
    """HTTP/1.x over TCP: ``HttpRequest``, ``HttpResponse``, ``HttpTransaction``."""

    __slots__ = (
        "_held",
        "_now",
        "_out",
        "_pending",
        "_req",
        "_requests_over",
        "_resp",
        "_response",
        "_responses_over",
        "_switch",
        "_tail",
        "_trans_depth",
        "max_header_bytes",
        "max_pending",
    )

    proto = "http"

    def __init__(
        self, *, max_header_bytes: int = MAX_HEADER_BYTES, max_pending: int = MAX_PENDING
    ) -> None:
        super().__init__()
        self.max_header_bytes = max_header_bytes
        self.max_pending = max_pending
        self._req = _RequestSide(self)
        self._resp = _ResponseSide(self)
        self._pending: deque[_Pending] = deque()
        self._response: HttpResponse | None = None  # the one whose body is being read
        self._trans_depth = 0
        self._now = 0.0
        self._out: list[HttpRecord] = []
        # A CONNECT or Upgrade request paused the request side until its
        # response says whether the protocol switches; client bytes meanwhile.
        self._switch: _Pending | None = None
        self._held = bytearray()
        self._requests_over = False  # the client said Connection: close
        self._responses_over = False
        self._tail = b""  # the last bytes fed to the response parser

    # Driving the parsers.

    def _feed(self, direction: Direction, data: bytes, now: float, out: list[HttpRecord]) -> None:
        self._now, self._out = now, out
        try:
            if direction is Direction.CLIENT_TO_SERVER:
                self._feed_requests(data)
            else:
                self._feed_responses(data)
        except httptools.HttpParserCallbackError as e:
            # Our own Malformed raised inside a callback arrives wrapped.
            if isinstance(e.__context__, Malformed):
                raise e.__context__ from None
            raise Malformed(f"HTTP: {e}") from None
        except httptools.HttpParserError as e:
            raise Malformed(f"HTTP: {e}") from None
        finally:
            self._out = []

    def _feed_requests(self, data: bytes) -> None:
        if self._requests_over:
            return
        if self._switch is not None:
            if len(self._held) + len(data) > MAX_HELD:
                # Too much to hold: stop reading requests, but still read the
                # answer (a CONNECT's 2xx ends HTTP here anyway).
                self._switch, self._held, self._requests_over = None, bytearray(), True
                return
            self._held += data
            return
        side = self._req
        was_in_headers = side.in_headers
        try:
            side.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # CONNECT or Upgrade: llhttp stops after the request (argument:
            # where the rest begins). Hold the rest until the answer.
            self._switch = side.current or (self._pending[-1] if self._pending else None)
            self._held = bytearray(data[e.args[0] :])
            return
        # llhttp keeps an unfinished header field in httptools; bound it. The
        # chunk where the message began is bounded by the caller's chunk size.
        if was_in_headers and side.in_headers:
            side._count(len(data))

    def _careful(self) -> bool:
        # A HEAD response is due: its end must be found before llhttp reads a body.
        started = self._resp.started
        return any(
            p.request.method == "HEAD" for i, p in enumerate(self._pending) if i or not started
        )

    def _block_end(self, data: bytes, pos: int) -> int:
        """Just after the next CRLFCRLF at or after ``pos`` (counting the bytes
        fed before), else the end of ``data``. llhttp accepts only CRLF line
        ends, so every header block ends at such a point; feeding up to each of
        them lets a HEAD response's header block end exactly at a feed's end."""
        for k in range(1, 4):
            if (self._tail + data[pos : pos + k]).endswith(b"\r\n\r\n"):
                return pos + k
        i = data.find(b"\r\n\r\n", pos)
        return len(data) if i < 0 else i + 4

    def _feed_responses(self, data: bytes) -> None:
        pos, size = 0, len(data)
        view = memoryview(data)
        while pos < size and not self._responses_over and not self.done:
            side = self._resp
            end = self._block_end(data, pos) if self._careful() else size
            was_in_headers = side.in_headers
            # A 101 raises HttpParserUpgrade: _response_headers already ended the dissector.
            with contextlib.suppress(httptools.HttpParserUpgrade):
                side.parser.feed_data(view[pos:end])
            if was_in_headers and side.in_headers:
                side._count(end - pos)
            self._tail = (self._tail + data[max(pos, end - 3) : end])[-3:]
            pos = end

    # Events.

    def _request(self, side: _RequestSide) -> _Pending:
        if len(self._pending) >= self.max_pending:
            raise Malformed("too many unanswered HTTP requests")
        self._trans_depth += 1
        headers = tuple(side.headers)
        req = HttpRequest(
            self._now, self._trans_depth, _text(side.parser.get_method()), _text(side.url),
            side.parser.get_http_version(), _header(headers, "host"),
            _header(headers, "user-agent"), headers,
        )  # fmt: skip
        self._out.append(req)
        p = _Pending(req)
        self._pending.append(p)
        return p

    def _response_headers(self, side: _ResponseSide) -> None:
        code = side.parser.get_status_code()
        pending = self._pending[0] if self._pending else None
        if 100 <= code < 200 and code != 101:
            side.interim = True
            if pending is not None:
                pending.info_code, pending.info_msg = code, _text(side.status)
            return
        depth = pending.request.trans_depth if pending else self._trans_depth + 1
        resp = HttpResponse(
            self._now, depth, side.parser.get_http_version(), code, _text(side.status),
            tuple(side.headers),
        )  # fmt: skip
        self._out.append(resp)
        self._response = resp
        side.started = True
        method = pending.request.method if pending else None
        if code == 101 or (method == "CONNECT" and 200 <= code < 300):
            # RFC 9110 §9.3.6, §15.2.2: the connection now carries another protocol.
            self._response_done(side)
            self.done = True
            return
        if pending is not None and pending is self._switch:
            # The switch was refused: HTTP goes on with the bytes held back.
            self._switch = None
            held, self._held = bytes(self._held), bytearray()
            self._req = _RequestSide(self)
            if held:
                self._feed_requests(held)
        if method == "HEAD":
            # No body whatever the headers say: finish here and give the
            # following bytes to a fresh parser (this one expects a body).
            self._response_done(side)
            self._resp = _ResponseSide(self)
            if not side.parser.should_keep_alive():
                self._responses_over = True

    def _response_done(self, side: _ResponseSide) -> None:
        pending = self._pending.popleft() if self._pending else None
        self._emit(pending, self._response, side.body_len)
        self._response = None
        side.started = False

    def _emit(self, p: _Pending | None, resp: HttpResponse | None, body_len: int) -> None:
        if p is None and resp is None:
            return
        if p is None:
            assert resp is not None
            self._out.append(HttpTransaction(resp.ts, resp.trans_depth, None, resp, 0, body_len))
            if resp.trans_depth > self._trans_depth:
                self._trans_depth = resp.trans_depth
            return
        r = p.request
        self._out.append(
            HttpTransaction(r.ts, r.trans_depth, r, resp, p.request_body_len, body_len,
                            p.info_code, p.info_msg)
        )  # fmt: skip

    # The end.

    def _end(self, direction: Direction, now: float, out: list[HttpRecord]) -> None:
        if direction is Direction.SERVER_TO_CLIENT:
            self._finish(now, out)

    def _close(self, now: float, out: list[HttpRecord]) -> None:
        self._finish(now, out)

    def _finish(self, now: float, out: list[HttpRecord]) -> None:
        # No more responses: a body read to the end of the connection is
        # complete (RFC 9112 §6.3 rule 8), and unanswered requests stay so.
        self._now, self._out = now, out
        try:
            if self._resp.started:
                self._response_done(self._resp)
            while self._pending:
                self._emit(self._pending.popleft(), None, 0)
        finally:
            self._out = []
        self.done = True
