"""A hostile out-of-order flood: one-byte segments with a hole between each.

Each would be a run of its own in the out-of-order queue; the work per segment
(placing it, and choosing the SACK blocks of its duplicate ACK) must not grow
with the runs held, and the queue holds at most ``ooo_max_runs`` runs and
``ooo_limit`` bytes charged (RFC 9293 3.10.7.4: what is not kept is loss).
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from stack.config import TcpConfig
from stack.events import DataReceived
from stack.tcp.connection import TcpConnection
from stack.tcp.reassembly import RUN_OVERHEAD
from stack.tcp.segment import TcpSegment
from stack.wire.tcp import TcpOptions

from tcp_helpers import IRS, TEMPLATE, drain, established, recv, send

STREAM = bytes(range(251)) * 300  # 75,300 bytes, period 251: misplaced bytes show
FLOOD = 32_000
CFG = TcpConfig(rcv_buf=4 << 20, rcv_buf_initial=4 << 20, time_wait=2.0)


def _data(off: int, payload: bytes) -> TcpSegment:
    return replace(TEMPLATE, seq=IRS + 1 + off, payload=payload)


def _flood(c: TcpConnection, n: int) -> float:
    """Offsets 2, 4, ... 2n, one byte each, ACKs collected every 64 segments;
    returns the CPU seconds it took."""
    t0 = time.process_time()
    for i in range(1, n + 1):
        off = 2 * i
        c.receive_segment(_data(off, STREAM[off : off + 1]), 0.1)
        if i % 64 == 0:
            recv(c, 0.1)
    recv(c, 0.1)
    return time.process_time() - t0


def _refill(c: TcpConnection, end: int) -> bytes:
    """The sender repairs: the whole stream again in 1000-byte segments."""
    for off in range(0, end, 1000):
        send(c, _data(off, STREAM[off : min(off + 1000, end)]), 0.2)
        recv(c, 0.2)
    return b"".join(e.data for e in drain(c) if isinstance(e, DataReceived))


@pytest.mark.parametrize("sack", [True, False], ids=["sack", "no-sack"])
def test_flood_of_one_byte_runs_is_capped_cheap_and_recovers(sack: bool) -> None:
    c = established(config=CFG, options=TcpOptions(wscale=7, sack_permitted=sack))
    assert c.sack_ok is sack
    assert (c.rcv_adv - c.rcv_nxt) & 0xFFFFFFFF > 2 * FLOOD  # all in the window
    cpu = _flood(c, FLOOD)
    q = c._ooo  # white-box: what the queue holds
    assert len(q) == CFG.ooo_max_runs and q.dropped == FLOOD - CFG.ooo_max_runs
    assert q.charged == CFG.ooo_max_runs * (1 + RUN_OVERHEAD) <= q.limit
    assert cpu < 1.0, f"{FLOOD} out-of-order segments took {cpu:.2f} s of CPU"
    # The holes filled (dropped bytes included): byte-exact, nothing left held.
    end = 2 * FLOOD + 1
    assert _refill(c, end) == STREAM[:end]
    assert not q and q.size == q.charged == 0


def test_sack_blocks_stay_right_under_a_flood() -> None:
    c = established(config=CFG, options=TcpOptions(wscale=7, sack_permitted=True))
    _flood(c, 2000)
    # The most recent arrival that was kept goes first, then the highest runs.
    send(c, _data(2 * 10, STREAM[20:22]), 0.3)  # extends the run at offset 20
    (dup,) = recv(c, 0.3)
    top = 2 * CFG.ooo_max_runs
    want = ((20, 23), (top, top + 1), (top - 2, top - 1), (top - 4, top - 3))
    assert dup.options.sack_blocks == tuple((IRS + 1 + a, IRS + 1 + b) for a, b in want)


def test_truesize_limit_binds_before_the_run_cap() -> None:
    # 64 KiB of buffer: a one-byte run is charged 1 + RUN_OVERHEAD, so about 250
    # fit, far fewer than the 32,000 one-byte payloads that would.
    cfg = TcpConfig(rcv_buf=64 * 1024, time_wait=2.0)
    c = established(config=cfg, options=TcpOptions(sack_permitted=True))
    _flood(c, 5000)
    q = c._ooo
    assert len(q) == q.limit // (1 + RUN_OVERHEAD) and q.charged <= q.limit
    assert q.dropped == 5000 - len(q)
    end = 2 * 5000 + 1
    assert _refill(c, end) == STREAM[:end]
