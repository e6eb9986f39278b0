"""Benchmark: the credential proxy against calling the upstream directly.

An OpenAI-shaped upstream (aiohttp, one process: a chat completion as JSON, or streamed as 4
server-sent events) is called by a load generator (aiohttp client, one process) with 1, 16 and
64 concurrent clients for a few seconds each, plain and streaming, directly and through
``rotator proxy`` (its own process, with a real OpenBao holding the upstream key and the
signing key, a token checked on every call, the audit trail written). It prints requests per
second and the latency p50/p99 of each, and what the proxy adds.

All three processes share this machine's cores, so the figures are a floor: the proxy competes
with the load generator and the upstream for CPU.

    .venv/bin/python bench/proxy.py [--seconds 4] [--concurrency 1,16,64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

UPSTREAM_KEY = "sk-bench-upstream-" + "x" * 24


def upstream_main(port: int) -> None:
    """The upstream: checks the key, answers like OpenAI's chat completions."""
    from aiohttp import web

    body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                       "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": "ok"}}]}).encode()
    events = [json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": w}, "finish_reason": None}]}) for w in "okay"]

    async def chat(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        payload = await request.json()
        if not payload.get("stream"):
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(f"data: {event}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def passthrough_main(stack: str, port: int, upstream: int) -> None:
    """A bare forwarder in one candidate stack (no tokens, no vault): what the stack itself
    costs per call, to choose the proxy's (``--stacks``)."""
    target = f"http://127.0.0.1:{upstream}"
    if stack == "httptools":
        import uvloop

        from rotator.proxy.http11 import HTTPServer, Incoming, Reply, UpstreamPool, dropped

        pool = UpstreamPool()
        origin, _ = UpstreamPool.origin(target)
        auth = [(b"Authorization", f"Bearer {UPSTREAM_KEY}".encode()),
                (b"Content-Type", b"application/json")]

        async def relay(request: Incoming, reply: Reply) -> None:
            up = await pool.request(origin, request.method, request.target, auth, request.body)
            try:
                headers = [(k, v) for k, v in up.headers if k.lower() not in dropped(up.headers)]
                if b"text/event-stream" not in (up.header(b"content-type") or b""):
                    reply.send(up.status, headers, await up.read())
                    return
                reply.start(up.status, headers)
                async for chunk in up.chunks():
                    if reply.write(chunk, last=up.complete):
                        await reply.drain()
                reply.end()
            finally:
                up.release()

        async def serve() -> None:
            await HTTPServer(relay).start("127.0.0.1", port)
            await asyncio.Event().wait()

        uvloop.run(serve())
        return
    if stack == "aiohttp":
        import aiohttp
        from aiohttp import web

        async def forward(request: web.Request) -> web.StreamResponse:
            session = request.app["session"]
            async with session.request(request.method, target + request.rel_url.raw_path,
                                       headers={"Authorization": f"Bearer {UPSTREAM_KEY}",
                                                "Content-Type": "application/json"},
                                       data=await request.read()) as up:
                response = web.StreamResponse(status=up.status)
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response

        async def start(app: web.Application) -> None:
            app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

        app = web.Application()
        app.on_startup.append(start)
        app.router.add_route("*", "/{tail:.*}", forward)
        import uvloop

        uvloop.install()
        web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
        return
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None))

    async def forward_httpx(request):  # type: ignore[no-untyped-def]
        up = await client.send(client.build_request(
            request.method, target + request.url.path, content=await request.body(),
            headers={"Authorization": f"Bearer {UPSTREAM_KEY}",
                     "Content-Type": "application/json"}), stream=True)
        return StreamingResponse(up.aiter_raw(), status_code=up.status_code,
                                 background=None)

    app = Starlette(routes=[Route("/{tail:path}", forward_httpx, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop",
                http="httptools" if _has("httptools") else "h11")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


async def _load(url: str, token: str, stream: bool, clients: int, seconds: float
                ) -> tuple[float, list[float], int]:
    import aiohttp

    payload = json.dumps({"model": "gpt-4o-mini", "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            async with session.post(url, data=payload, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    continue
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies, errors


def load_main(url: str, token: str, stream: bool, clients: int, seconds: float) -> None:
    rate, latencies, errors = asyncio.run(_load(url, token, stream, clients, seconds))
    latencies.sort()
    print(json.dumps({"rps": rate, "p50": statistics.median(latencies) * 1000,
                      "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000,
                      "errors": errors}))


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _measure(url: str, token: str, stream: bool, clients: int, seconds: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--load", url, token, str(int(stream)),
                          str(clients), str(seconds)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(runs: Any) -> dict:
    """The run of median throughput (its latencies with it)."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    return ordered[len(ordered) // 2]


def _wait(url: str) -> None:
    import httpx

    for _ in range(200):
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--repeat", type=int, default=3,
                        help="Runs of each measurement; the median is shown.")
    parser.add_argument("--stacks", action="store_true",
                        help="Compare bare forwarders of the candidate stacks instead.")
    args = parser.parse_args()
    if args.stacks:
        compare_stacks(args.seconds)
        return
    import tomli_w

    from rotator.testing.openbao import OpenBaoDevServer
    from rotator.testing.server_process import free_port

    work = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    up_port, proxy_port = free_port(), free_port()
    upstream = _spawn("--upstream", str(up_port))
    bao = OpenBaoDevServer().start()
    proxy = None
    try:
        client = bao.client()
        client.secrets.kv.v2.create_or_update_secret(path="bench/upstream",
                                                     secret={"OPENAI_API_KEY": UPSTREAM_KEY},
                                                     mount_point="secret")
        config = work / "rotation-policies.toml"
        config.write_text(tomli_w.dumps({
            "rotator": {"state_url": f"sqlite:///{work / 'state.db'}"},
            "vaults": {"main": {"type": "vault", "url": bao.url, "token_env": "VAULT_TOKEN"}},
            "providers": {"signing": {"type": "signing-key"},
                          "up": {"type": "http", "base_url": f"http://127.0.0.1:{up_port}",
                                 "create": {"path": "/keys", "body": {"name": "{key_name}"},
                                            "id_path": "id", "secret_path": "key"},
                                 "revoke": {"path": "/keys/{key_id}"}}},
            "credentials": [
                {"name": "bench/openai", "agent": "bench", "provider": "up", "vault": "main",
                 "path": "bench/upstream", "field": "OPENAI_API_KEY", "manual_only": False},
                {"name": "proxy/signing", "agent": "proxy", "provider": "signing",
                 "vault": "main", "path": "bench/signing", "field": "key", "grace": "1h"}],
            "proxy": {"listen": f"127.0.0.1:{proxy_port}", "signing_credential": "proxy/signing",
                      "rate_limit": 100_000,
                      "routes": {"openai": {"upstream": f"http://127.0.0.1:{up_port}/v1",
                                            "credential": "bench/openai",
                                            "paths": ["/chat/completions"]}}}}))
        env = {**os.environ, "VAULT_TOKEN": bao.root_token}
        rotator = [sys.executable, "-m", "rotator", "-c", str(config)]
        subprocess.run([*rotator, "rotate-now", "proxy/signing", "--yes"], env=env, check=True,
                       capture_output=True)
        token = subprocess.run([*rotator, "token", "issue", "--agent", "bench", "--routes",
                                "openai", "--ttl", "1h"], env=env, check=True,
                               capture_output=True, text=True).stdout.strip()
        proxy = subprocess.Popen([*rotator, "proxy", "--metrics-address", "127.0.0.1:0"],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(f"http://127.0.0.1:{proxy_port}/")
        _wait(f"http://127.0.0.1:{up_port}/")
        direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        proxied = f"http://127.0.0.1:{proxy_port}/openai/chat/completions"
        print(f"{'mode':<9} {'clients':>7} | {'direct rps':>10} {'p50 ms':>7} {'p99 ms':>7} | "
              f"{'proxy rps':>9} {'p50 ms':>7} {'p99 ms':>7} | {'ratio':>5} {'+p50 ms':>7}")
        for stream in (False, True):
            for clients in (int(c) for c in args.concurrency.split(",")):
                # Direct and proxied alternate, --repeat times; the median run of each is
                # shown (the machine's own noise is ±10% run to run).
                runs = [(_measure(direct, UPSTREAM_KEY, stream, clients, args.seconds),
                         _measure(proxied, token, stream, clients, args.seconds))
                        for _ in range(args.repeat)]
                d = _median(r[0] for r in runs)
                p = _median(r[1] for r in runs)
                errors = sum(r[0]["errors"] + r[1]["errors"] for r in runs)
                print(f"{'stream' if stream else 'plain':<9} {clients:>7} | {d['rps']:>10.0f} "
                      f"{d['p50']:>7.2f} {d['p99']:>7.2f} | {p['rps']:>9.0f} {p['p50']:>7.2f} "
                      f"{p['p99']:>7.2f} | {p['rps'] / d['rps']:>5.2f} "
                      f"{p['p50'] - d['p50']:>7.2f}" + (f"  ({errors} errors)" if errors
                                                       else ""))
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        upstream.terminate()
        upstream.wait(10)
        bao.stop()


def compare_stacks(seconds: float) -> None:
    """Bare forwarders (aiohttp server+client on uvloop; starlette on uvicorn with httpx) at
    16 clients, plain and streamed, against the direct upstream."""
    from rotator.testing.server_process import free_port

    up_port = free_port()
    upstream = _spawn("--upstream", str(up_port))
    try:
        _wait(f"http://127.0.0.1:{up_port}/")
        print(f"{'stack':<28} {'mode':<7} {'rps':>6} {'p50 ms':>7} {'p99 ms':>7}")
        for stream in (False, True):
            d = _measure(f"http://127.0.0.1:{up_port}/v1/chat/completions", UPSTREAM_KEY,
                         stream, 16, seconds)
            print(f"{'direct':<28} {'stream' if stream else 'plain':<7} {d['rps']:>6.0f} "
                  f"{d['p50']:>7.2f} {d['p99']:>7.2f}")
        for stack in ("httptools", "aiohttp", "starlette-uvicorn-httpx"):
            port = free_port()
            proc = _spawn("--passthrough", stack, str(port), str(up_port))
            try:
                _wait(f"http://127.0.0.1:{port}/")
                for stream in (False, True):
                    r = _measure(f"http://127.0.0.1:{port}/v1/chat/completions", "-", stream,
                                 16, seconds)
                    print(f"{stack:<28} {'stream' if stream else 'plain':<7} {r['rps']:>6.0f} "
                          f"{r['p50']:>7.2f} {r['p99']:>7.2f}"
                          + (f"  ({r['errors']} errors)" if r["errors"] else ""))
            finally:
                proc.terminate()
                proc.wait(10)
    finally:
        upstream.terminate()
        upstream.wait(10)


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[1] == "--passthrough":
        passthrough_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 2 and sys.argv[1] == "--upstream":
        upstream_main(int(sys.argv[2]))
    elif len(sys.argv) > 2 and sys.argv[1] == "--load":
        load_main(sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5]),
                  float(sys.argv[6]))
    else:
        main()
