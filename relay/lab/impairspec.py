"""The lab's impairment SPEC: a short text for `relay.lab.impair.Impairment` per direction.

Grammar (used by ``tunrelay lab up --impair``, ``tunrelay lab impair`` and the
pytest plugin's ``impair=``/``lab.impair()``)::

    SPEC  := "" | "none" | PART (";" PART)*
    PART  := ITEM ("," ITEM)*
    ITEM  := loss=P | dup=P | reorder=P | gap=N | delay=D | dir=c2g|g2c|both | seed=N
    P     := a percentage ("5%") or a fraction ("0.05")
    D     := a duration with its unit ("10ms", "0.2s", "500us")

``c2g`` is client -> gateway, ``g2c`` gateway -> client; a PART without ``dir``
applies to both. ``reorder`` holds a frame back behind the next ``gap``
(default 3) frames of its direction; ``delay`` is one-way. Each direction may
be named by one PART only; ``seed`` (the forwarder's, default 0) may appear in
any one. Examples: ``loss=1%``; ``loss=5%,dir=c2g;delay=20ms,dir=g2c``;
``reorder=10%,gap=4,seed=7``. A bad SPEC raises ValueError naming the item.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.lab.impair import Impairment

__all__ = ["ImpairSpec", "parse_spec"]

_DIRS = {"c2g": ("c2g",), "g2c": ("g2c",), "both": ("c2g", "g2c")}
_UNITS = (("ms", 1e-3), ("us", 1e-6), ("s", 1.0))


@dataclass(frozen=True)
class ImpairSpec:
    """What a SPEC asks for: one `Impairment` per direction and the forwarder's seed."""

    c2g: Impairment
    g2c: Impairment
    seed: int = 0
    text: str = ""

    @property
    def active(self) -> bool:
        return self.c2g.active or self.g2c.active

    def describe(self) -> str:
        """``c2g: 5% loss; g2c: none`` (for status and logs)."""
        return "; ".join(
            f"{name}: {imp.describe() if imp.active else 'none'}"
            for name, imp in (("c2g", self.c2g), ("g2c", self.g2c))
        )


def _probability(key: str, value: str) -> float:
    try:
        p = float(value[:-1]) / 100.0 if value.endswith("%") else float(value)
    except ValueError:
        raise ValueError(f"{key}={value}: a percentage (5%) or a fraction (0.05)") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{key}={value}: must be between 0% and 100%")
    return p


def _duration(key: str, value: str) -> float:
    for unit, scale in _UNITS:
        if value.endswith(unit):
            try:
                seconds = float(value[: -len(unit)]) * scale
            except ValueError:
                break
            if not 0.0 <= seconds <= 5.0:
                raise ValueError(f"{key}={value}: must be 0..5 s")
            return seconds
    raise ValueError(f"{key}={value}: a duration with its unit (10ms, 0.2s, 500us)")


def _integer(key: str, value: str, low: int, high: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{key}={value}: an integer") from None
    if not low <= n <= high:
        raise ValueError(f"{key}={value}: must be {low}..{high}")
    return n


def parse_spec(text: str) -> ImpairSpec:
    """Parse a SPEC (grammar in the module docstring).

    Raises:
        ValueError: naming the bad item.
    """
    found: dict[str, Impairment] = {}
    seed: int | None = None
    stripped = text.strip()
    parts = [] if stripped.lower() in ("", "none") else stripped.split(";")
    for part in parts:
        fields: dict[str, float | int] = {}
        dirs = _DIRS["both"]
        for item in (s.strip() for s in part.split(",")):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise ValueError(f"{item!r}: expected key=value (in {text!r})")
            if key in ("loss", "dup", "reorder"):
                fields[key] = _probability(key, value)
            elif key == "delay":
                fields["delay"] = _duration(key, value)
            elif key == "gap":
                fields["reorder_gap"] = _integer(key, value, 1, 1000)
            elif key == "dir":
                if value not in _DIRS:
                    raise ValueError(f"dir={value}: c2g, g2c or both")
                dirs = _DIRS[value]
            elif key == "seed":
                if seed is not None:
                    raise ValueError(f"seed={value}: seed given twice")
                seed = _integer(key, value, 0, 2**31 - 1)
            else:
                raise ValueError(
                    f"{key}: unknown (keys: loss, dup, reorder, gap, delay, dir, seed)"
                )
        for d in dirs:
            if d in found:
                raise ValueError(f"dir {d}: impaired by two parts of {text!r}")
            found[d] = Impairment(
                loss=float(fields.get("loss", 0.0)),
                dup=float(fields.get("dup", 0.0)),
                reorder=float(fields.get("reorder", 0.0)),
                reorder_gap=int(fields.get("reorder_gap", 3)),
                delay=float(fields.get("delay", 0.0)),
            )
    return ImpairSpec(
        found.get("c2g", Impairment()), found.get("g2c", Impairment()), seed or 0, stripped
    )
