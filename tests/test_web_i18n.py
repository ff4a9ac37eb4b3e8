"""The French and Spanish catalogues cover every message of the screens and reports, placeholders intact."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

REPO = Path(__file__).resolve().parents[1]
CATALOGUES = REPO / "appliance" / "web" / "translations"
PLACEHOLDER = re.compile(r"%\(\w+\)[-#0 +]*\d*(?:\.\d+)?[sdf]|\{\w+\}")
# messages shown through a variable (roles, states, decisions), so extraction cannot see them
DYNAMIC = {"technician", "radiologist", "admin", "queued", "running", "done", "failed", "rejected", "confirmed",
           "upper", "middle", "lower"}


def _extracted() -> set[str]:
    method_map = [("appliance/web/**.py", "python"), ("appliance/outputs/report.py", "python"),
                  ("appliance/outputs/findings_text.py", "python"),
                  ("appliance/outputs/opacity_figures.py", "python"),
                  ("appliance/web/templates/**.html", "jinja2")]
    ids = set()
    for _file, _line, message, _comments, _context in extract_from_dir(
            REPO, method_map, keywords={"_": None, "gettext": None}, options_map={}):
        ids.add(message if isinstance(message, str) else message[0])
    return ids | DYNAMIC


@pytest.mark.parametrize("language", ["fr", "es"])
def test_catalogue_translates_every_message(language):
    with open(CATALOGUES / language / "LC_MESSAGES" / "messages.po", "rb") as f:
        catalog = read_po(f)
    translated = {m.id: m.string for m in catalog if m.id}
    missing = sorted(i for i in _extracted() if not translated.get(i))
    assert not missing, f"{language}: untranslated: {missing}"
    for msgid, text in translated.items():
        assert sorted(PLACEHOLDER.findall(msgid)) == sorted(PLACEHOLDER.findall(text)), (language, msgid)
