"""rotator: credential rotation daemon for AI-agent fleets."""

from __future__ import annotations

__version__ = "0.1.0"
