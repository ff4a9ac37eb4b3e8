"""Read and write the small TOML files of the appliance: the site's settings and model-pack manifests.

A bottom-layer module (it imports only ``appliance.durable``), so ``config``
and ``inference`` can both use it. Reading is the standard library's
``tomllib`` (``tomli`` on Python 3.10); writing covers what those files hold:
strings, booleans, integers, floats, lists of them, tables and arrays of tables.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.durable import write_bytes_durably

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

TOMLDecodeError = tomllib.TOMLDecodeError


def loads(text: str) -> dict[str, Any]:
    """Parse TOML ``text``; raises :data:`TOMLDecodeError` when it is not TOML."""
    return tomllib.loads(text)


def load(path: Path) -> dict[str, Any]:
    """Parse the TOML file at ``path``."""
    with open(path, "rb") as f:
        return tomllib.load(f)


def dumps(mapping: Mapping[str, Any]) -> str:
    """``mapping`` as TOML: its scalars first, in order, then its tables and arrays of tables.

    Raises :class:`TypeError` for a value TOML files of the appliance do not hold (dates, None ...).
    """
    lines: list[str] = []

    def table(prefix: str, data: Mapping[str, Any]) -> None:
        for k, v in data.items():
            if not isinstance(v, Mapping) and not _is_table_list(v):
                lines.append(f"{_key(k)} = {_value(v)}")
        for k, v in data.items():
            if isinstance(v, Mapping):
                lines.append("")
                lines.append(f"[{prefix}{_key(k)}]")
                table(f"{prefix}{_key(k)}.", v)
            elif _is_table_list(v):
                for item in v:
                    lines.append("")
                    lines.append(f"[[{prefix}{_key(k)}]]")
                    table(f"{prefix}{_key(k)}.", item)

    table("", mapping)
    return "\n".join(lines) + "\n"


def dump_durably(mapping: Mapping[str, Any], path: Path) -> None:
    """Write ``mapping`` as TOML to ``path`` so that a crash leaves either the old file or the whole new one."""
    write_bytes_durably(dumps(mapping).encode(), path)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)
