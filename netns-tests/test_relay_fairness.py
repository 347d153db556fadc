"""Per-client quotas and admission under abuse, through a real `tunrelay run`.

(a) One client holding its full pending quota toward a silent address does not
    stop a second client (a second address in the client namespace) from
    connecting and downloading.
(b) A SYN flood of at least ``FLOOD_RATE`` SYN/s for ``FLOOD_SECONDS`` from
    spoofed client-network addresses toward a silent address: a legitimate
    1 MiB download finishes within ``DOWNLOAD_LIMIT`` s during it, the relay's
    RSS grows by less than ``RSS_GROWTH_LIMIT_KIB``, and the SYNs that reach the
    silent address (an nftables counter in the server namespace) stay under the
    bound the pending share per destination gives.
(c) 300 SYNs whose SYN-ACKs are never answered (spoofed addresses nobody owns)
    leave no established connection at the target once ``--synrecv-timeout``
    has passed (``ss`` in the server namespace).
(d) UDP flows from many addresses of one IPv6 /64 are held to the client's quota.

Spoofed packets are prebuilt and written with one AF_PACKET socket in the
client namespace straight to the gateway's MAC, only to 198.18.x / fd00:: lab
addresses; every loop is bounded in count and time.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from collections.abc import Callable

from pyroute2 import IPRoute

from relay.host import netns
from relay.lab.topology import Topology, add_address
from stack.wire.tcp import SYN, build_tcp_packet
from stack.wire.udp import build_udp_packet

from relay_harness import MIB, RelayProcess, run_in

SILENT_V4 = "198.18.2.9"  # on the server's link; nftables drops all that comes to it
SECOND_CLIENT_V4 = "198.18.1.3"
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD

FLOOD_RATE = 10_000  # SYN/s, at least
FLOOD_SECONDS = 10.0
CONNECT_TIMEOUT = 3.0  # the relay's --connect-timeout in (b)
SYNS_PER_CONNECT = 3  # a kernel connect() sends SYNs at 0, 1 and 3 s within 3 s
PENDING_PER_DESTINATION = 256  # StackConfig.max_pending_per_destination's default
DOWNLOAD_LIMIT = 3.0
RSS_GROWTH_LIMIT_KIB = 16 * 1024


# --- lab helpers -------------------------------------------------------------------------


def gateway_client_mac(topo: Topology) -> bytes:
    ipr = netns.ipr(topo.gw)
    try:
        (link,) = ipr.link("get", ifname=topo.gw_cli_if)
        return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
    finally:
        ipr.close()


def add_addresses(topo: Topology, ns: str, ifname: str, cidrs: list[str]) -> None:
    ipr: IPRoute = netns.ipr(topo.ns(ns))
    try:
        (index,) = ipr.link_lookup(ifname=ifname)
        for cidr in cidrs:
            add_address(ipr, index, cidr)
    finally:
        ipr.close()


def silence(topo: Topology, address: str) -> None:
    """``address`` on the server's link, where nftables counts its SYNs and drops all."""
    add_addresses(topo, "srv", topo.srv_if, [f"{address}/24"])
    for cmd in (
        "add table inet fair",
        "add chain inet fair input { type filter hook input priority 0 ; }",
        f"add rule inet fair input ip daddr {address} tcp flags & (syn | ack) == syn counter",
        f"add rule inet fair input ip daddr {address} drop",
    ):
        out = run_in(topo, "srv", ["nft", *cmd.split()])
        assert out == "", f"nft {cmd}: {out}"


def silent_syns(topo: Topology) -> int:
    """SYNs that reached the silent address: the relay's upstream connect attempts."""
    text = run_in(topo, "srv", ["nft", "list", "chain", "inet", "fair", "input"])
    m = re.search(r"syn,ack counter packets (\d+)", text)
    assert m, text
    return int(m.group(1))


def syn_sent(topo: Topology, address: str, ns: str = "cli") -> int:
    """Sockets in namespace ``ns`` still connecting to ``address`` (SYN-SENT)."""
    out = run_in(topo, ns, ["ss", "-Htn", "state", "syn-sent", "dst", address])
    return len([ln for ln in out.splitlines() if ln.strip()])


