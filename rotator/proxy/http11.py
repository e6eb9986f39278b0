"""The proxy's HTTP/1.1 on both sides: a server and a keep-alive upstream pool on asyncio
protocols, parsed by llhttp (``httptools``, Node.js's parser, in its strict mode).

Why not a web framework: a proxy call is one parse and one write on each side, and a
framework's request and response objects, middlewares and routers cost more per call than the
proxy's own checks (``bench/proxy.py --stacks`` measured it; see the README). What this keeps
of HTTP is what a reverse proxy needs, and it is strict where laxness is a vulnerability:

- llhttp refuses what request smuggling needs (``Content-Length`` beside ``Transfer-Encoding``,
  two different lengths, bare CR or LF, obsolete line folding); a refused request gets a 400 and
  the connection is closed, never resynchronised.
- Bodies are read whole and sent upstream re-framed with our own ``Content-Length``; the
  agent's framing and hop-by-hop headers (and those its ``Connection`` header names) are never
  forwarded, so what the upstream parses is exactly one request.
- Only origin-form targets (``/path?query``) are served: no absolute-form, CONNECT or upgrade.
- A header value we add is refused if it holds a control character (:func:`header_safe`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

__all__ = ["HTTPServer", "Incoming", "Reply", "UpstreamError", "UpstreamPool",
           "UpstreamResponse", "header_safe"]

log = logging.getLogger("rotator.proxy")

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"trailers",
                        b"transfer-encoding", b"upgrade", b"host", b"content-length",
                        b"proxy-connection"})
MAX_HEAD = 64 * 1024
"""Largest request line plus headers accepted."""
IDLE_TIMEOUT = 75.0
"""Seconds a keep-alive connection from an agent may sit idle."""
HIGH_WATER = 1024 * 1024
"""Bytes of a streamed answer buffered before reading the upstream pauses."""

Headers = list[tuple[bytes, bytes]]


def header_safe(value: str) -> bool:
    """Whether ``value`` can be a header value as is: printable ASCII (no CR, LF, NUL or other
    control character that would end the header or start another; API keys are ASCII)."""
    return value.isascii() and value.isprintable()


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def dropped(headers: Headers) -> frozenset[bytes]:
    """Hop-by-hop header names: the fixed ones and those a ``Connection`` header names."""
    named = [v for k, v in headers if k.lower() == b"connection"]
    if not named:
        return HOP_BY_HOP
    extra = {t.strip().lower() for v in named for t in v.split(b",")}
    return HOP_BY_HOP | extra


# -- the server side ---------------------------------------------------------------------------

@dataclass(slots=True)
class Incoming:
    """A request read whole from an agent."""

    method: str
    target: bytes
    """As sent: an origin-form path with its query, still percent-encoded."""
    headers: Headers
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition(b"?")[0].decode("latin-1")

    @property
    def query(self) -> bytes:
        return self.target.partition(b"?")[2]

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


class Reply:
    """Writes one response to an agent: whole (:meth:`send`) or streamed (:meth:`start`,
    :meth:`write`, :meth:`end`)."""

    __slots__ = ("_chunked", "_conn", "_head_only", "_pending", "ended", "keep_alive", "sent",
                 "started", "status")

    def __init__(self, conn: _ServerConnection, keep_alive: bool, head_only: bool) -> None:
        self._conn, self.keep_alive, self._head_only = conn, keep_alive, head_only
        self._chunked = False
        self._pending = b""
        self.status = 0
        self.sent = 0
        self.started = False
        self.ended = False

    def _head(self, status: int, headers: Headers, framing: bytes) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        lines.extend(b"%s: %s\r\n" % (k, v) for k, v in headers)
        lines.append(framing)
        lines.append(b"Connection: keep-alive\r\n\r\n" if self.keep_alive
                     else b"Connection: close\r\n\r\n")
        return b"".join(lines)

    def send(self, status: int, headers: Headers, body: bytes) -> None:
        """The whole response in one write."""
        self.status, self.started, self.ended = status, True, True
        head = self._head(status, headers, b"Content-Length: %d\r\n" % len(body))
        self.sent = 0 if self._head_only else len(body)
        self._conn.write(head if self._head_only else head + body)
        self._conn.finished(self.keep_alive)

    def start(self, status: int, headers: Headers) -> None:
        """The head of a streamed response (chunked, or delimited by closing for HTTP/1.0),
        sent with the first piece of body or by :meth:`flush`."""
        self.status, self.started = status, True
        if not self._conn.http11:
            self.keep_alive = False
        self._chunked = self._conn.http11 and not self._head_only
        self._pending = self._head(status, headers, b"Transfer-Encoding: chunked\r\n"
                                   if self._chunked else b"")

    def flush(self) -> None:
        """Send the head now (the body is not there yet)."""
        if self._pending:
            self._conn.write(self._pending)
            self._pending = b""

    def write(self, data: bytes, last: bool = False) -> bool:
        """Send a piece of the body (with the head if not yet sent, and the end if ``last``);
        True if the agent reads slower than this writes: ``await drain()`` before more."""
        if self._head_only:
            data = b""
        self.sent += len(data)
        framed = (b"%x\r\n%s\r\n" % (len(data), data) if data else b"") if self._chunked \
            else data
        if last:
            self.ended = True
            if self._chunked:
                framed += b"0\r\n\r\n"
        if self._pending:
            framed, self._pending = self._pending + framed, b""
        if framed:
            self._conn.write(framed)
        if last:
            self._conn.finished(self.keep_alive)
            return False
        return self._conn.paused

    async def drain(self) -> None:
        await self._conn.drain()

    def end(self) -> None:
        if not self.ended:
            self.write(b"", last=True)

    def abort(self) -> None:
        """Close the connection mid-response (the upstream failed after the head was sent)."""
        self.keep_alive = False
        self._conn.close()


Handler = Callable[[Incoming, Reply], Awaitable[None]]


class _ServerConnection(asyncio.Protocol):
    """One agent connection: requests parsed as they arrive, answered one at a time in order
    (pipelined ones wait their turn)."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.http11 = True
        self._url: list[bytes] = []
        self._headers: Headers = []
        self._body: list[bytes] = []
        self._size = 0
        self._keep_alive = True
        self._queue: deque[tuple[Incoming, bool]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._waiting: asyncio.Future[None] | None = None
        self._paused_reading = False
        self.busy = False
        """Whether a request is being answered (``stop`` lets it finish)."""
        self._paused_writing: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._closing = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self._paused_writing is not None and not self._paused_writing.done():
            self._paused_writing.set_result(None)
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)
        # A call under way is not cancelled: it ends when its next write finds the agent gone
        # (or its upstream answers), and is audited either way.

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(501, b"upgrades are not proxied")
        except httptools.HttpParserError:
            self._refuse(400, b"malformed HTTP request")

    def pause_writing(self) -> None:
        self._paused_writing = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused_writing is not None and not self._paused_writing.done():
            self._paused_writing.set_result(None)
        self._paused_writing = None

    # llhttp callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = [], [], [], 0
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._size += len(url)
        if self._size > MAX_HEAD:
            raise httptools.HttpParserError("head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._size += len(name) + len(value)
        if self._size > MAX_HEAD:
            raise httptools.HttpParserError("head too large")

    def on_headers_complete(self) -> None:
        # llhttp forgets the connection's fate once the message is complete: ask now
        self._keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._size += len(body)
        if self._size > self.server.max_body:
            self._refuse(413, b"request body too large")
            raise httptools.HttpParserError("body too large")

    def on_message_complete(self) -> None:
        self.http11 = self.parser.get_http_version() == "1.1"
        target = b"".join(self._url)
        method = self.parser.get_method().decode("ascii")
        request = Incoming(method, target, self._headers,
                           b"".join(self._body) if self._body else b"")
        self._queue.append((request, self._keep_alive))
        if len(self._queue) > 16 and self.transport is not None and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()  # a client pipelining too far ahead waits
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())
        elif self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    # answering
    async def _serve(self) -> None:
        """Answer requests in order for as long as the connection lives (one task per
        connection, not per request: a keep-alive agent costs no task creation per call)."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not self._queue:
                if self._paused_reading and self.transport is not None:
                    self._paused_reading = False
                    self.transport.resume_reading()
                self._waiting = loop.create_future()
                await self._waiting  # the next request, or the connection's end
                self._waiting = None
                continue
            request, keep_alive = self._queue.popleft()
            self.busy = True
            reply = Reply(self, keep_alive, request.method == "HEAD")
            try:
                if not request.target.startswith(b"/"):
                    reply.keep_alive = False
                    reply.send(400, [(b"Content-Type", b"text/plain")],
                               b"only origin-form request targets (/path) are served")
                else:
                    await self.server.handler(request, reply)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the proxy failed on a call")
                if not reply.started:
                    reply.keep_alive = False
                    reply.send(500, [(b"Content-Type", b"text/plain")], b"proxy error")
                else:
                    reply.abort()
            finally:
                self.busy = False
            if not reply.keep_alive:
                break

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(data)

    @property
    def paused(self) -> bool:
        """Whether the agent's side has more unsent than it should (or is gone)."""
        return self._paused_writing is not None or self._closing

    async def drain(self) -> None:
        if self._closing:
            raise ConnectionResetError("the agent closed the connection")
        if self._paused_writing is not None:
            await self._paused_writing

    def finished(self, keep_alive: bool) -> None:
        if not keep_alive:
            self.close()
        elif not self._queue:
            self._arm_idle()

    def close(self) -> None:
        self._closing = True
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(self.server.idle_timeout,
                                                           self.close)

    def _refuse(self, status: int, message: bytes) -> None:
        if not self._closing:
            self.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                       b"Connection: close\r\n\r\n%s" % (status, _reason(status), len(message),
                                                         message))
        self.close()


