"""The plain records that cross the seam between the engine and a backend.

A :class:`JobRecord` is what a backend stores of a job: JSON text and plain
values only, so it can live in a SQLite row, a PostgreSQL row or a Redis hash.
The live :class:`~asyncbg.Job` handle (waiting, callbacks, the asyncio task)
stays in the process that holds it. No Flask import, no asyncio.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

__all__ = [
    "FINAL_STATUSES",
    "CancelResult",
    "Claim",
    "DictShape",
    "JobPage",
    "JobQuery",
    "JobRecord",
    "Lease",
    "LeaseState",
    "NodeRecord",
    "Outcome",
    "RenewResult",
    "Take",
    "decode_json",
    "encode_arguments",
    "encode_json",
]

#: The status values (``JobStatus`` values) after which a job never changes.
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timed_out"})


def encode_json(value: Any, what: str) -> str:
    """Return ``value`` as compact JSON text.

    :raises TypeError: naming ``what`` when JSON cannot hold the value (a set,
        bytes, an object, NaN or an infinity: JSON has no such number).
    """
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what} must be JSON (str, int, float, bool, None, lists and dicts of them): {exc}"
        ) from None


def decode_json(text: str | None) -> Any:
    """Return the value of JSON ``text`` (None for None)."""
    return None if text is None else json.loads(text)


def encode_arguments(args: Sequence[Any], kwargs: dict[str, Any], task: str) -> str:
    """Return a job's arguments as the JSON text a :class:`JobRecord` stores.

    :raises TypeError: when an argument is not JSON, naming the task.
    """
    return encode_json({"args": list(args), "kwargs": kwargs}, f"the arguments of {task!r}")


class DictShape(TypedDict, total=False):
    """What a job's dict includes: ``include_result`` (default True) its result,
    ``include_error`` (default: as ``include_result``) its error as
    ``"Type: message"``, ``include_args`` (default False) its ``args`` and
    ``kwargs`` (None once no longer known)."""

    include_result: bool
    include_error: bool | None
    include_args: bool


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as a backend stores it. Times are seconds since the epoch.

    ``queue`` is the lane workers claim from (a task's name, or the queue of a
    consumer: an item is a job of its consumer); ``task`` names the registered
    callable that runs it. ``token`` grows with every claim and fences the
    claim's writes; ``owner`` is the node holding the claim (None when queued).
    ``args_json`` is None once the arguments are no longer known (a live job
    drops them when it finishes).
    """

    id: str
    queue: str
    task: str
    args_json: str | None = '{"args":[],"kwargs":{}}'
    status: str = "pending"
    attempts: int = 0
    max_attempts: int = 1
    token: int = 0
    owner: str | None = None
    key: str | None = None
    created_at: float = field(default_factory=time.time)
    run_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    lease_until: float | None = None
    progress_done: float | None = None
    progress_total: float | None = None
    progress_message: str | None = None
    result_json: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    timeout: float | None = None

    @property
    def final(self) -> bool:
        """True once the job is succeeded, failed, cancelled or timed out."""
        return self.status in FINAL_STATUSES

    def arguments(self) -> tuple[list[Any], dict[str, Any]]:
        """Return ``(args, kwargs)`` decoded from :attr:`args_json` (empty when unknown)."""
        if self.args_json is None:
            return [], {}
        data = json.loads(self.args_json)
        return list(data.get("args", [])), dict(data.get("kwargs", {}))

    def replace(self, **changes: Any) -> JobRecord:
        """Return a copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self, **shape: Unpack[DictShape]) -> dict[str, Any]:
        """A JSON-safe dict of the record, in the shape ``GET /jobs`` answers with
        (see :class:`DictShape` for what to include)."""
        include_result = shape.get("include_result", True)
        include_error = shape.get("include_error")
        include_args = shape.get("include_args", False)
        data: dict[str, Any] = {
            "id": self.id,
            "name": self.task,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration": (
                None
                if self.started_at is None
                else (self.finished_at or time.time()) - self.started_at
            ),
            "attempts": self.attempts,
            "progress": self._progress(),
        }
        if self.owner is not None:
            data["owner"] = self.owner
        if include_result:
            data["result"] = decode_json(self.result_json) if self.status == "succeeded" else None
        if include_result if include_error is None else include_error:
            data["error"] = self.error
        if include_args:
            if self.args_json is None:
                data["args"] = data["kwargs"] = None
            else:
                data["args"], data["kwargs"] = self.arguments()
        return data

    def _progress(self) -> dict[str, Any] | None:
        if self.progress_done is None:
            return None
        done, total = self.progress_done, self.progress_total
        fraction = (
            None
            # As Progress.fraction: no total or a zero one has no fraction.
            if not total or not math.isfinite(total)
            else max(0.0, min(1.0, done / total))
        )
        return {
            "done": done,
            "total": total,
            "message": self.progress_message,
            "fraction": fraction,
        }


@dataclass(frozen=True, slots=True)
class Take:
    """Records of an enqueue that its caller claims as they are stored (the
    enqueue is their claim, one statement fewer): ``ids`` taken for ``owner``
    with a lease of ``lease`` seconds on the backend's clock."""

    owner: str
    lease: float
    ids: frozenset[str]

    def stored(self, records: Iterable[JobRecord | None]) -> list[JobRecord]:
        """The records among an enqueue's answer ``records`` that it stored
        taken (running for :attr:`owner`, token 1), not existing ones that
        idempotency answered."""
        return [
            r
            for r in records
            if r is not None
            and r.id in self.ids
            and r.status == "running"
            and r.owner == self.owner
            and r.token == 1
        ]


