"""``tunrelay run`` as a service: options and the per-queue relay (``run``),
the worker processes and their supervisor (``workers``), and the garbage
collector's counters (``gcstats``).
"""
