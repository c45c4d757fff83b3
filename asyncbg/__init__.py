"""asyncbg: a background asyncio loop for Flask apps.

Jobs, periodic jobs and queue consumers run on one event loop in a daemon
thread; views hand them work from any thread or event loop; shutdown drains
what it can, cancels the rest and reports.
"""

from __future__ import annotations

from .asgi import AsyncBGASGI
from .config import DEFAULT_CONFIG
from .engine.consumers import WorkQueue
from .engine.jobs import Job, JobStatus, Progress, TaskOptions, current_job
from .engine.loop import LoopFuture, LoopThread, ShutdownReport
from .engine.periodic import PeriodicJob
from .engine.tasks import Task
from .errors import (
    AsyncBGError,
    BackendError,
    BackendUnavailable,
    ConfigError,
    ConfigTypeError,
    JobCancelled,
    JobFailed,
    JobTimedOut,
    NotRunning,
    QueueFull,
    UnknownQueue,
)
from .extension import AsyncBG

__all__ = [
    "DEFAULT_CONFIG",
    "AsyncBG",
    "AsyncBGASGI",
    "AsyncBGError",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "ConfigTypeError",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobStatus",
    "JobTimedOut",
    "LoopFuture",
    "LoopThread",
    "NotRunning",
    "PeriodicJob",
    "Progress",
    "QueueFull",
    "ShutdownReport",
    "Task",
    "TaskOptions",
    "UnknownQueue",
    "WorkQueue",
    "current_job",
]

__version__ = "0.1.0"
