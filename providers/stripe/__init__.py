"""The ``stripe`` provider: webhook endpoint signing secrets, and API keys through Stripe's key
API where the account has it.

``provider`` holds the plugin, which hands each credential to ``webhooks`` or ``api_keys``;
``client`` talks to Stripe; ``jwe`` decrypts the key a new API key comes back in; ``settings``
holds the TOML models.
"""
