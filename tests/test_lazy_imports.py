"""The supervisor's imports stay light: the stack, the data path and the analysis
load only in workers, and of pyroute2 only its rtnetlink part; a worker loads
dnspython and cryptography only with its first DNS message and QUIC Initial
(memory: every process holds what it imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cryptography.hazmat.primitives.ciphers.aead
import dns.flags
import dns.message
import dns.rrset

import stack
from relay.analysis.dissect import datagram_dissector, detect_datagram
from tests import dissect_vectors as rfc  # RFC 9001 Appendix A

REPO = Path(__file__).resolve().parent.parent


def _loaded_after(code: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sys.modules))"],
        check=True, capture_output=True, text=True, env=env, timeout=60,
    ).stdout  # fmt: skip
    return set(out.split())


def test_every_name_of_stack_resolves() -> None:
    for name in stack.__all__:
        assert getattr(stack, name) is not None, name
    assert set(stack.__all__) <= set(dir(stack))


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        stack.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("no AttributeError")


def test_the_supervisors_imports_leave_out_the_stack_and_the_data_path() -> None:
    loaded = _loaded_after(
        "import relay.cli, relay.service.workers, relay.service.reload, relay.host.netconfig"
    )
    assert "stack.config" in loaded
    heavy = {"stack.stack", "stack.tcp.connection", "relay.datapath.engine",
             "relay.datapath.tcpflow", "relay.datapath.echo", "relay.analysis.hooks",
             "stack.events", "stack.wire", "tomllib", "difflib", "datetime"}  # fmt: skip
    assert not heavy & loaded, heavy & loaded


def test_the_supervisors_check_of_the_log_dir_leaves_out_the_logs(tmp_path: Path) -> None:
    # The logs import the dissectors (httptools, the TLS and HTTP parsers): the
    # supervisor opens and closes the files without them.
    loaded = _loaded_after(
        "from relay.service.run import check_log_dir, validate\n"
        f"opts = validate(tun='trb0', client_nets=['198.18.1.0/24'], log_dir={str(tmp_path)!r})\n"
        "check_log_dir(opts)"
    )
    assert {p.name for p in tmp_path.iterdir()} == {
        "conn.log", "ssl.log", "http.log", "dns.log", "quic.log"
    }  # fmt: skip
    heavy = {"relay.analysis.zeeklog", "relay.analysis.dissect", "httptools"}
    assert not heavy & loaded, heavy & loaded


def test_the_supervisor_loads_only_the_rtnetlink_part_of_pyroute2() -> None:
    loaded = _loaded_after(
        "import relay.cli, relay.host.netconfig\n"
        "from relay.host.pyroute import iproute\n"
        "import pyroute2.iproute"
    )
    assert "pyroute2.iproute.linux" in loaded
    unused = {"pyroute2.ndb.main", "pyroute2.ipdb", "pyroute2.ipset", "sqlite3"}
    assert not unused & loaded, unused & loaded


def test_the_rest_of_pyroute2_is_there_when_asked_for() -> None:
    loaded = _loaded_after(
        "import relay.host.netconfig\n"
        "import pyroute2\n"
        "assert pyroute2.iproute.IPRoute is not None\n"  # a submodule: no __init__ yet
        "assert 'pyroute2.ndb.main' not in sys.modules\n"
        "from pyroute2 import NDB, IPRoute, NetlinkError\n"
        "assert NDB.__module__ == 'pyroute2.ndb.main' and pyroute2.__version__\n"
        "assert relay.host.netconfig.NetlinkError is NetlinkError\n"
        "try:\n    pyroute2.NoSuchThing\nexcept AttributeError:\n    pass\n"
        "else:\n    raise AssertionError('no AttributeError')"
    )
    assert "pyroute2.ndb.main" in loaded


# What a worker imports with --log-dir (the dissection, the Zeek and flow logs) and
# --block-domain: dnspython and cryptography wait for the first DNS message and the
# first QUIC Initial.
_WORKER = (
    "import relay.service.workers, relay.service.run, relay.datapath.engine\n"
    "import relay.datapath.tcpflow, relay.datapath.udpflow, relay.datapath.dissection\n"
    "import relay.analysis.dissect, relay.analysis.hooks, relay.analysis.zeeklog\n"
    "import relay.analysis.flowlog, relay.analysis.blocklist\n"
    "from stack import Stack\n"
    "from relay.analysis.dissect import (DnsQuery, DnsTransaction, QuicClientHello,\n"
    "    QuicServerHello, datagram_dissector, detect_datagram, RECORD_HOOKS)\n"
)


def _dnspython(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m == "dns" or m.startswith("dns.")}


def _cryptography(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m == "cryptography" or m.startswith("cryptography.")}


def test_a_worker_loads_dnspython_and_cryptography_only_when_it_needs_them() -> None:
    loaded = _loaded_after(_WORKER)
    assert "relay.analysis.dissect.dns" in loaded and "relay.analysis.dissect.quic" in loaded
    assert not _dnspython(loaded), _dnspython(loaded)
    assert not _cryptography(loaded), _cryptography(loaded)


def _dissected(datagrams: list[tuple[bool, bytes]], check: str) -> list[str]:
    """The records of one UDP flow (client?, datagram), dissected in a fresh
    interpreter after the worker's imports (``check`` runs after the first
    datagram), then the modules loaded, space-separated."""
    grams = [(client, data.hex()) for client, data in datagrams]
    code = (
        f"{_WORKER}"
        "from relay.analysis.direction import Direction\n"
        f"grams = [(c, bytes.fromhex(h)) for c, h in {grams!r}]\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('dns', 'cryptography')]\n"
        "d = datagram_dissector(detect_datagram(grams[0][1]))\n"
        "out = d.datagram(Direction.CLIENT_TO_SERVER, grams[0][1], 1.0)\n"
        f"{check}\n"
        "for client, data in grams[1:]:\n"
        "    c2s = Direction.CLIENT_TO_SERVER if client else Direction.SERVER_TO_CLIENT\n"
        "    out += d.datagram(c2s, data, 2.0)\n"
        "out += d.close(3.0)\n"
        "assert d.failed is None, d.failed\n"
        "print('\\n'.join(repr(r) for r in out))\n"
        "print(' '.join(sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}"],
        check=False, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _here(datagrams: list[tuple[bool, bytes]]) -> list[str]:
    """The same records from this interpreter, which imported both libraries first."""
    from relay.analysis.direction import Direction

    proto = detect_datagram(datagrams[0][1])
    assert proto is not None
    d = datagram_dissector(proto)
    assert d is not None
    out = d.datagram(Direction.CLIENT_TO_SERVER, datagrams[0][1], 1.0)
    for client, data in datagrams[1:]:
        c2s = Direction.CLIENT_TO_SERVER if client else Direction.SERVER_TO_CLIENT
        out += d.datagram(c2s, data, 2.0)
    out += d.close(3.0)
    assert d.failed is None, d.failed
    return [repr(r) for r in out]


def test_the_first_dns_message_loads_dnspython_and_dissects_as_before() -> None:
    q = dns.message.make_query("www.example.test.", "AAAA", use_edns=0)
    r = dns.message.make_response(q)
    r.flags |= dns.flags.RA
    r.answer.append(dns.rrset.from_text("www.example.test.", 60, "IN", "AAAA", "2001:db8::7"))
    grams = [(True, q.to_wire()), (False, r.to_wire())]
    *records, modules = _dissected(grams, "assert 'dns.message' in sys.modules")
    assert records == _here(grams)
    assert records[0].startswith("DnsQuery(") and "qtype_name='AAAA'" in records[0]
    assert "answers=('2001:db8::7',)" in records[1] and "rcode_name='NOERROR'" in records[1]
    assert not _cryptography(set(modules.split())), "DNS loaded cryptography"


def test_the_first_quic_initial_loads_cryptography_and_dissects_as_before() -> None:
    assert cryptography.hazmat.primitives.ciphers.aead  # this process: loaded first
    grams = [(True, rfc.V1_CLIENT_PACKET), (False, rfc.V1_SERVER_PACKET)]
    *records, modules = _dissected(
        grams, "assert 'cryptography.hazmat.primitives.ciphers.aead' in sys.modules"
    )
    assert records == _here(grams)
    assert records[0].startswith("QuicClientHello(") and "server_name='example.com'" in records[0]
    assert records[1].startswith("QuicServerHello(")
    assert not _dnspython(set(modules.split())), "QUIC loaded dnspython"
