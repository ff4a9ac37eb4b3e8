"""kill -9 of the receiver during DCMTK sends and of the worker mid-job: nothing acknowledged is lost,
every series is analysed exactly once.

The bounded form of ``bench/kill_rounds.py`` (which runs 100 rounds): real processes (`appliance
dicom`, `appliance worker`) and DCMTK's storescu; the receiver is killed at random moments and
restarted, the sender re-sends what was not acknowledged, as a PACS would.
"""

import os
import random
import sys
from pathlib import Path

import pytest

from .test_dicom_receiver import needs_dcmtk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kill_rounds  # the bench script is the one implementation of the rounds

INSTANCES = int(os.environ.get("APPLIANCE_CRASH_TEST_INSTANCES", "1000"))
KILLS = int(os.environ.get("APPLIANCE_CRASH_TEST_KILLS", "3"))


@needs_dcmtk
@pytest.mark.slow
def test_kill_9_during_send_loses_no_acknowledged_instance(tmp_path):
    result = kill_rounds.receiver_rounds(tmp_path, KILLS, INSTANCES, random.Random(7))
    assert result == {"kills": KILLS, "acknowledged": INSTANCES, "lost": 0, "integrity": "ok"}


@pytest.mark.slow
def test_kill_9_of_the_worker_mid_job_still_gives_exactly_one_analysis(tmp_path):
    result = kill_rounds.worker_rounds(tmp_path, KILLS, random.Random(7))
    assert result["done"] == result["series"] == KILLS
    assert result["analyses per series"] == [1] and result["integrity"] == "ok"
    assert result["kills"] >= 1
