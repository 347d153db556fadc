"""Test and demo tooling, never on the data path: client -> gateway -> server
network namespaces (``topology``), a wire namespace that impairs a link
(``impair``), a command runner inside a namespace (``nsexec``), the demo
(``demo``, ``demo_analyzer``) and analyzers that misbehave on purpose for the
isolation tests (``analyzers``).
"""
