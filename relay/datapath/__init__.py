"""The data path: the packet loop, the flows it drives, and the TUN device.

``engine`` runs one packet loop per packet source and dispatches the stack's
events to one flow object per flow: ``tcpflow`` (a kernel TCP socket per
client connection), ``udpflow`` and ``echo`` (datagram flows, both built on
``datagram_flow`` and dispatched by ``datagrams``). ``env`` holds what they
share (the stack protocol, counters, flow environments), so no flow module
imports the engine. ``tun`` and ``vnet`` are the TUN device and its
virtio-net framing; ``packet_source`` is the interface the loop reads from.
"""
