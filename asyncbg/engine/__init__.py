"""The engine: the loop thread and everything that runs on it. Nothing here imports Flask;
the Flask glue (``asyncbg.extension``) wires it to apps.

Where a job is...

- created, checked and run: :mod:`.runner` (``JobRunner.create`` / ``submit`` /
  ``_start`` / ``_execute``), its arguments checked by :mod:`.arguments`;
- held while live: :mod:`.jobs` (the ``Job`` handle and ``JobHistory``); its
  plain records, which cross the backend seam: :mod:`.records`;
- declared: :mod:`.tasks` (``Task``, ``TaskOptions``);
- scheduled: :mod:`.triggers` (when the next run is due) and :mod:`.periodic`
  (timers, overlap, statistics, the host lock of :mod:`.host_lock`);
- consumed from a queue: :mod:`.consumers`;
- counted: :mod:`.stats`; watched: :mod:`.monitor`;
- shut down: :mod:`.loop` (the loop thread, its stop and report) and
  :mod:`.os_signals`; reset in a forked child: :mod:`.after_fork`.

Failures are logged through :mod:`.logthrottle`; served values made JSON-safe
by :mod:`.jsonsafe`.
"""
