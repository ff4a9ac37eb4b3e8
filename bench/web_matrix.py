"""Web UI matrix: every route x role x method with hostile values, and every POST without its CSRF token.

Builds a throw-away data directory with one analysed synthetic study and one quarantined file, signs in
as each role (anonymous, technician, radiologist, admin) and prints, per route and method, the status
codes each role got and the 5xx seen; then the CSRF figure. Exit status 1 on any 5xx, any POST without
a token not refused, or any state changed by one. The same run is tests/test_web_matrix.py.

    python bench/web_matrix.py [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers beside the package

from appliance.jobs.intake import analyze_paths
from appliance.synth.writer import SynthOptions, write_series
from appliance.web import create_app
from tests.web_helpers import csrf, login, make_accounts, web_settings
from tests.web_matrix import run_matrix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        series = Path(tmp) / "series"
        write_series(series, SynthOptions(slices=40, size=128, seed=3))
        settings = web_settings(Path(tmp))
        analyze_paths([series], settings)
        make_accounts(settings.home_path)
        app = create_app(settings, environ={})
        client = app.test_client()
        login(client, "tech")
        client.post("/import/upload", data={"files": [(io.BytesIO(b"not dicom"), "notes.txt")],
                                            "csrf_token": csrf(client, "/import")}, content_type="multipart/form-data")
        matrix = run_matrix(app, settings.home_path)
    print(matrix.table())
    print()
    print(matrix.summary())
    for o in matrix.server_errors[:20]:
        print(f"5xx: {o.method} {o.url[:120]} as {o.role}: {o.status}")
    if args.json:
        print(json.dumps({"routes": matrix.routes, "requests": len(matrix.outcomes),
                          "server_errors": len(matrix.server_errors), "csrf_refused": len(matrix.csrf_refused),
                          "csrf_missed": len(matrix.csrf_missed), "state_changed": matrix.state_changed}))
    return 1 if matrix.server_errors or matrix.csrf_missed or matrix.state_changed else 0


if __name__ == "__main__":
    sys.exit(main())
