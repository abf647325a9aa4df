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

One request per client connection, re-framed: the gateway parses each request head, checks the
target, and sends the upstream exactly one request with an unambiguous body length and
`Connection: close`, then relays the response until the SuperLink closes. A second request
smuggled after the body never reaches the SuperLink; clients (httpx in Flower) reconnect.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

FLEET_TARGET = re.compile(rb"/v1/fleet/[a-z][a-z0-9-]{0,63}")  # a Fleet route, no query, no dots, no escapes
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
# not forwarded: the gateway sets the framing and the connection handling itself
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"content-length", b"te",
               b"trailer", b"upgrade", b"expect", b"http2-settings"}
MAX_HEAD = 64 * 1024
HEAD_TIMEOUT = 30.0  # a client that does not finish its request head in time is dropped (slowloris)
IDLE_TIMEOUT = 300.0  # no byte in either stream for this long: the exchange is abandoned
MAX_CONNECTIONS = 256


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


def parse_head(head: bytes) -> Request:
    """The request head (up to and including the blank line), checked: only `POST` to a Fleet
    route, HTTP/1.x, well-formed headers, one unambiguous body length."""
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else []
    parts = lines[0].split(b" ") if lines else []
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _Refused(400, "malformed request line")
    method, target, _ = parts
    if method != b"POST" or FLEET_TARGET.fullmatch(target) is None:
        raise _Refused(403, f"{method[:16]!r} {target[:120]!r} is not a Fleet API call")
    headers: list[tuple[bytes, bytes]] = []
    lengths: list[bytes] = []
    encodings: list[bytes] = []
    expect_continue = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:  # also refuses obsolete line folding
            raise _Refused(400, "malformed header")
        key, value = name.lower(), value.strip(b" \t")
        if key == b"content-length":
            lengths.append(value)
        elif key == b"transfer-encoding":
            encodings.append(value.lower())
        elif key == b"expect":
            expect_continue = value.lower() == b"100-continue"
        if key not in _HOP_BY_HOP:
            headers.append((name, value))
    if encodings:
        if lengths or encodings != [b"chunked"]:  # both, or an encoding the gateway does not re-frame
            raise _Refused(400, "ambiguous or unsupported body framing")
        return Request(target, headers, None, expect_continue)
    if len(set(lengths)) > 1 or any(not v.isdigit() or len(v) > 12 for v in lengths):
        raise _Refused(400, "bad Content-Length")
    return Request(target, headers, int(lengths[0]) if lengths else 0, expect_continue)


def upstream_head(request: Request) -> bytes:
    framing = b"Transfer-Encoding: chunked" if request.content_length is None else b"Content-Length: %d" % request.content_length
    lines = [b"POST " + request.target + b" HTTP/1.1", *(name + b": " + value for name, value in request.headers),
             framing, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _response(status: int, reason: str) -> bytes:
    phrases = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway", 503: "Service Unavailable"}
    body = f"fedads fleet gateway: {reason}\n".encode()
    return (f"HTTP/1.1 {status} {phrases.get(status, 'Error')}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


async def _read(reader: asyncio.StreamReader, size: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(size), IDLE_TIMEOUT)


async def _copy_body(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The request body, from the client to the SuperLink: exactly Content-Length bytes, or
    the chunks re-emitted canonically (extensions and trailers dropped)."""
    if request.content_length is not None:
        remaining = request.content_length
        while remaining:
            chunk = await asyncio.wait_for(reader.read(min(remaining, 1 << 16)), IDLE_TIMEOUT)
            if not chunk:
                raise asyncio.IncompleteReadError(b"", remaining)
            writer.write(chunk)
            await writer.drain()
            remaining -= len(chunk)
        return
    while True:
        size_line = (await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT))[:-2].split(b";", 1)[0].strip()
        if not size_line or len(size_line) > 12 or any(c not in b"0123456789abcdefABCDEF" for c in size_line):
            raise _Refused(400, "bad chunk size")
        size = int(size_line, 16)
        if size == 0:
            while (await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT)) != b"\r\n":
                pass  # trailers: not forwarded
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        data = await _read(reader, size + 2)
        if data[-2:] != b"\r\n":
            raise _Refused(400, "bad chunk")
        writer.write(b"%x\r\n" % size + data)
        await writer.drain()


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
        self._exchanges: set[asyncio.Task] = set()  # in flight: finished or cancelled on close

    def _say(self, text: str) -> None:
        if self.log:
            print(f"fleet gateway: {text}", file=sys.stderr, flush=True)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self._server_ssl, limit=MAX_HEAD, ssl_handshake_timeout=10.0,
        )
        self._say(f"forwarding POST /v1/fleet/* on {self.host}:{self.port} to 127.0.0.1:{self.upstream_port}; refusing all else")

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening; let exchanges in flight finish for `grace` seconds, then cancel them."""
        if self._server is not None:
            self._server.close()
        if self._exchanges:
            _, pending = await asyncio.wait(set(self._exchanges), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.close()  # at capacity: a flood of connections does not exhaust file descriptors
            return
        task = asyncio.current_task()
        if task is not None:
            self._exchanges.add(task)
            task.add_done_callback(self._exchanges.discard)
        async with self._slots:
            peer = writer.get_extra_info("peername")
            try:
                await self._exchange(reader, writer)
            except _Refused as refused:
                self._say(f"refused {peer}: {refused}")
                writer.write(_response(refused.status, str(refused)))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):  # OSError: also SSLError, TimeoutError
                pass  # a client or the SuperLink went away or stalled mid-exchange: nothing to answer
            finally:
                try:
                    await asyncio.wait_for(writer.drain(), 5.0)
                    writer.close()
                    await asyncio.wait_for(writer.wait_closed(), 5.0)
                except OSError:
                    pass

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            raise _Refused(400, "request head too large") from None
        request = parse_head(head)
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", self.upstream_port, ssl=self._upstream_ssl, server_hostname="127.0.0.1",
            ), 10.0)
        except OSError as exc:
            raise _Refused(502, f"SuperLink unreachable ({type(exc).__name__})") from None
        relayed = 0
        response: asyncio.Task | None = None

        async def relay_response() -> None:
            nonlocal relayed
            while chunk := await asyncio.wait_for(up_reader.read(1 << 16), IDLE_TIMEOUT):
                writer.write(chunk)
                relayed += len(chunk)
                await writer.drain()

        try:
            up_writer.write(upstream_head(request))
            if request.expect_continue:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the gateway reads the body now
                await writer.drain()
            # relayed while the body is still being sent: a SuperLink that answers early (an error
            # before it read the whole body) and closes is still heard by the client
            response = asyncio.create_task(relay_response())
            try:
                await _copy_body(request, reader, up_writer)
            except _Refused:
                response.cancel()
                await asyncio.gather(response, return_exceptions=True)
                if relayed:
                    return  # the client has part of an answer already: closing is all that is left
                raise
            except (OSError, asyncio.IncompleteReadError):
                # the SuperLink stopped reading (it answered early) or the client went away:
                # relay what the SuperLink says, but do not wait for a body that will not come
                await asyncio.wait_for(response, 10.0)
                return
            await response
        finally:
            if response is not None and not response.done():
                response.cancel()  # this exchange was cancelled or failed: the relay goes with it
            up_writer.close()
            try:
                await asyncio.wait_for(up_writer.wait_closed(), 5.0)
            except OSError:
                pass
