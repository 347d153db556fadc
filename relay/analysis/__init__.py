"""What analyzers see and what the relay records.

``hooks`` is the analyzer API (``FlowInfo``, ``Direction``, ``Verdict``,
``FlowEnd``) and the chain that runs analyzers on a flow; ``flowlog`` writes
one Zeek conn.log-like JSON line per finished flow; ``digest`` is the built-in
``StreamDigest`` analyzer (SHA-256 and length of each direction);
``dissect`` holds the sans-IO protocol dissectors (TLS with JA4/JA3, HTTP/1.x,
DNS, QUIC Initials) and content-based protocol detection.
"""
