"""Languages of the UI and reports: English, French, Spanish (Flask-Babel).

The catalogues are kept as ``.po`` text in the package and compiled into the
data directory when the app starts, so no binary catalogue is ever stale.
"""

from __future__ import annotations

from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from flask import current_app, g, request, session

LANGUAGES = {"en": "English", "fr": "Français", "es": "Español"}
SOURCE = Path(__file__).parent / "translations"


def compile_catalogues(target: Path) -> Path:
    """Compile every ``<lang>/LC_MESSAGES/messages.po`` under the package into ``target``; returns it."""
    for po in SOURCE.glob("*/LC_MESSAGES/messages.po"):
        mo = target / po.relative_to(SOURCE).with_suffix(".mo")
        if mo.exists() and mo.stat().st_mtime >= po.stat().st_mtime:
            continue
        mo.parent.mkdir(parents=True, exist_ok=True)
        with open(po, "rb") as f:
            catalog = read_po(f)
        tmp = mo.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            write_mo(f, catalog)
        tmp.replace(mo)
    return target


def select_locale() -> str:
    """The signed-in user's choice, else the browser's preference, else the site's language."""
    chosen = session.get("lang") or (g.get("user") or {}).get("language")
    if chosen in LANGUAGES:
        return chosen
    return request.accept_languages.best_match(list(LANGUAGES)) or current_app.config["SITE_LANGUAGE"]
