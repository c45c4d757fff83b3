"""asyncbg's benchmarks: every figure measured in the same run as its baselines.

Run ``python -m benchmarks`` (full), ``--quick`` (about 3 minutes on 2 cores) or
``--smoke`` (seconds; the test suite runs it so that the harness cannot rot).
"""
