"""The HTTP surface: the blueprint (jobs, control, the page), its access rules, health and metrics.

It reads the state through :class:`asyncbg.engine.view.StateView`, never the extension.
"""