class HTTPServer:
    """Serves ``handler`` on ``host:port`` (``start``), closing connections on ``stop``."""

    def __init__(self, handler: Handler, *, max_body: int = 64 * 1024 * 1024,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.handler, self.max_body, self.idle_timeout = handler, max_body, idle_timeout
        self.connections: set[_ServerConnection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerConnection(self), host, port,
                                                reuse_address=True, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening, let calls under way finish for up to ``grace`` seconds, close."""
        if self._server is None:
            return
        self._server.close()
        deadline = asyncio.get_running_loop().time() + grace
        while any(c.busy for c in self.connections) and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
        await self._server.wait_closed()


# -- the upstream side -------------------------------------------------------------------------

class UpstreamError(Exception):
    """The upstream could not be reached, or went away or stayed silent mid-call."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode("idna")


class UpstreamResponse:
    """An upstream's answer: head at once, body whole (:meth:`read`) or as it comes
    (:meth:`chunks`); :meth:`release` hands the connection back to the pool."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_timeout",
        "_waiter",
        "headers",
        "status",
    )

    def __init__(self, conn: _UpstreamConnection, status: int, headers: Headers,
                 timeout: float) -> None:
        self._conn, self.status, self.headers, self._timeout = conn, status, headers, timeout
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        self._done, self._error = True, error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(self._timeout, self._waiter.cancel)
        try:
            await self._waiter
        except asyncio.CancelledError:
            if timer.cancelled() or loop.time() < timer.when():
                raise
            raise UpstreamError(f"the upstream sent nothing for {self._timeout:g}s") from None
        finally:
            timer.cancel()
            self._waiter = None

    @property
    def complete(self) -> bool:
        """Whether the whole answer has arrived (what is buffered is the last of it)."""
        return self._done and self._error is None

    @property
    def buffered(self) -> int:
        return self._buffered

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: what has arrived since the last piece, joined."""
        while True:
            if self._chunks:
                data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                self._conn.resume()
                yield data
                continue
            if self._done:
                if self._error is not None:
                    raise UpstreamError(str(self._error)) from self._error
                return
            await self._wait()

    async def read(self) -> bytes:
        while not self._done:
            await self._wait()
        if self._error is not None:
            raise UpstreamError(str(self._error)) from self._error
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    def release(self) -> None:
        """Back to the pool if the answer was read to its end on a reusable connection;
        closed otherwise."""
        self._conn.released(self._done and self._error is None)


class _UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool, self.origin = pool, origin
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reused = False
        self.head_only = False
        self.received = False
        self._headers: Headers = []
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._complete = False
        self._until_close = False
        self._paused = False
        self._keep_alive = False
        self._timeout = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool._forget(self)
        if self._until_close and exc is None and self._response is not None:
            self.on_message_complete()  # an answer delimited by closing ends here
        error = exc or ConnectionResetError("the upstream closed the connection")
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        if self._response is not None and not self._complete:
            self._response._finish(error)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the upstream sent malformed HTTP ({exc})"))

    def pause(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    # llhttp callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue and the like: the real head follows
            self._headers = []
            return
        self._response = UpstreamResponse(self, status, self._headers, self._timeout)
        self._keep_alive = self.parser.should_keep_alive()
        self._until_close = not any(k.lower() in (b"content-length", b"transfer-encoding")
                                    for k, _ in self._headers)
        if self._head is not None and not self._head.done():
            self._head.set_result(self._response)
        if self.head_only or status in (204, 304):
            self._complete = True
            self._response._finish()
            # llhttp cannot tell a HEAD answer has no body: such a connection is not reused
            self.head_only = True

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._complete:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._response is not None and not self._complete:
            self._complete = True
            self._response._finish()

    # the pool's side
    def send(self, data: bytes, head_only: bool, timeout: float
             ) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self._headers, self._response, self._complete = [], None, False
        self.head_only, self.received, self._timeout = head_only, False, timeout
        self._head = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._head

    def released(self, complete: bool) -> None:
        keep = (complete and self._complete and not self.lost and not self.head_only
                and self._keep_alive)
        self._response, self._head = None, None
        if keep:
            self.resume()
            self.pool._put(self)
        else:
            self.close()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: BaseException) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        if self._response is not None and not self._complete:
            self._response._finish(error)
        self.close()


@dataclass
class UpstreamPool:
    """Keep-alive connections to upstreams, reused across calls (one call at a time each)."""

    timeout: float = 600.0
    """Seconds to wait for an answer's head, and between two pieces of its body."""
    connect_timeout: float = 10.0
    max_idle: int = 256
    """Idle connections kept per upstream."""
    _idle: dict[Origin, list[_UpstreamConnection]] = field(default_factory=dict)
    _ssl: ssl.SSLContext | None = None
    _closed: bool = False

    @staticmethod
    def origin(url: str) -> tuple[Origin, str]:
        """The origin of an http(s) URL and its path (no trailing slash)."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        default = 443 if parts.scheme == "https" else 80
        return (Origin(parts.scheme, parts.hostname or "", parts.port or default),
                parts.path.rstrip("/"))

    async def request(self, origin: Origin, method: str, target: bytes, headers: Headers,
                      body: bytes) -> UpstreamResponse:
        """Send one request; its answer's head (read or release it). A pooled connection
        the upstream had closed before reading the request is replaced once."""
        head = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode("ascii"), target,
                                                     origin.host_header)]
        head.extend(b"%s: %s\r\n" % (k, v) for k, v in headers)
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        data = b"".join(head) + body
        for attempt in (1, 2):
            conn = await self._connection(origin)
            try:
                return await self._await_head(conn, data, method == "HEAD")
            except (ConnectionError, OSError) as exc:
                conn.close()
                if attempt == 1 and conn.reused and not conn.received:
                    continue  # the upstream closed an idle connection as we sent on it
                raise UpstreamError(f"the upstream went away: {exc}") from exc
        raise AssertionError("unreachable")

    async def _await_head(self, conn: _UpstreamConnection, data: bytes,
                          head_only: bool) -> UpstreamResponse:
        future = conn.send(data, head_only, self.timeout)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout, future.cancel)
        try:
            return await future
        except asyncio.CancelledError:
            if loop.time() < timer.when():
                conn.close()
                raise
            conn.close()
            raise UpstreamError(f"the upstream did not answer within {self.timeout:g}s") \
                from None
        except UpstreamError:
            conn.close()
            raise
        finally:
            timer.cancel()

    async def _connection(self, origin: Origin) -> _UpstreamConnection:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.lost:
                conn.reused = True
                return conn
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _UpstreamConnection(self, origin), origin.host, origin.port,
                ssl=context), self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to the upstream {origin.host}:{origin.port}: "
                                f"{exc or type(exc).__name__}") from exc
        return conn

    def _put(self, conn: _UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) < self.max_idle and not self._closed:
            idle.append(conn)
        else:
            conn.close()

    def _forget(self, conn: _UpstreamConnection) -> None:
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        """Close the idle connections; those in use close when their call ends."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

