"""Misuse monitoring: per-key usage from the providers' own records, the anomaly rules of the
policy file, their actions, and ``revoke_when = "quiet"``.

:mod:`rotator.monitor.rules` judges one credential's stored buckets; :mod:`rotator.monitor.
poller` asks the providers, keeps the buckets and acts. ``rotator usage`` (:mod:`rotator.
key_usage`) asks the providers live instead, for the leak runbook.
"""
