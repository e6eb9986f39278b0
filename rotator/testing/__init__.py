"""Test support that ships with rotator, for its own tests, ``rotator demo`` and plugin authors.

Nothing is imported here, so ``import rotator.testing`` stays
cheap and never pulls in an SDK or pytest; import the submodule you need:

- :mod:`rotator.testing.provider_contract`: ``ProviderContract``, the pytest suite every
  provider plugin runs (see ``docs/providers.md``).
- :mod:`rotator.testing.vault_contract`: ``VaultContract``, the same for vault plugins.
- :mod:`rotator.testing.fake_openai`: ``FakeOpenAIServer``, a stateful OpenAI Admin API over HTTP.
- :mod:`rotator.testing.fake_anthropic`, :mod:`~rotator.testing.fake_stripe`,
  :mod:`~rotator.testing.fake_http_services`: stateful fakes of the Anthropic Admin API,
  Stripe's key APIs, SendGrid and Cloudflare, all on :mod:`rotator.testing.fake_server`
  (one threaded JSON server with fault injection and latency).
- :mod:`rotator.testing.openbao`: ``OpenBaoDevServer``, a real OpenBao dev server on loopback.
- :mod:`rotator.testing.moto_server`, :mod:`~rotator.testing.postgres`: moto in server mode
  and a private PostgreSQL cluster, all three on :mod:`rotator.testing.server_process`
  (free port, wait until it answers, stop by pid).
- :mod:`rotator.testing.agent`: a sample agent that reads its key from the vault.
"""

from __future__ import annotations

__all__: list[str] = []
