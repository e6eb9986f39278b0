"""Misuse monitoring: per-key usage from the providers' own records, the anomaly rules of the
policy file, their actions, and ``revoke_when = "quiet"``.

:mod:`rotator.monitor.rules` judges one credential's stored buckets; :mod:`rotator.monitor.
poller` asks the providers, keeps the buckets and acts. ``rotator usage`` (:mod:`rotator.
key_usage`) asks the providers live instead, for the leak runbook.
"""

PROXY_USAGE = "(proxy)"
"""The ``provider`` of the usage buckets the credential proxy counts (calls it forwarded per
credential and key), judged for credentials with ``misuse.source = "proxy"``; no provider of a
policy file can be named so."""
