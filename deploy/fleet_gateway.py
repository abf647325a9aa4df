"""The merchant-facing door of the SuperLink: a TLS gateway that passes the Fleet API and
nothing else.

Why it exists: Flower 1.42's `flower-superlink` serves the Fleet API (SuperNodes), the Control
API (`flwr run`, `flwr supernode register`, ...) and the Runtime API (its ServerApp) on ONE
HTTPS port (`--host`/`--port`, flwr/superlink/cli/flower_superlink.py `_run_superlink_http_api`;
`--control-api-address` and `--fleet-api-address` are deprecated no-ops for the HTTP APIs). That
port does not ask for client certificates (uvicorn gets no `ssl_ca_certs`), and the Control API
authenticates nobody unless Flower's enterprise OIDC plugin is installed
(flwr/superlink/config_loader.py `load_control_authn_plugin`). Whoever reaches the port can
submit a FAB that every merchant executes. So deploy.superlink binds the SuperLink to 127.0.0.1
and, where merchants must reach it, starts this gateway on the operator's interface: it
terminates TLS with the SuperLink's own certificate and forwards a request to the loopback
SuperLink only if it is `POST /v1/fleet/<name>` (flwr/superlink/routers/fleet/router.py); every
other request (`/v1/control/...`, `/v1/runtime/...`, `/docs`, ...) is answered 403 here.

Every request re-framed, one at a time: the gateway parses each request head, checks the
target, and sends the SuperLink exactly that request with an unambiguous body length. Whatever
follows a request's body on the client's connection (its next request on a kept-alive
connection, or one pipelined or smuggled behind it) is parsed and checked as a request of its
own, so nothing reaches the SuperLink that the gateway did not frame itself; nor does a header
value with a control character in it (h11, one parser uvicorn may use, ends a line at a bare
LF). Responses are re-framed as well (the SuperLink's status and end-to-end headers, the
gateway's own body length), which lets both connections stay open across requests: a TLS
handshake and a TCP connection per request on each side cost a 1-merchant deployed round about
a third of its time (docs/BENCHMARKS.md, "Deployment"). Each client connection has its own
connection to the SuperLink, never shared with another client's, and reused only while it is
clean: a response the gateway could not frame, or one that came before the request's body was
through, closes both; bytes past a response close the SuperLink's.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

FLEET_TARGET = re.compile(rb"/v1/fleet/[a-z][a-z0-9-]{0,63}")  # a Fleet route, no query, no dots, no escapes
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
# a header value (RFC 9110 field-value): no CR, LF, NUL or other control, which a parser behind
# the gateway could read as the end of a line (h11 takes a bare LF for one)
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [\t -~\x80-\xff]*)?")
# not forwarded: the gateway sets the framing and the connection handling itself; and who the
# client is, which uvicorn believes from a loopback proxy (X-Forwarded-For from 127.0.0.1)
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"content-length", b"te",
               b"trailer", b"upgrade", b"expect", b"http2-settings",
               b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
               b"x-real-ip"}
MAX_HEAD = 64 * 1024
# a client that does not send a whole request head in time, its first or the next on a kept-alive
# connection, is dropped (slowloris; httpx lets its own idle connections go after 5 s)
HEAD_TIMEOUT = 30.0
IDLE_TIMEOUT = 300.0  # no byte in either stream for this long, or a body not through in this long: abandoned
WRITE_TIMEOUT = 30.0  # a peer that does not take what is written to it in this long (e.g. pipelines and never reads) is dropped
# a connection to the SuperLink idle for longer is not reused: uvicorn closes its own after 5 s,
# and a request sent on one it is closing would be lost
UPSTREAM_REUSE_SECONDS = 2.0
MAX_CONNECTIONS = 256  # client connections (each with its own to the SuperLink); idle ones make room for new ones


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class GatewayTls:
    server_cert: Path  # presented to SuperNodes: the SuperLink's certificate
    server_key: Path
    ca_cert: Path  # verifies the loopback SuperLink


@dataclass(frozen=True)
class Request:
    target: bytes
    headers: list[tuple[bytes, bytes]]
    content_length: int | None  # None: chunked
    expect_continue: bool
    close: bool = False  # the client's last on this connection: `Connection: close`, or HTTP/1.0
    http10: bool = False  # an HTTP/1.0 client: no chunked response, no interim one


@dataclass(frozen=True)
class Response:
    status_line: bytes
    headers: list[tuple[bytes, bytes]]
    content_length: int | None  # None: chunked, or (until_close) as long as the SuperLink sends
    until_close: bool  # no length and no chunks: the body ends when the SuperLink closes
    close: bool  # the SuperLink closes its connection after this response
    bodiless: bool = False  # 204 or 304: no body and no framing header


@dataclass(frozen=True)
class _Fields:
    """A message head's header lines, checked: those forwarded, and the ones the gateway acts on."""

    forwarded: list[tuple[bytes, bytes]]
    lengths: list[bytes]
    encodings: list[bytes]
    connection: set[bytes]
    expect_continue: bool


