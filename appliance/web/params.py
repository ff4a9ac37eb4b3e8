"""Request parameters read safely: bounded whole numbers and same-site redirect targets.

A parameter a person can type never reaches SQLite or a ``Location`` header unchecked: numbers are
clamped to what SQLite stores (64-bit), and a redirect goes only to a path on this appliance.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from werkzeug.routing import IntegerConverter

# SQLite's INTEGER is 64-bit signed; a larger Python int raises OverflowError when bound
SQLITE_MAX_INT = 2**63 - 1
# far beyond any real list, small enough that (page - 1) * page size stays a 64-bit integer
MAX_PAGE = 1_000_000


class BoundedIntConverter(IntegerConverter):
    """``<int:...>`` in a route that matches only what SQLite can hold (a larger id is 404, not 500)."""

    def __init__(self, map, *args, **kwargs) -> None:
        kwargs.setdefault("max", SQLITE_MAX_INT)
        super().__init__(map, *args, **kwargs)


def bounded_int(text: str | None, default: int | None = None, *, low: int = 0,
                high: int = SQLITE_MAX_INT) -> int | None:
    """``text`` as a whole number clamped to ``low``..``high``; ``default`` when it is none, or not a number."""
    if text is None:
        return default
    try:
        value = int(text.strip())
    except ValueError:
        return default
    return min(max(value, low), high)


def page_number(text: str | None) -> int:
    """A list's page number from a query string: 1 when missing or not a number, else 1..:data:`MAX_PAGE`."""
    return bounded_int(text, 1, low=1, high=MAX_PAGE) or 1


def same_site_path(target: str | None, fallback: str) -> str:
    """``target`` when it is a path on this site, else ``fallback``.

    Browsers strip tabs and line breaks from a ``Location`` and read ``\\`` as ``/``, so
    ``/\\tevil``, ``/\\evil`` and ``//evil`` all lead off the site. Refused: anything but printable
    ASCII without ``\\``, a scheme or host, and a second ``/`` right after the first.
    """
    if not target or "\\" in target or not all("!" <= c <= "~" for c in target):
        return fallback
    if not target.startswith("/") or target.startswith("//"):
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return fallback
    return target
