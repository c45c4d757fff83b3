"""``asyncbg.health.health_report(bg, max_lag=1.0)``: the health report of an
:class:`~asyncbg.AsyncBG`'s current app (or of a :class:`~asyncbg.engine.view.StateView`),
as :func:`asyncbg.web.health.health_report` makes it."""

from __future__ import annotations

from typing import Any

from .engine.view import StateView
from .extension import AsyncBG
from .web.health import health_report as _health_report

__all__ = ["health_report"]


def health_report(
    bg: AsyncBG | StateView, *, max_lag: float | None, detailed: bool = True
) -> tuple[bool, dict[str, Any]]:
    """Return ``(healthy, report)``; see :func:`asyncbg.web.health.health_report`.

    :raises RuntimeError: if ``bg`` is an AsyncBG with no app bound yet.
    """
    view = bg.state_view() if isinstance(bg, AsyncBG) else bg
    return _health_report(view, max_lag=max_lag, detailed=detailed)
