"""Run series tasks on a Ray cluster (``appliance[scale]``): the same task function as the local pool, as Ray
remote tasks of one CPU each, reading the series' files from a path every node sees.

Ray retries a task whose worker or node died (``max_retries``); a task that still cannot finish is recorded as
WORKER_CRASHED, one over its time budget is cancelled and recorded as TIME_BUDGET_EXCEEDED. At most as many
tasks as the cluster has CPUs are in flight, so a task's time is counted from when it can start.
Progress comes back with each finished task (``ray.wait``), no dashboard needed.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterable
from typing import Any

from appliance.batch.discover import SeriesTask
from appliance.batch.pool import TIME_BUDGET_EXCEEDED, WORKER_CRASHED, Done
from appliance.batch.task import failed_record, screen_series
from appliance.config import Settings
from appliance.errors import ApplianceError

# what one worker holds for a 600-slice study (bench/memory_600.py: about 2x the int16 volume, plus models)
TASK_MEMORY_BYTES = int(1.5 * 1024**3)
WAIT_SECONDS = 1.0
CONNECT_SECONDS = 5.0


class RayUnavailable(ApplianceError):
    """Ray is not installed, or the cluster cannot be reached."""


def ray_module() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable("RAY_UNAVAILABLE: --ray needs Ray: pip install 'ct-screening-appliance[scale]'") from exc
    return ray


def reachable(address: str, timeout: float = CONNECT_SECONDS) -> bool:
    """Whether ``HOST:PORT`` accepts a connection (Ray itself keeps retrying an unreachable head for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return True  # "auto" or a form Ray resolves itself
    try:
        with socket.create_connection((host.removeprefix("ray://"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def connect(address: str) -> Any:
    """Join the cluster at ``address`` (``auto``: the one started on this machine with ``ray start``)."""
    ray = ray_module()
    if not ray.is_initialized():
        if not reachable(address):
            raise RayUnavailable(f"RAY_UNAVAILABLE: nothing answers at {address}: start the cluster with "
                                 "`ray start --head` there, or use --ray auto on its head node.")
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError by case
            raise RayUnavailable(f"RAY_UNAVAILABLE: cannot reach the Ray cluster at {address}: {exc}") from exc
    return ray


def run_ray(tasks: Iterable[SeriesTask], settings: Settings, done: Done, *, address: str, retries: int = 2,
            series_timeout: float = 600.0, gpus_per_task: float = 0.0, fault: str = "") -> int:
    """Screen ``tasks`` on the cluster; ``done`` is called in the driver as each series comes back.
    Returns the number of CPUs the cluster offered."""
    ray = connect(address)
    capacity = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if not settings.inference_threads:  # a task has one CPU: ONNX Runtime uses one thread, as Ray's OMP_NUM_THREADS
        settings = dataclasses.replace(settings, inference_threads=1)
    remote = ray.remote(screen_series).options(num_cpus=1, num_gpus=gpus_per_task, memory=TASK_MEMORY_BYTES,
                                                max_retries=retries, retry_exceptions=False)
    pending = list(tasks)
    pending.reverse()
    running: dict[Any, tuple[SeriesTask, float]] = {}
    while pending or running:
        while pending and len(running) < capacity:
            task = pending.pop()
            running[remote.remote(task, settings, None, fault)] = (task, time.monotonic())
        ready, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_SECONDS)
        for ref in ready:
            task, _started = running.pop(ref)
            done(task, _result(ray, ref, task, retries), 1)
        for ref, (task, started) in list(running.items()):
            if time.monotonic() - started > series_timeout:
                ray.cancel(ref, force=True)
                running.pop(ref)
                done(task, failed_record(task.series_instance_uid, TIME_BUDGET_EXCEEDED,
                                         f"The series took longer than its time budget of {series_timeout:.0f} s; "
                                         "its task was cancelled."), 1)
    return capacity


def _result(ray: Any, ref: Any, task: SeriesTask, retries: int) -> dict[str, Any]:
    try:
        return dict(ray.get(ref))
    except ray.exceptions.RayError as exc:  # the worker or node died more than max_retries times
        return failed_record(task.series_instance_uid, WORKER_CRASHED,
                             f"The worker screening this series stopped abruptly {retries + 1} times "
                             f"({type(exc).__name__}); it was not tried again.")