@dataclass(frozen=True, slots=True)
class Claim:
    """A node's hold on one job: fenced writes name (id, owner, token)."""

    id: str
    owner: str
    token: int
    record: JobRecord


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended: a final status and its result (JSON) or error."""

    status: str
    result_json: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status not in FINAL_STATUSES:
            raise ValueError(f"an outcome is final, not {self.status!r}")


@dataclass(frozen=True, slots=True)
class RenewResult:
    """What a renewal found: claims still held, claims lost to another node
    (or to expiry), and held claims whose job someone asked to cancel."""

    kept: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()
    cancel_requested: tuple[str, ...] = ()


class CancelResult:
    """What :meth:`Backend.cancel` did, as one of these strings."""

    CANCELLED = "cancelled"  #: it was queued: now final, it never starts
    REQUESTED = "requested"  #: it is running: its owner cancels it at its next renewal
    FINAL = "final"  #: it had already finished
    UNKNOWN = "unknown"  #: no such job (or forgotten)


@dataclass(frozen=True, slots=True)
class JobQuery:
    """A filter and a page for :meth:`Backend.query` (newest first)."""

    statuses: frozenset[str] | None = None
    task: str | None = None
    offset: int = 0
    limit: int = 50


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of records and how many match in all."""

    records: tuple[JobRecord, ...]
    total: int


@dataclass(frozen=True, slots=True)
class Lease:
    """Leadership of one periodic schedule: held by ``owner`` until
    ``expires_at``; ``epoch`` grows with every new holder and fences slots."""

    name: str
    owner: str
    epoch: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class LeaseState:
    """The stored lease row of one periodic schedule, as :meth:`Backend.leases`
    reads it, whoever holds it.

    ``owner`` and ``expires_at`` are None once the lease was released; a lease
    that ran out keeps its last owner and an ``expires_at`` in the past (compare
    it with the time: :attr:`live`). ``epoch`` is the last one granted: it
    survives a release, so the next holder's is higher.
    """

    name: str
    owner: str | None
    epoch: int
    expires_at: float | None

    def live(self, now: float) -> bool:
        """True while someone holds the lease at ``now`` (seconds since the epoch)."""
        return self.owner is not None and self.expires_at is not None and self.expires_at > now


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One process of the app, as its heartbeats describe it.

    A node id is host + pid + a random incarnation, so a restarted process
    never inherits a dead one's claims.
    """

    id: str
    host: str
    pid: int
    started_at: float
    last_seen: float = 0.0
    running: int = 0
    lag: float | None = None
