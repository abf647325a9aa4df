"""The Fleet gateway in process (deploy/fleet_gateway.py): its request check, its re-framing of
requests and responses, and its kept-alive connections, against a recording TLS upstream that
stands in for the SuperLink. The deployment around it: tests/test_deploy_security.py."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="deploy.dev_certs needs the `cryptography` package (a flwr dependency)")

import deploy.fleet_gateway as fleet_gateway
from deploy.dev_certs import create_tls_files
from deploy.fleet_gateway import FleetGateway, GatewayTls, _Refused, client_head, parse_head, parse_response_head, upstream_head

Answer = Callable[[int, bytes], bytes]  # (the request's number, its bytes) -> the upstream's raw response


def head(request_line: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join([request_line, *headers]) + b"\r\n\r\n"


def fleet(route: bytes = b"pull-messages", body: bytes = b"hello", *headers: bytes) -> bytes:
    return head(b"POST /v1/fleet/" + route + b" HTTP/1.1", b"Host: x", b"Content-Length: %d" % len(body), *headers) + body


def numbered(index: int, request: bytes) -> bytes:
    """A kept-alive answer naming the request it answers."""
    body = b"answer %d" % index
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body) + body


# -- the request and response checks, no network --------------------------------------------


def test_gateway_passes_fleet_calls_and_refuses_everything_else():
    ok = parse_head(head(b"POST /v1/fleet/pull-messages HTTP/1.1", b"Host: x", b"Content-Length: 12"))
    assert ok.target == b"/v1/fleet/pull-messages" and ok.content_length == 12 and not ok.close
    forwarded = upstream_head(ok)
    assert forwarded.startswith(b"POST /v1/fleet/pull-messages HTTP/1.1\r\n")
    assert forwarded.endswith(b"Content-Length: 12\r\n\r\n")
    for line in (b"POST /v1/control/list-runs HTTP/1.1", b"POST /v1/runtime/pull-task-input HTTP/1.1",
                 b"POST /v1/fleet/../control/list-runs HTTP/1.1", b"POST /v1/fleet/%2e%2e/control/start-run HTTP/1.1",
                 b"POST /v1/fleet/pull-messages?x=1 HTTP/1.1", b"POST https://h/v1/control/start-run HTTP/1.1",
                 b"GET /v1/fleet/get-run HTTP/1.1", b"GET /docs HTTP/1.1", b"CONNECT 127.0.0.1:9093 HTTP/1.1"):
        with pytest.raises(_Refused) as refused:
            parse_head(head(line, b"Host: x"))
        assert refused.value.status == 403, line


def test_gateway_reads_when_a_client_closes():
    assert parse_head(head(b"POST /v1/fleet/pull-messages HTTP/1.1", b"Connection: keep-alive, close")).close
    assert parse_head(head(b"POST /v1/fleet/pull-messages HTTP/1.0", b"Content-Length: 0")).close
    assert not parse_head(head(b"POST /v1/fleet/pull-messages HTTP/1.1", b"Connection: keep-alive")).close


@pytest.mark.parametrize("headers", [
    (b"Content-Length: 5", b"Transfer-Encoding: chunked"),  # which one frames the body? refused, not guessed
    (b"Content-Length: 5", b"Content-Length: 6"),
    (b"Content-Length: -1",),
    (b"Content-Length: +5",),
    (b"Transfer-Encoding: gzip, chunked",),
    (b"Host: x", b" folded: continuation"),
    (b"Bad Header: x",),
    # a bare LF, a lone CR or a NUL in a value: a parser behind the gateway (h11) may end the line there
    (b"X: a\nContent-Length: 0\n\nPOST /v1/control/start-run HTTP/1.1",),
    (b"X: a\nTransfer-Encoding: chunked", b"Content-Length: 5"),
    (b"X: a\rb",),
    (b"X: a\x00b",),
])
def test_gateway_refuses_ambiguous_requests(headers):
    with pytest.raises(_Refused) as refused:
        parse_head(head(b"POST /v1/fleet/push-messages HTTP/1.1", *headers))
    assert refused.value.status == 400


def test_gateway_forwards_end_to_end_headers_only():
    request = parse_head(head(b"POST /v1/fleet/pull-messages HTTP/1.1", b"Host: x", b"Content-Length: 0", b"X-Forwarded-For: 6.6.6.6",
                              b"Forwarded: for=6.6.6.6", b"X-Real-IP: 6.6.6.6", b"X-Forwarded-Proto: http", b"Connection: x-secret",
                              b"X-Secret: hop", b"Authorization-Signature: kept"))
    assert request.headers == [(b"Host", b"x"), (b"Authorization-Signature", b"kept")]


def test_gateway_answers_http10_clients_in_http10():
    request = parse_head(head(b"POST /v1/fleet/pull-messages HTTP/1.0", b"Content-Length: 0", b"Expect: 100-continue"))
    assert request.close and request.http10 and not request.expect_continue
    chunked = parse_response_head(head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"))
    assert client_head(chunked, close=True, http10=True) == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"


def test_gateway_reframes_responses_with_its_own_length_and_connection_headers():
    response = parse_response_head(head(b"HTTP/1.1 200 OK", b"Content-Type: application/protobuf", b"Content-Length: 7",
                                        b"Connection: keep-alive", b"Keep-Alive: timeout=5"))
    assert (response.content_length, response.until_close, response.close) == (7, False, False)
    assert client_head(response, close=False) == b"HTTP/1.1 200 OK\r\nContent-Type: application/protobuf\r\nContent-Length: 7\r\n\r\n"
    assert client_head(response, close=True).endswith(b"Content-Length: 7\r\nConnection: close\r\n\r\n")
    chunked = parse_response_head(head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"))
    assert chunked.content_length is None and not chunked.until_close
    assert b"Transfer-Encoding: chunked\r\n" in client_head(chunked, close=False)
    until_close = parse_response_head(head(b"HTTP/1.1 200 OK", b"Content-Type: text/plain"))
    assert until_close.until_close and until_close.close
    assert client_head(until_close, close=False).endswith(b"Content-Type: text/plain\r\nConnection: close\r\n\r\n")
    no_content = parse_response_head(head(b"HTTP/1.1 204 No Content", b"Content-Length: 9"))
    assert no_content.content_length == 0 and no_content.bodiless
    assert client_head(no_content, close=False) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert parse_response_head(head(b"HTTP/1.1 200 OK", b"Content-Length: 0", b"Connection: close")).close
    assert parse_response_head(head(b"HTTP/1.0 200 OK", b"Content-Length: 0")).close


@pytest.mark.parametrize("response", [
    head(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Transfer-Encoding: chunked"),
    head(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Content-Length: 6"),
    head(b"HTTP/1.1 100 Continue"),
    head(b"HTTP/2 200 OK", b"Content-Length: 0"),
    head(b"HTTP/1.1 200 OK", b" folded: continuation"),
    head(b"HTTP/1.1 200 OK", b"X: a\nContent-Length: 0"),
    b"garbage\r\n\r\n",
])
def test_gateway_refuses_responses_it_cannot_frame(response):
    with pytest.raises(_Refused) as refused:
        parse_response_head(response)
    assert refused.value.status == 502


# -- through a gateway in front of a recording upstream --------------------------------------


@dataclass
class Upstream:
    """What the stand-in SuperLink received: each request's bytes, by connection."""

    connections: list[list[bytes]] = field(default_factory=list)

    @property
    def requests(self) -> list[bytes]:
        return [request for connection in self.connections for request in connection]


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response as the client gets it: its head and its body (chunks as sent)."""
    response_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if b"Content-Length: " in response_head:
        return response_head, await reader.readexactly(int(response_head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
    if b"Transfer-Encoding: chunked" in response_head:
        return response_head, await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
    return response_head, await asyncio.wait_for(reader.read(), 10)


def through_gateway(tmp_path: Path, client: Callable[[Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]], Awaitable[object]],
                    answer: Answer = numbered, ended: asyncio.Event | None = None) -> tuple[object, Upstream, FleetGateway]:
    """Runs `client` (given a function that connects to the gateway) against a gateway in
    front of a TLS upstream that answers each request with `answer` and keeps its connection
    open unless the answer closes it (`ended` is set when the gateway closes one); returns what
    `client` returned, the upstream's record and the gateway."""
    files = create_tls_files(tmp_path / "certs")
    upstream = Upstream()
    count = 0

    async def serve_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        received: list[bytes] = []
        upstream.connections.append(received)
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                if b"Transfer-Encoding: chunked" in request:
                    request += await reader.readuntil(b"0\r\n\r\n")
                elif b"Content-Length: " in request:
                    request += await reader.readexactly(int(request.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
                received.append(request)
                count += 1
                response = answer(count, request)
                writer.write(response)
                await writer.drain()
                response_head = response.split(b"\r\n\r\n")[0]
                if not (b"Content-Length" in response_head or b"chunked" in response_head):
                    break  # a body that ends with the connection; after `Connection: close` it stays open, to see the gateway not reuse it
        except (asyncio.IncompleteReadError, ConnectionError):
            if ended is not None:
                ended.set()  # the gateway closed its connection
        writer.close()

    async def scenario() -> tuple[object, FleetGateway]:
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ssl.load_cert_chain(files.server_cert, files.server_key)
        upstream_server = await asyncio.start_server(serve_upstream, "127.0.0.1", 0, ssl=server_ssl)
        upstream_port = upstream_server.sockets[0].getsockname()[1]
        gateway = FleetGateway("127.0.0.1", 0, upstream_port, GatewayTls(files.server_cert, files.server_key, files.ca_cert), log=False)
        await gateway.start()
        assert gateway._server is not None
        port = gateway._server.sockets[0].getsockname()[1]
        client_ssl = ssl.create_default_context(cafile=str(files.ca_cert))

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl, server_hostname="127.0.0.1")

        try:
            result = await client(connect)
        finally:
            # idle kept-alive connections are closed at once, not after the grace for exchanges in flight
            await asyncio.wait_for(gateway.close(grace=60.0), 10.0)
            upstream_server.close()
            await upstream_server.wait_closed()
        return result, gateway

    result, gateway = asyncio.run(scenario())
    return result, upstream, gateway


def send(*requests: bytes, responses: int, then_eof: bool = False):
    """A client that writes `requests` at once on one connection and reads `responses`
    (and, with `then_eof`, whatever comes until the gateway closes the connection)."""
    async def client(connect):
        reader, writer = await connect()
        writer.write(b"".join(requests))
        await writer.drain()
        got = [await read_response(reader) for _ in range(responses)]
        rest = await asyncio.wait_for(reader.read(), 10) if then_eof else None
        writer.close()
        return got, rest
    return client


def test_gateway_checks_every_request_on_a_connection(tmp_path):
    """A request pipelined (smuggled) after a Fleet call's body is checked as a request of its
    own: a Control call is answered 403 by the gateway and never reaches the SuperLink."""
    smuggled = b"POST /v1/control/start-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    (got, rest), upstream, _ = through_gateway(tmp_path, send(fleet(), smuggled, responses=2, then_eof=True))
    assert got[0][1] == b"answer 1"
    assert got[1][0].startswith(b"HTTP/1.1 403 ") and b"is not a Fleet API call" in got[1][1] and rest == b""
    assert len(upstream.requests) == 1 and upstream.requests[0].endswith(b"Content-Length: 5\r\n\r\nhello")
    assert b"/v1/control" not in b"".join(upstream.requests)


def test_gateway_keeps_both_connections_open_across_requests(tmp_path):
    async def client(connect):
        reader, writer = await connect()
        got = []
        for route in (b"pull-messages", b"pull-object", b"push-object"):
            writer.write(fleet(route, b"body of " + route))
            await writer.drain()
            got.append(await read_response(reader))
        writer.close()
        return got
    got, upstream, gateway = through_gateway(tmp_path, client)
    assert [body for _, body in got] == [b"answer 1", b"answer 2", b"answer 3"]
    assert all(b"Content-Length: 8\r\n" in response_head and b"Connection" not in response_head for response_head, _ in got)
    assert gateway.upstream_connections == 1 and len(upstream.connections) == 1
    assert [r.split(b" ")[1] for r in upstream.requests] == [b"/v1/fleet/pull-messages", b"/v1/fleet/pull-object", b"/v1/fleet/push-object"]
    assert all(b"Connection" not in request and request.endswith(b"\r\n\r\nbody of " + request.split(b" ")[1][10:])
               for request in upstream.requests)


def test_gateway_answers_pipelined_requests_in_order(tmp_path):
    (got, _), upstream, _ = through_gateway(tmp_path, send(fleet(body=b"one"), fleet(body=b"two"), fleet(body=b"three"), responses=3))
    assert [body for _, body in got] == [b"answer 1", b"answer 2", b"answer 3"]
    assert [request.split(b"\r\n\r\n")[1] for request in upstream.requests] == [b"one", b"two", b"three"]


def test_gateway_closes_when_the_client_asks(tmp_path):
    (got, rest), upstream, _ = through_gateway(tmp_path, send(fleet(b"pull-messages", b"x", b"Connection: close"), fleet(),
                                                              responses=1, then_eof=True))
    assert got[0][0].endswith(b"Connection: close\r\n\r\n") and got[0][1] == b"answer 1"
    assert rest == b"" and len(upstream.requests) == 1  # the request after it is not read


def test_gateway_reframes_chunked_bodies(tmp_path):
    chunked = (b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n")
    (got, _), upstream, _ = through_gateway(tmp_path, send(chunked, responses=1))
    assert got[0][1] == b"answer 1"
    assert upstream.requests[0].endswith(b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")


def test_gateway_reframes_the_superlinks_responses(tmp_path):
    def answers(index: int, request: bytes) -> bytes:
        if index == 1:  # chunked, with an extension and a trailer
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nab\r\n1\r\nc\r\n0\r\nTrailer: t\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"  # no length: ends with the connection
    (got, rest), upstream, _ = through_gateway(tmp_path, send(fleet(), fleet(), responses=2, then_eof=True), answers)
    assert got[0] == (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")
    assert got[1][0].endswith(b"Connection: close\r\n\r\n") and got[1][1] == b"until the end" and rest == b""
    assert len(upstream.connections) == 1


def test_gateway_answers_a_response_it_cannot_frame_with_502(tmp_path):
    def ambiguous(index: int, request: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nok"
    (got, rest), upstream, _ = through_gateway(tmp_path, send(fleet(), fleet(), responses=1, then_eof=True), ambiguous)
    assert got[0][0].startswith(b"HTTP/1.1 502 ") and b"ambiguous" in got[0][1]
    assert rest == b"" and len(upstream.requests) == 1  # and the connection is closed


def test_gateway_opens_a_new_upstream_connection_when_the_superlink_closes_its_own(tmp_path):
    def closing_first(index: int, request: bytes) -> bytes:
        closing = b"Connection: close\r\n" if index == 1 else b""
        return b"HTTP/1.1 200 OK\r\n" + closing + b"Content-Length: 8\r\n\r\nanswer %d" % index
    (got, _), upstream, gateway = through_gateway(tmp_path, send(fleet(), fleet(), responses=2), closing_first)
    assert [body for _, body in got] == [b"answer 1", b"answer 2"]
    assert all(b"Connection" not in response_head for response_head, _ in got)  # the client's connection stays open
    assert gateway.upstream_connections == 2 and [len(c) for c in upstream.connections] == [1, 1]


def test_gateway_closes_idle_connections_at_once_when_it_stops(tmp_path):
    """A kept-alive connection waiting for its next request does not hold the gateway's stop
    for the grace it gives exchanges in flight (60 s here; through_gateway allows 10)."""
    async def client(connect):
        reader, writer = await connect()
        writer.write(fleet())
        await writer.drain()
        got = await read_response(reader)
        return got, (reader, writer)  # left open, idle
    (got, _), _, gateway = through_gateway(tmp_path, client)
    assert got[1] == b"answer 1" and not gateway._connections


def test_gateway_does_not_reuse_a_superlink_connection_with_bytes_past_its_response(tmp_path):
    """Bytes the SuperLink sent past a response are never read as the next request's answer."""
    def overlong(index: int, request: bytes) -> bytes:
        return numbered(index, request) + (b"STALE!!!" if index == 1 else b"")
    (got, _), upstream, gateway = through_gateway(tmp_path, send(fleet(), fleet(), responses=2), overlong)
    assert [body for _, body in got] == [b"answer 1", b"answer 2"]
    assert gateway.upstream_connections == 2 and [len(c) for c in upstream.connections] == [1, 1]


def test_gateway_drops_a_client_that_does_not_read_its_answers(tmp_path, monkeypatch):
    """Pipelined requests whose answers the client never reads do not hold the connection (and
    its slot) for ever: the gateway gives up writing after WRITE_TIMEOUT."""
    monkeypatch.setattr(fleet_gateway, "WRITE_TIMEOUT", 0.5)
    big = b"x" * (1 << 20)
    upstream_closed = asyncio.Event()

    def large(index: int, request: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big

    async def client(connect):
        reader, writer = await connect()
        writer.write(b"".join(fleet() for _ in range(40)))
        await writer.drain()
        await asyncio.wait_for(upstream_closed.wait(), 30)  # reading nothing until the gateway gives up
        received = 0
        try:
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):  # ends once the gateway gives up
                received += len(chunk)
        except ConnectionError:
            pass
        writer.close()
        return received
    received, upstream, _ = through_gateway(tmp_path, client, large, ended=upstream_closed)
    assert len(upstream.requests) < 40 and received < 40 * len(big)


def test_gateway_answers_control_calls_itself(tmp_path):
    (got, rest), upstream, _ = through_gateway(
        tmp_path, send(b"POST /v1/control/list-runs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", responses=1, then_eof=True))
    assert got[0][0].startswith(b"HTTP/1.1 403 ") and rest == b"" and upstream.requests == []


def test_gateway_at_capacity_closes_an_idle_connection_for_each_new_one(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fleet_gateway, "MAX_CONNECTIONS", 2)

    async def request_on(connection):
        reader, writer = connection
        writer.write(fleet())
        await writer.drain()
        return await read_response(reader)

    async def client(connect):
        kept = [await connect() for _ in range(2)]  # two kept-alive connections fill the gateway
        for connection in kept:
            await request_on(connection)
        new = [await connect() for _ in range(2)]  # two more at once: each makes an idle one give way
        answers = await asyncio.gather(*(request_on(connection) for connection in new))
        closed = [await asyncio.wait_for(reader.read(), 10) == b"" for reader, _ in kept]
        for _, writer in [*kept, *new]:
            writer.close()
        return [body for _, body in answers], closed
    (answers, closed), upstream, _ = through_gateway(tmp_path, client)
    assert sorted(answers) == [b"answer 3", b"answer 4"] and closed == [True, True] and len(upstream.requests) == 4
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # an eviction is no error (asyncio logs a cancelled handler's)
