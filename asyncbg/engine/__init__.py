"""The engine: the loop thread, jobs, tasks, the runner, consumers, schedules, the monitor and OS signals.

Nothing here imports Flask; the Flask glue (``asyncbg.extension``) wires it to apps.
"""
