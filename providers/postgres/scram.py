"""The SCRAM-SHA-256 verifier PostgreSQL stores for a password (RFC 5802, RFC 7677).

The postgres provider sends the server this verifier, never the password: a statement log,
``pg_stat_statements`` or a replica's WAL then hold at most a verifier, from which the password
cannot be recovered. The verifier must be hashed exactly as the server hashes a login's
password, SASLprep included, or nobody could log in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata

__all__ = ["SCRAM_ITERATIONS", "scram_sha256_verifier"]

SCRAM_ITERATIONS = 4096
"""PostgreSQL's default (``scram_iterations``); RFC 7677's minimum."""


def _saslprep(password: str) -> str:
    """The password as PostgreSQL prepares it before hashing (src/common/saslprep.c).

    Pure ASCII is used as is. Otherwise RFC 4013 SASLprep: map non-ASCII spaces to a space and
    drop "commonly mapped to nothing" characters, NFKC-normalise, and if the result has a
    prohibited character or breaks the bidi rules, use the original password unchanged, as
    the server (and libpq) do. A verifier hashed differently from the server's own hashing
    would never let anyone log in, so this must match it exactly.
    """
    if password.isascii():
        return password
    # Space mapping first, as PostgreSQL does: U+200B is in both tables and becomes a space.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if stringprep.in_table_c12(ch) or not stringprep.in_table_b1(ch)
    )
    prepared = unicodedata.normalize("NFKC", mapped)
    if not prepared:
        return password
    prohibited = (
        stringprep.in_table_a1, stringprep.in_table_c12, stringprep.in_table_c21_c22,
        stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
        stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    if any(check(ch) for ch in prepared for check in prohibited):
        return password
    if any(stringprep.in_table_d1(ch) for ch in prepared) and (
        any(stringprep.in_table_d2(ch) for ch in prepared)
        or not stringprep.in_table_d1(prepared[0])
        or not stringprep.in_table_d1(prepared[-1])
    ):
        return password
    return prepared


def scram_sha256_verifier(password: str, *, salt: bytes | None = None,
                          iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, RFC 7677).

    ``SaltedPassword = PBKDF2-HMAC-SHA-256(SASLprep(password), salt, iterations)``,
    ``StoredKey = SHA-256(HMAC(SaltedPassword, "Client Key"))``,
    ``ServerKey = HMAC(SaltedPassword, "Server Key")``, in PostgreSQL's text form
    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64). Neither key lets
    anyone log in as the role: a client must prove it knows ``ClientKey``, which only the
    password yields.
    """
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", _saslprep(password).encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
