"""Credentials out of logs and written files: URLs lose their ``user:password@`` part.

The trainer takes a Pushgateway URL with credentials from ``$TRAINER_PUSHGATEWAY_URL`` (the
chart's Secret) or, outside Kubernetes, from ``monitoring.pushgateway_url``. Wherever a URL or the
configuration is logged or written (summary.json, ``trainer config``), it goes through here.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

#: The authority (``user:password@host:port``) of a URL, with or without a scheme.
_AUTHORITY = re.compile(r"^(?:[A-Za-z][-A-Za-z0-9+.]*://)?([^/?#]*)")


def _split(url: str) -> urllib.parse.SplitResult | None:
    """``url`` split; without a scheme it is read as an HTTP URL (as prometheus_client reads it)."""
    try:
        return urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    except ValueError:
        return None


def has_credentials(url: str) -> bool:
    """Whether the URL carries a user or a password (``https://user:password@host``)."""
    parts = _split(url)
    return parts is not None and (parts.username is not None or parts.password is not None)


def redact_url(url: str) -> str:
    """The URL without user and password (never log credentials)."""
    if not has_credentials(url):
        return url
    start, end = _AUTHORITY.match(url).span(1)
    return url[:start] + url[start:end].rpartition("@")[2] + url[end:]  # host[:port] as written


def redacted(value: Any, url_keys: tuple[str, ...] = ("pushgateway_url",)) -> Any:
    """``value`` (a configuration as plain data) with credentials removed from every URL: strings
    with a scheme (``https://user:password@host``), and the values of ``url_keys`` even without one."""
    if isinstance(value, dict):
        return {
            key: redact_url(item) if key in url_keys and isinstance(item, str) else redacted(item, url_keys)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redacted(item, url_keys) for item in value]
    if isinstance(value, str) and "@" in value and "://" in value:
        return redact_url(value)
    return value
