"""A pure ACK at the right edge of our window is acceptable (regression test).

A client that filled the advertised window exactly sends pure ACKs with
SEQ == RCV.NXT + RCV.WND. If the first segment of that window was lost, every
later ACK from the client looks like that; dropping them (RFC 9293's strict
test) hid the client's acknowledgments and stalled the flow for good.
"""

from __future__ import annotations

from dataclasses import replace

from stack.seq import seq_sub
from stack.tcp.connection import State
from stack.wire.tcp import ACK, FIN, TcpOptions

from tcp_helpers import IRS, ISS, TEMPLATE, drain, established, recv, send


def test_pure_ack_at_the_window_edge_acknowledges_our_data() -> None:
    c = established()
    c.send(b"s" * 14600)
    assert sum(len(s.payload) for s in recv(c, 0.01)) == 14600
    wnd = c.rcv_adv - c.rcv_nxt
    data = b"c" * wnd
    for off in range(1460, wnd, 1460):  # the segment at RCV.NXT is lost
        send(c, replace(TEMPLATE, seq=IRS + 1 + off, payload=data[off : off + 1460]), 0.02)
    recv(c, 0.02)
    drain(c)
    send(c, replace(TEMPLATE, seq=IRS + 1 + wnd, ack=ISS + 1 + 14600), 0.03)
    assert c.snd_una == ISS + 1 + 14600
    # Beyond the edge stays unacceptable: only an ACK comes back, nothing moves.
    c.send(b"t" * 100)
    recv(c, 0.04)
    send(c, replace(TEMPLATE, seq=IRS + 2 + wnd, ack=ISS + 1 + 14700), 0.05)
    assert c.snd_una == ISS + 1 + 14600


def test_a_fin_just_past_a_full_window_leaves_later_acks_acceptable() -> None:
    # The peer fills our window exactly and sets FIN on its last segment, so the
    # FIN lies one past the window's right edge (Linux and BSD accept it, and so
    # do we). A negative window after it made every later segment at RCV.NXT
    # unacceptable: only header prediction still took ACKs, and an ACK it leaves
    # to the full path (here one with a SACK block) was dropped.
    c = established(options=TcpOptions(mss=1460, sack_permitted=True))
    assert c.sack_ok
    wnd = c.rcv_adv - c.rcv_nxt
    data = b"c" * wnd
    for off in range(0, wnd, 1460):
        chunk = data[off : off + 1460]
        last = off + len(chunk) == wnd
        flags = ACK | FIN if last else ACK
        send(c, replace(TEMPLATE, seq=IRS + 1 + off, flags=flags, payload=chunk), 0.01)
    assert c.state is State.CLOSE_WAIT
    assert c.rcv_nxt == IRS + 2 + wnd
    assert seq_sub(c.rcv_adv, c.rcv_nxt) >= 0  # the right edge moved up with the FIN
    drain(c)
    c.send(b"s" * 4380)
    assert sum(len(s.payload) for s in recv(c, 0.02)) == 4380
    sack = TcpOptions(sack_blocks=((ISS + 1 + 2920, ISS + 1 + 4380),))
    send(c, replace(TEMPLATE, seq=IRS + 2 + wnd, ack=ISS + 1 + 1460, options=sack), 0.03)
    assert c.snd_una == ISS + 1 + 1460
