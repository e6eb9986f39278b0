"""Reading a new Stripe API key's secret: a compact JWE (RFC 7516) encrypted to a throw-away
RSA key pair.

``POST /v2/iam/api_keys`` takes a public key (``public_key.pem_key``) and answers with the new
key's secret in ``secret_key.encrypted_secret``, wrapped with RSA-OAEP-256 (or RSA-OAEP) and
encrypted with AES-GCM. The key pair is made for that one call and its private half never
leaves the process. A test-mode account answers with the plaintext ``secret_key.token``
instead. Anything unexpected (another format, algorithm or recipient, a tampered tag) raises
:class:`Undecryptable` by name, never a guess; no message holds a secret.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

__all__ = ["Undecryptable", "decrypt_jwe", "key_pair", "token_from"]

_GCM_KEY_BYTES = {"A128GCM": 16, "A192GCM": 24, "A256GCM": 32}


class Undecryptable(Exception):
    """The create response's secret could not be read; the message holds no secret."""


def key_pair(bits: int) -> tuple[RSAPrivateKey, str]:
    """A fresh RSA key pair: the private key, and the public key as PEM for the request."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    return private_key, pem


def token_from(created: Mapping[str, Any], private_key: RSAPrivateKey, recipient: str) -> str:
    """The new key's secret from a create response: decrypted, or test mode's plaintext."""
    secret_key = created.get("secret_key") or {}
    encrypted = secret_key.get("encrypted_secret")
    if encrypted:
        fmt = encrypted.get("format")
        if fmt not in (None, "jwe_compact"):
            raise Undecryptable(f"encrypted_secret.format {str(fmt)[:40]!r} is not jwe_compact")
        echoed = encrypted.get("recipient_key_id")
        if echoed not in (None, recipient):
            raise Undecryptable("the secret is encrypted to some other public key")
        return decrypt_jwe(encrypted.get("ciphertext"), private_key)
    token = secret_key.get("token")
    if isinstance(token, str) and token:
        return token
    raise Undecryptable("the answer has neither secret_key.encrypted_secret nor .token")


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decrypt_jwe(ciphertext: Any, private_key: RSAPrivateKey) -> str:
    """Decrypt a compact JWE (RFC 7516): RSA-OAEP(-256) key wrap, AES-GCM content."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not isinstance(ciphertext, str) or not ciphertext.strip():
        raise Undecryptable("encrypted_secret.ciphertext is empty")
    compact = ciphertext.strip()
    if compact.count(".") != 4:
        try:  # "in base64 format": maybe the compact form, base64-encoded once more
            compact = base64.b64decode(compact, validate=True).decode("ascii").strip()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise Undecryptable("encrypted_secret.ciphertext is not a compact JWE") from None
        if compact.count(".") != 4:
            raise Undecryptable("encrypted_secret.ciphertext is not a compact JWE")
    protected, wrapped, iv, body, tag = compact.split(".")
    try:
        header = json.loads(_b64url(protected))
        parts = [_b64url(p) for p in (wrapped, iv, body, tag)]
    except (binascii.Error, ValueError):
        raise Undecryptable("the JWE is not well-formed") from None
    if not isinstance(header, dict):
        raise Undecryptable("the JWE header is not a JSON object")
    alg, enc = header.get("alg"), header.get("enc")
    digests = {"RSA-OAEP-256": hashes.SHA256, "RSA-OAEP": hashes.SHA1}
    if alg not in digests:
        raise Undecryptable(f"JWE alg {str(alg)[:40]!r} is not RSA-OAEP-256 or RSA-OAEP")
    if enc not in _GCM_KEY_BYTES:
        raise Undecryptable(f"JWE enc {str(enc)[:40]!r} is not A128GCM, A192GCM or A256GCM")
    if header.get("zip") or header.get("crit"):
        raise Undecryptable("the JWE uses zip or crit, which are not supported")
    wrapped_key, nonce, encrypted, auth_tag = parts
    digest = digests[alg]()
    try:
        cek = private_key.decrypt(
            wrapped_key, padding.OAEP(mgf=padding.MGF1(algorithm=digest), algorithm=digest,
                                      label=None)
        )
        if len(cek) != _GCM_KEY_BYTES[enc]:
            raise Undecryptable(f"the JWE content key does not fit {enc}")
        plaintext = AESGCM(cek).decrypt(nonce, encrypted + auth_tag, protected.encode("ascii"))
    except (InvalidTag, ValueError):
        raise Undecryptable("the JWE does not decrypt with this rotation's key pair") from None
    try:
        token = plaintext.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Undecryptable("the decrypted secret is not text") from None
    if not token:
        raise Undecryptable("the decrypted secret is empty")
    return token
