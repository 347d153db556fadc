"""contrib/tunrelay.service: ``systemd-analyze verify`` accepts it, and it has the
settings the relay relies on (Type=notify, the watchdog, the hardening)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "tunrelay.service"


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_unit_has_notify_watchdog_and_hardening() -> None:
    s = settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert int(s["WatchdogSec"][0]) > 0
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"] == s["AmbientCapabilities"]
    for key, value in (("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes")):  # fmt: skip
        assert s[key] == [value], key
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert "/var/log/tunrelay" in s["ReadWritePaths"][0]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The ExecStart binary must exist for verify: this interpreter's tunrelay script.
    exe = Path(sys.executable).with_name("tunrelay")
    if not exe.exists():
        exe = Path(sys.executable)
    text = UNIT.read_text().replace("/opt/tunrelay/.venv/bin/tunrelay", str(exe))
    unit = tmp_path / "tunrelay.service"
    unit.write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "tunrelay.service" not in done.stderr, done.stderr
