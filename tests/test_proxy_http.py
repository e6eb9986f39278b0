"""The proxy's HTTP/1.1 layer (rotator.proxy.http11) where a reverse proxy is attacked or
let down: request smuggling, odd request targets, upgrades, pipelining, hop-by-hop headers,
an upstream that drops a pooled connection, goes silent, or streams to a slow agent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from rotator.proxy.http11 import (
    HTTPServer,
    Incoming,
    Reply,
    UpstreamError,
    UpstreamPool,
    dropped,
    header_safe,
)

pytest.importorskip("httptools")

Handler = Callable[[Incoming, Reply], Awaitable[None]]


async def _raw(port: int, data: bytes, *, wait: float = 1.0) -> bytes:
    """Send raw bytes, read until the server closes or ``wait`` passes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = b""
    try:
        while True:
            piece = await asyncio.wait_for(reader.read(65536), wait)
            if not piece:
                break
            out += piece
    except TimeoutError:
        pass
    writer.close()
    return out


def _serve(handler: Handler, test: Callable[[int, list[Incoming]], Awaitable[None]]) -> None:
    seen: list[Incoming] = []

    async def recording(request: Incoming, reply: Reply) -> None:
        seen.append(request)
        await handler(request, reply)

    async def main() -> None:
        server = HTTPServer(recording)
        port = await server.start("127.0.0.1", 0)
        try:
            await test(port, seen)
        finally:
            await server.stop(0)

    asyncio.run(main())


async def _echo(request: Incoming, reply: Reply) -> None:
    reply.send(200, [(b"Content-Type", b"text/plain")],
               b"%s %s %d" % (request.method.encode(), request.target, len(request.body)))


def test_smuggling_shapes_are_refused_and_the_connection_closed() -> None:
    async def test(port: int, seen: list[Incoming]) -> None:
        for attack in (
            # CL.TE: a length beside chunked framing
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
            # two different lengths
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\n"
            b"abc",
            # a bare LF inside a header, obsolete line folding
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\nX-B: 2\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
        ):
            answer = await _raw(port, attack)
            assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
            assert answer.count(b"HTTP/1.1") == 1, "nothing after the refusal is answered"
        assert seen == [], "no smuggled or malformed request reaches the handler"

    _serve(_echo, test)


def test_only_origin_form_targets_are_served_and_upgrades_are_refused() -> None:
    async def test(port: int, seen: list[Incoming]) -> None:
        absolute = await _raw(port, b"GET http://internal.example/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert absolute.startswith(b"HTTP/1.1 400")
        upgrade = await _raw(port, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                   b"Upgrade: websocket\r\n\r\n")
        assert upgrade.startswith(b"HTTP/1.1 501")

    _serve(_echo, test)


def test_pipelined_requests_are_answered_in_order_and_head_has_no_body() -> None:
    async def test(port: int, seen: list[Incoming]) -> None:
        answer = await _raw(port, b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab"
                                  b"GET /2?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                                  b"HEAD /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        parts = answer.split(b"HTTP/1.1 200 OK")
        assert len(parts) == 4, answer
        assert parts[1].endswith(b"POST /1 2") and parts[2].endswith(b"GET /2?q=1 0")
        assert parts[3].endswith(b"\r\n\r\n"), "a HEAD answer carries no body"
        assert [r.target for r in seen] == [b"/1", b"/2?q=1", b"/3"]

    _serve(_echo, test)


def test_forwarding_reframes_and_drops_hop_by_hop_headers() -> None:
    async def test(port: int, seen: list[Incoming]) -> None:
        pool = UpstreamPool(timeout=5)
        origin, _ = UpstreamPool.origin(f"http://127.0.0.1:{port}")
        agent_headers = [(b"Connection", b"keep-alive, X-Secret-Hop"), (b"X-Secret-Hop", b"1"),
                         (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"999"),
                         (b"X-Kept", b"yes")]
        kept = [(k, v) for k, v in agent_headers if k.lower() not in dropped(agent_headers)]
        response = await pool.request(origin, "POST", b"/v1/x", kept, b"hello")
        assert (await response.read()).endswith(b"POST /v1/x 5")
        response.release()
        names = {k.lower() for k, _ in seen[0].headers}
        assert b"x-kept" in names and b"x-secret-hop" not in names
        assert (b"content-length", b"5") in [(k.lower(), v) for k, v in seen[0].headers]
        assert b"transfer-encoding" not in names
        # the connection went back to the pool and is used again
        again = await pool.request(origin, "GET", b"/again", [], b"")
        assert again._conn.reused
        await again.read()
        again.release()
        pool.close()

    _serve(_echo, test)


def test_a_pooled_connection_the_upstream_closed_is_replaced_and_silence_times_out() -> None:
    async def closing(request: Incoming, reply: Reply) -> None:
        if request.target == b"/silent":
            await asyncio.sleep(5)
        reply.keep_alive = request.target != b"/close-after"
        reply.send(200, [], b"ok")

    async def test(port: int, seen: list[Incoming]) -> None:
        pool = UpstreamPool(timeout=0.5)
        origin, _ = UpstreamPool.origin(f"http://127.0.0.1:{port}")
        first = await pool.request(origin, "GET", b"/keep", [], b"")
        await first.read()
        first.release()
        idle = pool._idle[origin][0]
        idle.transport.close()  # the upstream (or a middlebox) dropped the idle connection
        await asyncio.sleep(0.05)
        second = await pool.request(origin, "GET", b"/keep", [], b"")
        assert await second.read() == b"ok"
        second.release()
        with pytest.raises(UpstreamError, match="did not answer within"):
            await pool.request(origin, "GET", b"/silent", [], b"")
        pool.close()

    _serve(closing, test)


def test_a_slow_agent_holds_back_the_stream_instead_of_buffering_it_all() -> None:
    chunk = b"x" * 65536

    async def streaming(request: Incoming, reply: Reply) -> None:
        reply.start(200, [(b"Content-Type", b"text/event-stream")])
        waited = 0
        for _ in range(256):  # 16 MiB offered to an agent that reads nothing
            if reply.write(chunk):
                waited += 1
                try:
                    await asyncio.wait_for(reply.drain(), 0.05)
                except TimeoutError:
                    break
        reply.abort()
        results.append(waited)

    results: list[int] = []

    async def test(port: int, seen: list[Incoming]) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.5)  # reading nothing
        writer.close()
        assert results and results[0] >= 1, "the writer was told to wait"

    _serve(streaming, test)


def test_header_safe_refuses_what_would_inject_a_header() -> None:
    assert header_safe("sk-proj-abc_DEF-123")
    for bad in ("sk-abc\r\nX-Admin: 1", "sk\nx", "sk\x00", "sk\x7f", "sk-\u20ac"):
        assert not header_safe(bad)
