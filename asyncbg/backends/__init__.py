"""Where job state is kept: the :class:`~asyncbg.backends.base.Backend` protocol and one module per engine."""