def raw_sender(topo: Topology) -> tuple[socket.socket, tuple[str, int, int, int, bytes]]:
    """An AF_PACKET socket in the client namespace and the gateway's address for it."""
    with netns.entered(topo.cli):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    topo.defer(sock.close)
    return sock, (topo.cli_if, ETH_P_IP, 0, 0, gateway_client_mac(topo))


def send_all(topo: Topology, packets: list[bytes], ethertype: int = ETH_P_IP) -> None:
    sock, addr = raw_sender(topo)
    target = (addr[0], ethertype, 0, 0, addr[4])
    for packet in packets:
        sock.sendto(packet, target)


def spoofed_syns(n: int, dst: str, dport: int, first_host: int, hosts: int) -> list[bytes]:
    rng = random.Random(n)
    out = []
    for i in range(n):
        src = socket.inet_aton(f"198.18.1.{first_host + i % hosts}")
        sport = 1024 + rng.randrange(60000)
        out.append(
            build_tcp_packet(
                src, socket.inet_aton(dst), sport, dport, rng.getrandbits(32), 0, SYN, 64240
            )
        )
    return out


def stack_counter(relay: RelayProcess, name: str) -> int:
    """A refusal count from the relay's latest stats line (``--stats-interval``)."""
    lines = [ln for ln in relay.log_text().splitlines() if "refused={" in ln]
    assert lines, relay.log_tail()
    m = re.search(rf"'{name}': (\d+)", lines[-1])
    assert m, lines[-1]
    return int(m.group(1))


def serve_downloads(topo: Topology, size: int, count: int) -> tuple[int, threading.Thread]:
    """A server in the server namespace sending ``size`` bytes to each of ``count``
    connections (in a thread, bounded by socket timeouts)."""
    lsock = topo.socket("srv")
    lsock.bind((topo.srv_v4, 0))
    lsock.listen(16)
    lsock.settimeout(30.0)
    payload = b"d" * size

    def run() -> None:
        for _ in range(count):
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30.0)
                conn.sendall(payload)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return lsock.getsockname()[1], thread


def download(topo: Topology, port: int, source: str | None = None) -> tuple[int, float]:
    """Connect (from ``source`` if given) and read to EOF: (bytes, seconds)."""
    sock = topo.socket("cli")
    sock.settimeout(15.0)
    if source is not None:
        sock.bind((source, 0))
    t0 = time.monotonic()
    sock.connect((topo.srv_v4, port))
    got = 0
    while chunk := sock.recv(1 << 16):
        got += len(chunk)
    sock.close()
    return got, time.monotonic() - t0


# --- (a) ---------------------------------------------------------------------------------


def test_a_client_at_its_pending_quota_does_not_block_another(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    silence(topology, SILENT_V4)
    add_addresses(topology, "cli", topology.cli_if, [f"{SECOND_CLIENT_V4}/24"])
    # A small pool so the test is cheap: without the quota, the first client's
    # 64 requests would take all 48 pending slots and the second one's SYN would
    # be dropped.
    relay = start_relay(
        args=["--max-pending", "48", "--client-pending", "16", "--stats-interval", "0.5"]
    )
    relay.spoofed_nets = ("198.18.1.0/24", "fd00:1::/64")
    port, server = serve_downloads(topology, MIB, 1)
    hogs = []
    for _ in range(64):
        s = topology.socket("cli")
        s.setblocking(False)
        s.bind((topology.cli_v4, 0))
        s.connect_ex((SILENT_V4, 9))
        hogs.append(s)
    # The relay has them all (16 pending, the older 48 reset) once only 16 are still
    # connecting here; at most 1 s, as a fixed wait gave it.
    deadline = time.monotonic() + 1.0
    while syn_sent(topology, SILENT_V4) > 16 and time.monotonic() < deadline:
        time.sleep(0.02)
    got, seconds = download(topology, port, source=SECOND_CLIENT_V4)
    server.join(timeout=10)
    print(f"\n[fairness a] the second client downloaded {got} B in {seconds:.2f} s")
    assert got == MIB
    assert seconds < DOWNLOAD_LIMIT, relay.log_tail()
    # The first client's oldest requests were reset to make room for its newest.
    refused = [s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) for s in hogs]
    assert refused.count(111) >= 64 - 16 - 1, refused  # ECONNREFUSED: our RST
    deadline = time.monotonic() + 0.6  # a stats line (--stats-interval 0.5) counts them
    while time.monotonic() < deadline:
        if "refused={" in relay.log_text() and stack_counter(relay, "pending") >= 64 - 16:
            break
        time.sleep(0.02)
    assert stack_counter(relay, "pending") >= 64 - 16, relay.log_tail()
    assert "most refused clients 198.18.1.2=" in relay.log_text()


