"""The engine: loop thread, jobs, tasks, runner, consumers, schedules, monitor, OS signals.

Nothing here imports Flask; the Flask glue (``asyncbg.extension``) wires it to apps.
"""
