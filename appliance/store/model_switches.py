"""Which classifiers a site has switched on: by model version, after its own evaluation, audited.

A classifier pack (``kind = "classifier"`` in its manifest) whose figures come from one source does not
carry to other scanners, so on a real deployment it is off until the site admin switches it on from the
admin page; that needs an operating point recorded by ``appliance evaluate --record`` on the site's own
cases for that exact version. Measurements (segmentation, Hounsfield-unit measures) are not switched.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

from appliance.errors import ApplianceError
from appliance.store.database import audit, inserted_id, utcnow, write_transaction


class NotEvaluatedHere(ApplianceError):
    """A classifier cannot be switched on before the site recorded its own evaluation of it."""


def operating_point_id(db: sqlite_utils.Database, model: str, model_version: str) -> int | None:
    """The id of the site's latest recorded operating point for this model version, if any."""
    row = db.execute("SELECT id FROM operating_points WHERE model = ? AND model_version = ? ORDER BY id DESC LIMIT 1",
                     [model, model_version]).fetchone()
    return None if row is None else int(row[0])


def switch(db: sqlite_utils.Database, model: str, model_version: str) -> dict[str, Any] | None:
    """The latest switch of this model version (``enabled``, who, when), or None when never switched."""
    row = db.execute("SELECT enabled, operating_point_id, switched_by, switched_at FROM model_switches "
                     "WHERE model = ? AND model_version = ? ORDER BY id DESC LIMIT 1",
                     [model, model_version]).fetchone()
    if row is None:
        return None
    return {"enabled": bool(row[0]), "operating_point_id": row[1], "switched_by": row[2], "switched_at": row[3]}


def is_switched_on(db: sqlite_utils.Database, model: str, model_version: str) -> bool:
    found = switch(db, model, model_version)
    return bool(found and found["enabled"])


def set_switch(db: sqlite_utils.Database, model: str, model_version: str, enabled: bool, actor: str) -> int:
    """Switch a classifier version on or off (audited); on needs the site's recorded evaluation of it."""
    with write_transaction(db):
        point = operating_point_id(db, model, model_version)
        if enabled and point is None:
            raise NotEvaluatedHere(
                f"{model} {model_version} has no evaluation recorded at this site: run `appliance evaluate "
                f"--model {model} DATA --record` on local cases first")
        table = db.table("model_switches")
        table.insert({"model": model, "model_version": model_version, "enabled": int(enabled),
                      "operating_point_id": point, "switched_by": actor, "switched_at": utcnow()})
        audit(db, actor, "classifier_switched_on" if enabled else "classifier_switched_off", model,
              version=model_version, operating_point_id=point)
        return inserted_id(table)