def _fields(lines: list[bytes], status: int) -> _Fields:
    forwarded: list[tuple[bytes, bytes]] = []
    lengths: list[bytes] = []
    encodings: list[bytes] = []
    connection: set[bytes] = set()
    expect_continue = False
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None or _VALUE.fullmatch(value) is None:  # also refuses obsolete line folding
            raise _Refused(status, "malformed header")
        key, value = name.lower(), value.strip(b" \t")
        if key == b"content-length":
            lengths.append(value)
        elif key == b"transfer-encoding":
            encodings.append(value.lower())
        elif key == b"connection":
            connection.update(token.strip(b" \t").lower() for token in value.split(b","))
        elif key == b"expect":
            expect_continue = value.lower() == b"100-continue"
        if key not in _HOP_BY_HOP:
            forwarded.append((name, value))
    forwarded = [(name, value) for name, value in forwarded if name.lower() not in connection]  # named hop-by-hop
    return _Fields(forwarded, lengths, encodings, connection, expect_continue)


def _body_length(fields: _Fields, status: int) -> int | None:
    """The one unambiguous body length of a message: bytes, or None for chunked; -1: neither."""
    if fields.encodings:
        if fields.lengths or fields.encodings != [b"chunked"]:  # both, or an encoding the gateway does not re-frame
            raise _Refused(status, "ambiguous or unsupported body framing")
        return None
    if len(set(fields.lengths)) > 1 or any(not v.isdigit() or len(v) > 12 for v in fields.lengths):
        raise _Refused(status, "bad Content-Length")
    return int(fields.lengths[0]) if fields.lengths else -1


def _lines(head: bytes) -> list[bytes]:
    return head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else []


def parse_head(head: bytes) -> Request:
    """The request head (up to and including the blank line), checked: only `POST` to a Fleet
    route, HTTP/1.x, well-formed headers, one unambiguous body length."""
    lines = _lines(head)
    parts = lines[0].split(b" ") if lines else []
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _Refused(400, "malformed request line")
    method, target, version = parts
    if method != b"POST" or FLEET_TARGET.fullmatch(target) is None:
        raise _Refused(403, f"{method[:16]!r} {target[:120]!r} is not a Fleet API call")
    fields = _fields(lines[1:], 400)
    length = _body_length(fields, 400)
    http10 = version == b"HTTP/1.0"
    close = http10 or b"close" in fields.connection
    return Request(target, fields.forwarded, 0 if length == -1 else length, fields.expect_continue and not http10, close, http10)


def parse_response_head(head: bytes) -> Response:
    """The SuperLink's response head, checked as strictly as a request's: a final status
    (the gateway never asks for an interim one), well-formed headers, one body length."""
    lines = _lines(head)
    match = _STATUS_LINE.fullmatch(lines[0]) if lines else None
    if match is None:
        raise _Refused(502, "malformed response from the SuperLink")
    status = int(match.group(2))
    if status < 200:
        raise _Refused(502, f"an interim response ({status}) from the SuperLink")
    fields = _fields(lines[1:], 502)
    length = _body_length(fields, 502)
    bodiless = status in (204, 304)
    if bodiless:
        length = 0  # no body, whatever the headers say (RFC 9112 6.3)
    until_close = length == -1
    close = until_close or match.group(1) == b"0" or b"close" in fields.connection
    return Response(lines[0], fields.forwarded, None if until_close else length, until_close, close, bodiless)


