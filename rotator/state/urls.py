"""State URLs as they may be shown: a PostgreSQL URL's password never reaches a log or a message.

The policy file should not hold the password at all (libpq reads ``PGPASSWORD`` or
``PGPASSFILE``), but when it does, everything rotator prints goes through these two functions.
"""

from __future__ import annotations

import re

from sqlalchemy.engine import make_url

__all__ = ["backend", "safe_url", "scrub_url_password"]

_USERINFO = re.compile(r"(://[^/:@]*):[^@/]*@")


def safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***``; never raises (a URL SQLAlchemy cannot
    parse is masked by pattern instead)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return _USERINFO.sub(r"\1:***@", url)


def scrub_url_password(text: str, url: str) -> str:
    """``text`` (an error message, say) with the password of ``url`` masked wherever it occurs."""
    try:
        password = make_url(url).password
    except Exception:
        password = None
    if password:
        text = text.replace(str(password), "***")
    return text


def backend(url: str) -> str:
    """``sqlite``, ``postgresql``, or whatever else the URL names (before any ``+driver``)."""
    return url.split(":", 1)[0].split("+", 1)[0].lower()
