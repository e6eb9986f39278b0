"""The HTTP path for Vault's KV v2 calls a rotation makes, without hvac's ``requests`` layer.

A rotation reads and writes a handful of KV v2 paths; through hvac each call went through
``requests`` (session merging, environment and ``.netrc`` lookups, hooks, a prepared request),
which cost more Python time than Vault took to answer. This is one keep-alive connection pool
(urllib3, which ``requests`` itself sends with) shared by every worker thread, sending exactly
the request hvac would send: same path, headers (``X-Vault-Token``, ``X-Vault-Namespace``,
``X-Vault-Request``) and JSON body. A Vault error is raised as hvac's own exception
(``hvac.utils.raise_for_error``), so the vault plugin's error handling reads it unchanged;
hvac stays for logins, token renewal, health and the rarer calls.
"""

from __future__ import annotations

import json
from typing import Any

import urllib3
from urllib3.util import Retry, Timeout

__all__ = ["KvHttp"]

_NO_RETRY = Retry(total=0, read=False, redirect=False, raise_on_status=False)
"""Like ``requests``: the engine retries transient failures itself, under its fence."""


class KvHttp:
    """Thread-safe; ``request`` raises hvac exceptions for Vault's errors and urllib3's for
    the network's (``urllib3.exceptions.HTTPError``). The pool keeps up to ``maxsize`` idle
    connections, as many as ``rotate-now --concurrency`` may run workers: connections are
    opened only when needed, and one more than the pool keeps would be closed after its call
    with a warning in the log."""

    def __init__(self, url: str, *, timeout: float, verify: bool | str,
                 namespace: str | None, maxsize: int = 256) -> None:
        tls: dict[str, Any] = {}
        if url.startswith("https://"):
            if verify is False:
                tls = {"cert_reqs": "CERT_NONE"}
            else:
                tls = {"cert_reqs": "CERT_REQUIRED"}
                if isinstance(verify, str):
                    tls["ca_certs"] = verify
                else:
                    import certifi

                    tls["ca_certs"] = certifi.where()
        self._base = url.rstrip("/")
        self._pool = urllib3.connection_from_url(
            self._base, maxsize=maxsize, block=False, retries=_NO_RETRY,
            timeout=Timeout(connect=timeout, read=timeout), **tls)
        self._headers = {"X-Vault-Request": "true", "Accept": "application/json"}
        if namespace:
            self._headers["X-Vault-Namespace"] = namespace

    def request(self, method: str, path: str, token: str, *, body: Any = None,
                content_type: str = "application/json") -> Any:
        """Send ``method`` to ``/v1/<path>``; the decoded JSON answer, or None for an empty
        one (204)."""
        headers = {**self._headers, "X-Vault-Token": token}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        target = f"/v1/{path}"
        response = self._pool.urlopen(method, target, body=payload, headers=headers,
                                      redirect=False, preload_content=True)
        status, data = response.status, response.data
        if status >= 400:
            _raise_vault_error(method, f"{self._base}{target}", status, data,
                               response.headers.get("Content-Type", ""))
        if not data:
            return None
        return json.loads(data)

    def close(self) -> None:
        self._pool.close()


def _raise_vault_error(method: str, url: str, status: int, data: bytes,
                       content_type: str) -> None:
    """Raise what hvac raises for this answer (its adapter's own rule: ``errors`` from a JSON
    body, else the text as the message)."""
    import hvac.utils

    text = data.decode("utf-8", "replace")
    body = errors = None
    if content_type.startswith("application/json"):
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        else:
            errors = body.get("errors") if isinstance(body, dict) else None
    hvac.utils.raise_for_error(method, url, status, None if errors is not None else text,
                               errors=errors, text=text, json=body)
