"""A pure ACK at the right edge of our window is acceptable (regression test).

A client that filled the advertised window exactly sends pure ACKs with
SEQ == RCV.NXT + RCV.WND. If the first segment of that window was lost, every
later ACK from the client looks like that; dropping them (RFC 9293's strict
test) hid the client's acknowledgments and stalled the flow for good.
"""

from __future__ import annotations

from dataclasses import replace

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
