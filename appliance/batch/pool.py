"""Run series tasks in local worker processes, one series per process at a time.

The driver hands each worker one task and waits for its record, so it always knows which series a worker
holds: a worker that dies (killed, out of memory, a crashing decoder) has its series handed out again, up to
``retries`` times, after which the series is recorded as WORKER_CRASHED; a series running past its time budget
has its worker killed and is recorded as TIME_BUDGET_EXCEEDED (not retried: it would run as long again).
Workers are started fresh (spawn) and replaced after ``tasks_per_worker`` series, which bounds any growth;
each gets its share of the cores (native thread pools and ONNX Runtime), so N workers do not oversubscribe them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from typing import Any

from appliance.batch.discover import SeriesTask
from appliance.batch.task import failed_record, screen_series
from appliance.config import Settings

WORKER_CRASHED = "WORKER_CRASHED"
TIME_BUDGET_EXCEEDED = "TIME_BUDGET_EXCEEDED"
POLL_SECONDS = 0.5
# native thread pools read these when they load: a worker uses its share of the cores, not all of them
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

Done = Callable[[SeriesTask, dict[str, Any], int], None]


def worker_main(conn: Connection, settings: Settings, scratch_root: str | None, fault: str) -> None:
    """A worker process: screen each task it is sent and send back its record, until it is sent None."""
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the driver is gone: nothing to report to
            return
        if task is None:
            return
        conn.send(screen_series(task, settings, scratch_root, fault))


@dataclasses.dataclass
class _Slot:
    process: SpawnProcess
    conn: Connection
    task: SeriesTask | None = None
    started: float = 0.0
    done: int = 0

    def give(self, task: SeriesTask) -> None:
        self.task, self.started = task, time.monotonic()
        self.conn.send(task)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            with contextlib.suppress(OSError):  # a worker that died has no pipe to read from
                self.conn.send(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """Each worker's share of the CPU cores (at least one), so that N workers do not each start a thread per
    core and fight over them (Ray does the same for its one-CPU tasks)."""
    return max(1, (cpus or os.cpu_count() or 1) // max(1, workers))


@contextlib.contextmanager
def _thread_limits(threads: int) -> Iterator[None]:
    """The worker's environment while it starts (a spawned process inherits it): at most ``threads`` threads."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start(settings: Settings, scratch_root: str | None, fault: str, threads: int) -> _Slot:
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    process = ctx.Process(target=worker_main, args=(there, settings, scratch_root, fault), daemon=True,
                          name="appliance-batch-worker")
    with _thread_limits(threads):
        process.start()
    there.close()
    return _Slot(process, here)


def run_pool(tasks: Iterable[SeriesTask], settings: Settings, done: Done, *, workers: int, retries: int = 2,
             series_timeout: float = 600.0, tasks_per_worker: int = 50, scratch_root: str | None = None,
             fault: str = "") -> None:
    """Screen ``tasks`` in ``workers`` processes; ``done(task, record, attempts)`` is called for each series
    in the driver, as its record comes back (or as it is given up on, with a failure reason code)."""
    pending = collections.deque(tasks)
    workers = max(1, workers)
    threads = threads_per_worker(workers)
    if not settings.inference_threads:
        settings = dataclasses.replace(settings, inference_threads=threads)
    attempts: collections.Counter[str] = collections.Counter()
    slots: list[_Slot] = []
    try:
        while pending or any(s.task for s in slots):
            while len(slots) < workers and len(slots) < len(pending) + sum(1 for s in slots if s.task):
                slots.append(_start(settings, scratch_root, fault, threads))
            for slot in slots:
                if slot.task is None and pending:
                    slot.give(pending.popleft())
            busy = [s for s in slots if s.task is not None]
            wait([s.conn for s in busy] + [s.process.sentinel for s in busy], timeout=POLL_SECONDS)
            for slot in busy:
                if _collect(slot, pending, attempts, done, retries, series_timeout):
                    slots.remove(slot)
                    slot.stop(kill=slot.process.is_alive() and slot.task is not None)
                elif slot.task is None and slot.done >= tasks_per_worker:
                    slots.remove(slot)
                    slot.stop()
    finally:
        for slot in slots:
            slot.stop(kill=slot.task is not None)


def _collect(slot: _Slot, pending: collections.deque[SeriesTask], attempts: collections.Counter[str], done: Done,
             retries: int, series_timeout: float) -> bool:
    """Take a worker's answer if it has one; True when the worker is gone (crashed or killed for time)."""
    task = slot.task
    if task is None:
        return False
    uid = task.series_instance_uid
    if slot.conn.poll():
        try:
            record = slot.conn.recv()
        except (EOFError, OSError):
            record = None
        if record is not None:
            attempts[uid] += 1
            slot.task, slot.done = None, slot.done + 1
            done(task, record, attempts[uid])
            return False
    elif slot.process.is_alive():
        if time.monotonic() - slot.started <= series_timeout:
            return False
        attempts[uid] += 1
        done(task, failed_record(uid, TIME_BUDGET_EXCEEDED,
                                 f"The series took longer than its time budget of {series_timeout:.0f} s; "
                                 "its worker was stopped."), attempts[uid])
        return True
    attempts[uid] += 1  # the worker died with the series
    if attempts[uid] <= retries:
        pending.append(task)
    else:
        done(task, failed_record(uid, WORKER_CRASHED,
                                 f"The worker screening this series stopped abruptly {attempts[uid]} times "
                                 f"(exit code {slot.process.exitcode}); it was not tried again."), attempts[uid])
    slot.task = None
    return True