def upstream_head(request: Request) -> bytes:
    framing = b"Transfer-Encoding: chunked" if request.content_length is None else b"Content-Length: %d" % request.content_length
    lines = [b"POST " + request.target + b" HTTP/1.1", *(name + b": " + value for name, value in request.headers), framing]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def client_head(response: Response, close: bool, http10: bool = False) -> bytes:
    """The response head the client gets: the SuperLink's status and end-to-end headers, the
    gateway's framing (none for a 204 or 304; an HTTP/1.0 client gets a chunked body unframed,
    ended by the close), and `Connection: close` when this is the connection's last response."""
    lines = [response.status_line, *(name + b": " + value for name, value in response.headers)]
    unframed = response.until_close or (http10 and response.content_length is None)
    if not (unframed or response.bodiless):
        lines.append(b"Transfer-Encoding: chunked" if response.content_length is None else b"Content-Length: %d" % response.content_length)
    if close or unframed:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _response(status: int, reason: str) -> bytes:
    phrases = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway", 503: "Service Unavailable"}
    body = f"fedads fleet gateway: {reason}\n".encode()
    return (f"HTTP/1.1 {status} {phrases.get(status, 'Error')}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


async def _read(reader: asyncio.StreamReader, size: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(size), IDLE_TIMEOUT)


async def _drain(writer: asyncio.StreamWriter) -> None:
    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes the reader holds unread. StreamReader has no public accessor; `_buffer` is CPython's
    buffer since 3.4 (a connection with bytes past a response is not reused)."""
    return len(reader._buffer)  # type: ignore[attr-defined]


async def _copy_body(length: int | None, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
                     rechunk: bool = True) -> None:
    """A body, from one side to the other: exactly `length` bytes, or (None) the chunks
    re-emitted canonically (extensions and trailers dropped; without `rechunk`, their data
    alone, for a body that ends with the connection); bad chunks are refused `status`."""
    if length is not None:
        remaining = length
        while remaining:
            chunk = await asyncio.wait_for(reader.read(min(remaining, 1 << 16)), IDLE_TIMEOUT)
            if not chunk:
                raise asyncio.IncompleteReadError(b"", remaining)
            writer.write(chunk)
            await _drain(writer)
            remaining -= len(chunk)
        return
    while True:
        size_line = (await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT))[:-2].split(b";", 1)[0].strip()
        if not size_line or len(size_line) > 12 or any(c not in b"0123456789abcdefABCDEF" for c in size_line):
            raise _Refused(status, "bad chunk size")
        size = int(size_line, 16)
        if size == 0:
            while (await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT)) != b"\r\n":
                pass  # trailers: not forwarded
            if rechunk:
                writer.write(b"0\r\n\r\n")
                await _drain(writer)
            return
        data = await _read(reader, size + 2)
        if data[-2:] != b"\r\n":
            raise _Refused(status, "bad chunk")
        writer.write(b"%x\r\n" % size + data if rechunk else data[:-2])
        await _drain(writer)


async def _copy_until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await asyncio.wait_for(reader.read(1 << 16), IDLE_TIMEOUT):
        writer.write(chunk)
        await _drain(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5.0)
    except OSError:
        writer.transport.abort()  # a peer that does not finish TLS's close does not keep the socket


class FleetGateway:
    """Listens on `host:port` (TLS, the SuperLink's certificate) and forwards Fleet API calls
    to the SuperLink on 127.0.0.1:`upstream_port` (TLS, verified against the CA)."""

    def __init__(self, host: str, port: int, upstream_port: int, tls: GatewayTls, log: bool = True) -> None:
        self.host, self.port, self.upstream_port, self.log = host, port, upstream_port, log
        self._server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self._server_ssl.load_cert_chain(tls.server_cert, tls.server_key)
        self._server_ssl.set_alpn_protocols(["http/1.1"])
        self._upstream_ssl = ssl.create_default_context(cafile=str(tls.ca_cert))
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()  # open client connections: finished or cancelled on close
        # those waiting for a request head, nothing in flight: closed by aborting their transport
        # (a cancelled connection task logs an error on Python 3.11)
        self._idle: dict[asyncio.Task, _ClientConnection] = {}
        self.upstream_connections = 0  # opened to the SuperLink since start (tests, logs)
        self.closing = False  # set by close(): a connection whose exchange ends waits for no other

    def _say(self, text: str) -> None:
        if self.log:
            print(f"fleet gateway: {text}", file=sys.stderr, flush=True)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self._server_ssl, limit=MAX_HEAD, ssl_handshake_timeout=10.0,
        )
        self._say(f"forwarding POST /v1/fleet/* on {self.host}:{self.port} to 127.0.0.1:{self.upstream_port}; refusing all else")

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening; close the connections waiting for a request, let exchanges in flight
        finish for `grace` seconds, then cancel them."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._idle.values()):
            connection.writer.transport.abort()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            # a connection waiting for a request, none sent yet, makes room for this one (each for
            # one only: a flood waits on no more slots than there were idle connections)
            evictable = [task for task, idle in self._idle.items() if not _buffered(idle.reader)]
            if not evictable:
                writer.close()  # every slot busy with an exchange: a flood of connections does not exhaust file descriptors
                return
            self._idle.pop(evictable[0]).writer.transport.abort()
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        async with self._slots:
            connection = _ClientConnection(self, reader, writer)
            try:
                await connection.serve(task)
            except _Refused as refused:
                self._say(f"refused {writer.get_extra_info('peername')}: {refused}")
                if not connection.answering:
                    writer.write(_response(refused.status, str(refused)))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):  # OSError: also SSLError, TimeoutError
                pass  # a client or the SuperLink went away or stalled mid-exchange: nothing to answer
            finally:
                self._idle.pop(task, None)
                await connection.close_upstream()
                try:
                    await asyncio.wait_for(writer.drain(), 5.0)
                except OSError:
                    pass
                await _close(writer)

    async def connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            connection = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", self.upstream_port, ssl=self._upstream_ssl, server_hostname="127.0.0.1", limit=MAX_HEAD,
            ), 10.0)
        except OSError as exc:
            raise _Refused(502, f"SuperLink unreachable ({type(exc).__name__})") from None
        self.upstream_connections += 1
        return connection


class _ClientConnection:
    """One client's connection: its requests in turn, each forwarded on this connection's own
    connection to the SuperLink, opened when needed and kept while it is clean."""

    def __init__(self, gateway: FleetGateway, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.gateway, self.reader, self.writer = gateway, reader, writer
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.upstream_used = 0.0  # when the upstream connection last finished an exchange (monotonic)
        self.answering = False  # a response to the current request has begun: no other answer can follow

    async def serve(self, task: asyncio.Task) -> None:
        while not self.gateway.closing:
            self.gateway._idle[task] = self
            try:
                head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                return  # the client closed between requests
            except asyncio.LimitOverrunError:
                raise _Refused(400, "request head too large") from None
            finally:
                self.gateway._idle.pop(task, None)
            self.answering = False
            if not await self._exchange(parse_head(head)):
                return

    async def close_upstream(self) -> None:
        if self.upstream is not None:
            await _close(self.upstream[1])
            self.upstream = None

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.upstream is not None and (self.upstream[0].at_eof() or _buffered(self.upstream[0])
                                          or time.monotonic() - self.upstream_used > UPSTREAM_REUSE_SECONDS):
            await self.close_upstream()  # closed, out of step (bytes past the last response) or about to be closed
        if self.upstream is None:
            self.upstream = await self.gateway.connect_upstream()
        return self.upstream

    async def _exchange(self, request: Request) -> bool:
        """Forward one request and relay its response; True when both sides can go on."""
        up_reader, up_writer = await self._upstream()
        body_sent = False
        early = False  # the response began before the request's body was through

        async def relay_response() -> Response:
            nonlocal early
            try:
                head = await asyncio.wait_for(up_reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
            except asyncio.LimitOverrunError:
                raise _Refused(502, "response head too large") from None
            response = parse_response_head(head)
            early = not body_sent
            self.writer.write(client_head(response, close=request.close or early, http10=request.http10))
            self.answering = True
            if response.until_close:
                await _copy_until_close(up_reader, self.writer)
            elif not response.bodiless:
                await _copy_body(response.content_length, up_reader, self.writer, 502, rechunk=not request.http10)
            return response

        up_writer.write(upstream_head(request))
        if request.expect_continue:
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the gateway reads the body now
            await _drain(self.writer)
        # relayed while the body is still being sent: a SuperLink that answers early (an error
        # before it read the whole body) and closes is still heard by the client
        relay = asyncio.create_task(relay_response())
        try:
            try:
                # a total deadline: a body trickled a byte at a time does not hold a slot for ever;
                # a malformed one (_Refused) is answered by _serve unless part of an answer went out
                await asyncio.wait_for(_copy_body(request.content_length, self.reader, up_writer, 400), IDLE_TIMEOUT)
                body_sent = True
            except (OSError, asyncio.IncompleteReadError):
                # the SuperLink stopped reading (it answered early) or the client went away:
                # relay what the SuperLink says, but do not wait for a body that will not come
                await asyncio.wait_for(relay, 10.0)
                return False
            response = await relay
        finally:
            if not relay.done():
                relay.cancel()  # this exchange was cancelled or failed: the relay goes with it
                await asyncio.gather(relay, return_exceptions=True)
        if response.close or early:
            await self.close_upstream()  # (bytes past the response: _upstream does not reuse it)
        self.upstream_used = time.monotonic()
        return not (request.close or early or response.until_close)
