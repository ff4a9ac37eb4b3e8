"""bandit finds no medium or high severity issue in the package.

Real findings are fixed; a false positive says why beside its `# nosec` (the B608 ones are SQL
built from fixed text, never a value: values are always bound as parameters).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bandit_reports_no_medium_or_high_issue(capsys):
    run = subprocess.run([sys.executable, "-m", "bandit", "-r", "appliance", "-q", "-f", "json"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.stdout, run.stderr
    doc = json.loads(run.stdout)
    assert not doc["errors"], doc["errors"]
    found = [r for r in doc["results"] if r["issue_severity"] in ("MEDIUM", "HIGH")]
    low = [r for r in doc["results"] if r["issue_severity"] == "LOW"]
    with capsys.disabled():
        print(f"\nbandit: {len(found)} medium/high, {len(low)} low")
    assert not found, [f"{r['filename']}:{r['line_number']}: {r['test_id']} {r['issue_text']}" for r in found]