# --- (b) ---------------------------------------------------------------------------------


def flood(topo: Topology, packets: list[bytes], stop: threading.Event, sent: list[int]) -> None:
    """Send ``packets`` round robin at FLOOD_RATE * 1.1 for at most FLOOD_SECONDS."""
    sock, target = raw_sender(topo)
    rate = FLOOD_RATE * 1.1
    t0 = time.monotonic()
    n = 0
    total = len(packets)
    while not stop.is_set():
        elapsed = time.monotonic() - t0
        if elapsed >= FLOOD_SECONDS:
            break
        due = int(elapsed * rate) - n
        if due <= 0:
            time.sleep(0.001)
            continue
        for _ in range(min(due, 1000)):
            sock.sendto(packets[n % total], target)
            n += 1
    sent[:] = [n, int((time.monotonic() - t0) * 1000)]


def test_a_spoofed_syn_flood_leaves_a_legitimate_download_fast_and_upstream_syns_bounded(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    silence(topology, SILENT_V4)
    relay = start_relay(args=["--connect-timeout", str(CONNECT_TIMEOUT), "--stats-interval", "1"])
    relay.spoofed_nets = ("198.18.1.0/24", "fd00:1::/64")
    port, server = serve_downloads(topology, MIB, 1)
    # 241 spoofed clients, random ports: each under its own quotas, so only the
    # shared limits (pending per destination, connection rate) are tested.
    packets = spoofed_syns(20_000, SILENT_V4, 9, first_host=10, hosts=241)
    rss_before = relay.rss_kib()
    stop, sent = threading.Event(), [0, 0]
    flooder = threading.Thread(target=flood, args=(topology, packets, stop, sent), daemon=True)
    flooder.start()
    try:
        time.sleep(2.0)  # the flood is on and the silent address's share is full
        got, seconds = download(topology, port)
        rss_peak = relay.rss_kib()
    finally:
        flooder.join(timeout=FLOOD_SECONDS + 5)
        stop.set()
    server.join(timeout=10)
    rss_peak = max(rss_peak, relay.rss_kib())
    count, ms = sent
    rate = count / (ms / 1000)
    # Every admitted connect has timed out once the relay has no upstream socket left
    # connecting to the silent address (then no SYN can follow), and a stats line
    # logged at least one interval after the flood counts all its refusals; at most
    # CONNECT_TIMEOUT + 1.5 s, as a fixed wait gave it.
    lines = relay.log_text().count("refused={")
    deadline = time.monotonic() + CONNECT_TIMEOUT + 1.5
    while time.monotonic() < deadline:
        if relay.log_text().count("refused={") >= lines + 2 and not syn_sent(
            topology, SILENT_V4, "gw"
        ):
            break
        time.sleep(0.05)
    syns = silent_syns(topology)
    total_seconds = FLOOD_SECONDS + CONNECT_TIMEOUT
    # At most PENDING_PER_DESTINATION connects at a time, each held CONNECT_TIMEOUT s.
    bound = PENDING_PER_DESTINATION * (1 + int(total_seconds / CONNECT_TIMEOUT)) * SYNS_PER_CONNECT
    print(
        f"\n[fairness b] flood {count} SYNs in {ms / 1000:.2f} s ({rate:.0f}/s); download "
        f"{got} B in {seconds:.2f} s; relay RSS {rss_before} -> {rss_peak} KiB; upstream "
        f"SYNs to the silent address {syns} (bound {bound}, {syns / total_seconds:.0f}/s)"
    )
    assert rate >= FLOOD_RATE and ms >= FLOOD_SECONDS * 1000 * 0.95, sent
    assert got == MIB
    assert seconds < DOWNLOAD_LIMIT, f"download took {seconds:.2f} s: {relay.log_tail()}"
    assert rss_peak - rss_before < RSS_GROWTH_LIMIT_KIB, (rss_before, rss_peak)
    assert 0 < syns <= bound, relay.log_tail()
    assert stack_counter(relay, "destination_pending") > count // 2, relay.log_tail()


# --- (c) ---------------------------------------------------------------------------------


def established_at(topo: Topology, port: int) -> int:
    out = run_in(topo, "srv", ["ss", "-Htn", "state", "established", f"( sport = :{port} )"])
    return len([ln for ln in out.splitlines() if ln.strip()])


def test_unanswered_syn_acks_leave_no_upstream_connection_after_the_bound(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    bound = 2.0
    relay = start_relay(args=["--synrecv-timeout", str(bound), "--stats-interval", "1"])
    relay.spoofed_nets = ("198.18.1.0/24", "fd00:1::/64")
    lsock = topology.socket("srv")
    lsock.bind((topology.srv_v4, 0))
    lsock.listen(1024)  # never accepted: the connections wait in the queue, established
    port = lsock.getsockname()[1]
    # 100 addresses nobody in the client namespace owns: the SYN-ACKs go unanswered.
    t0 = time.monotonic()
    send_all(topology, spoofed_syns(300, topology.srv_v4, port, first_host=100, hosts=100))
    peak = 0
    while time.monotonic() - t0 < bound - 0.5:
        peak = max(peak, established_at(topology, port))
        time.sleep(0.1)
    deadline = t0 + bound + 3.0
    left = established_at(topology, port)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = established_at(topology, port)
    gone_after = time.monotonic() - t0
    print(
        f"\n[fairness c] {peak} upstream connections established, {left} left "
        f"{gone_after:.2f} s after the SYNs (--synrecv-timeout {bound})"
    )
    assert peak >= 200, relay.log_tail()  # the relay did connect upstream for them
    assert left == 0, relay.log_tail()
    assert gone_after >= bound - 0.1  # not before the bound either


# --- (d) ---------------------------------------------------------------------------------


def test_udp_flows_from_many_addresses_of_one_64_are_held_to_its_quota(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    quota = 20
    relay = start_relay(args=["--client-udp-flows", str(quota), "--stats-interval", "0.5"])
    relay.spoofed_nets = ("198.18.1.0/24", "fd00:1::/64")
    server = topology.socket("srv", socket.AF_INET6, socket.SOCK_DGRAM)
    server.bind((topology.srv_v6, 0))
    server.settimeout(0.5)
    port = server.getsockname()[1]
    dst = socket.inet_pton(socket.AF_INET6, topology.srv_v6)
    packets = [
        build_udp_packet(
            socket.inet_pton(socket.AF_INET6, f"fd00:1::{0x1000 + i:x}"), dst, 40000, port, b"q"
        )
        for i in range(200)
    ]
    send_all(topology, packets, ETH_P_IPV6)
    peers = set()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            _, peer = server.recvfrom(2048)
        except TimeoutError:
            break
        peers.add(peer)
    # Another client (IPv4, its own quota) still gets a flow.
    v4 = topology.socket("srv", socket.AF_INET, socket.SOCK_DGRAM)
    v4.bind((topology.srv_v4, 0))
    v4.settimeout(3.0)
    cli = topology.socket("cli", socket.AF_INET, socket.SOCK_DGRAM)
    cli.sendto(b"hello", (topology.srv_v4, v4.getsockname()[1]))
    data, _ = v4.recvfrom(2048)
    time.sleep(0.7)
    print(f"\n[fairness d] 200 addresses of fd00:1::/64 opened {len(peers)} UDP flows upstream")
    assert len(peers) == quota, relay.log_tail()
    assert data == b"hello"
    assert stack_counter(relay, "udp_flows") == 200 - quota, relay.log_tail()
    assert "most refused clients fd00:1::/64=" in relay.log_text()
