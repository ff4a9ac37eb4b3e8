"""Whether a model pack may run on this box: measurements always; classifiers when the site switched them on.

A classifier's evaluation may not hold on another source's scanners (the chest COVID-19 classifier scored
AUC 0.49 on slices from another source), so on a real deployment it stays off until the site admin switches
it on after ``appliance evaluate --record`` on the site's own cases. Demonstration mode (``make run``) runs
every pack with its banner.
"""

from __future__ import annotations

import sqlite_utils

from appliance.config import Settings
from appliance.inference.packs import ModelPack
from appliance.store.model_switches import is_switched_on


def why_off(pack: ModelPack, settings: Settings, db: sqlite_utils.Database) -> str | None:
    """None when ``pack`` may run here; else one sentence saying why it does not."""
    if pack.kind != "classifier" or settings.demonstration:
        return None
    if is_switched_on(db, pack.id, pack.version):
        return None
    return (f"classifier {pack.id} {pack.version} is off at this site: its evaluation may not hold on this "
            f"site's scanners; the admin can switch it on from the admin page after `appliance evaluate --model "
            f"{pack.id} DATA --record` on local cases")
