"""The standing reliability and security suite: every attack and crash the appliance must survive, one report.

    python bench/reliability.py            # bounded: 500 mutants, 3 kill -9 rounds (what `make test` covers)
    python bench/reliability.py --full     # 10,000 mutants, 100 kill -9 rounds

Runs, each in its own process: hostile files and archives (bench/fuzz_import.py), receiver abuse
(bench/receiver_abuse.py), kill -9 rounds of the receiver and the worker (bench/kill_rounds.py), the web
matrix of every route x role x method and CSRF on every POST (bench/web_matrix.py), the exposure of each
systemd unit (systemd-analyze security) and bandit on the package. Prints each part's own table, then
one summary table; exits 1 when any part falls short of its goal.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPOSURE_GOAL = 3.0


def _run(title: str, command: list[str]) -> tuple[str, bool, float, str]:
    t0 = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    print(f"\n## {title}\n`{' '.join(command[1:])}` ({seconds:.0f} s, exit {run.returncode})\n")
    print(run.stdout.rstrip() or run.stderr[-2000:])
    last = next((line for line in reversed(run.stdout.splitlines()) if line.strip()), "")
    return title, run.returncode == 0, seconds, last


def _exposure() -> tuple[str, bool, float, str]:
    """systemd-analyze security --offline of every unit, as the tests render them."""
    sys.path.insert(0, str(REPO))
    from appliance import systemd_units

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return "systemd exposure", True, 0.0, "skipped: systemd-analyze not installed"
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        written = systemd_units.install(Path(tmp), user="appliance", home=Path("/var/lib/appliance"),
                                        venv=Path(sys.prefix), engines=Path(tmp))
        for unit in sorted(p for p in written if p.suffix == ".service"):
            run = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True)
            found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", run.stdout + run.stderr)
            scores[unit.stem] = float(found.group(1)) if found else float("nan")
    print("\n## systemd exposure (systemd-analyze security --offline)\n")
    print("| unit | exposure |\n|---|---|")
    for name, score in scores.items():
        print(f"| {name} | {score:.1f} |")
    worst = max(scores.values())
    return "systemd exposure", worst <= EXPOSURE_GOAL, 0.0, f"worst {worst:.1f} (goal <= {EXPOSURE_GOAL})"


def _bandit() -> tuple[str, bool, float, str]:
    run = subprocess.run([sys.executable, "-m", "bandit", "-r", "appliance", "-q", "-ll"], capture_output=True,
                         text=True, cwd=REPO)
    issues = len(re.findall(r">> Issue:", run.stdout))
    print(f"\n## bandit (medium and high)\n\n{issues} issue(s)")
    return "bandit", issues == 0, 0.0, f"{issues} medium/high issue(s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="10,000 mutants and 100 kill -9 rounds")
    args = parser.parse_args(argv)
    py = sys.executable
    mutants, rounds = ("10000", "100") if args.full else ("500", "3")
    parts = [
        _run("hostile files and archives", [py, "bench/fuzz_import.py", "--mutants", mutants]),
        _run("receiver abuse", [py, "bench/receiver_abuse.py"]),
        _run("kill -9 rounds", [py, "bench/kill_rounds.py", "--rounds", rounds]),
        _run("web matrix and CSRF", [py, "bench/web_matrix.py"]),
        _exposure(),
        _bandit(),
    ]
    print("\n## summary\n\n| part | goal met | seconds | last figure |\n|---|---|---|---|")
    for title, ok, seconds, last in parts:
        print(f"| {title} | {'yes' if ok else 'NO'} | {seconds:.0f} | {last.strip('| ')[:150]} |")
    return 0 if all(ok for _, ok, _, _ in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
