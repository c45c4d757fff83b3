"""The backend contract suite: one set of tests every backend must pass."""
