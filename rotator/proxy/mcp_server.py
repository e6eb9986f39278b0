"""``rotator mcp``: the proxy's routes as MCP tools, through the official MCP Python SDK.

An agent's MCP client calls a tool named after a route (``openai``) with ``method``, ``path``,
``query`` and ``json_body``; the server makes the call with the route's credential attached,
under exactly the proxy's rules (the agent's rotator token, its scope, budget and rate, the
audit event and metrics; see :meth:`rotator.proxy.server.ProxyServer.call`). A denial is a
tool error whose text says what was denied and why, which an agent handles like any failed
tool call. One server serves one agent: its token comes from an environment variable (the
``rotator exec`` way), never from the command line.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from rotator.proxy.server import ProxyServer
from rotator.proxy.tokens import Denied

__all__ = ["build_mcp_server"]


def build_mcp_server(server: ProxyServer, token: str) -> Any:
    """An ``MCPServer`` with one tool per route of ``server``, acting with ``token``."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await server.open()
        try:
            yield
        finally:
            await server.close()

    app: Any = MCPServer(name="rotator", lifespan=lifespan, instructions=(
        "Each tool calls one external service with its credential attached by rotator; you "
        "never see the key. A refused call (out of scope, budget spent, rate limited, token "
        "expired or revoked) is a tool error saying why: adapt, or stop and report it."))

    def tool_for(route_name: str) -> Any:
        route = server.config.routes[route_name]

        async def call(path: str, method: str = "POST", json_body: dict[str, Any] | None = None,
                       query: dict[str, str] | None = None) -> dict[str, Any]:
            try:
                status, body, kind = await server.call(token, route_name, method, path, query,
                                                       json_body)
            except Denied as denied:
                raise ToolError(f"denied ({denied.code}, HTTP {denied.status}): "
                                f"{denied.message}") from None
            text = body.decode("utf-8", "replace")
            if "json" in kind:
                try:
                    return {"status": status, "json": json.loads(text)}
                except ValueError:
                    pass
            return {"status": status, "text": text}

        call.__doc__ = (f"Call {route.upstream} (route {route_name}) with its credential "
                        f"attached. Allowed: {', '.join(route.methods)} on "
                        f"{', '.join(route.paths)}. Returns the status and the JSON (or text) "
                        "answer.")
        return call

    for name in server.config.routes:
        app.add_tool(tool_for(name), name=name, description=tool_for(name).__doc__)
    return app
