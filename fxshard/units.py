"""Sizes and durations as text, written one way everywhere (plan text, CLI, figures).

Two notations for sizes: :func:`format_bytes` for people (``"79.2 GiB"``), and the cluster
strings' exact one, :func:`parse_bytes` and :func:`format_budget` (``"1.5GiB"``, ``"2GB"``;
docs/devices.md).
"""

from __future__ import annotations

import math
import numbers
import re
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from fractions import Fraction

from fxshard.errors import DeviceSpecError

__all__ = ["byte_unit", "format_budget", "format_bytes", "format_count", "format_time", "parse_bytes"]

_BINARY = (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def byte_unit(n: float) -> tuple[int, str]:
    """The largest binary unit that keeps ``abs(n)`` at least 1, as ``(bytes per unit, name)``.

    Example::

        byte_unit(3 << 30)  # (1073741824, 'GiB')
    """
    return next(((size, unit) for unit, size in _BINARY if abs(n) >= size), (1, "B"))


def format_bytes(n: float) -> str:
    """Human-readable size in binary units, e.g. ``"80.0 GiB"`` (whole bytes below 1 KiB).

    Raises:
        DeviceSpecError: ``n`` is not a number.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or math.isnan(n):
        raise DeviceSpecError(f"format_bytes({n!r}): expected a number of bytes")
    size, unit = byte_unit(float(n))
    return f"{n:.0f} B" if size == 1 else f"{n / size:.1f} {unit}"


def format_time(s: float) -> str:
    """Seconds in s, ms or us, whichever reads best: ``"1.45 s"``, ``"310.00 ms"``, ``"12.5 us"``."""
    if s == 0:
        return "0"
    if abs(s) >= 1:
        return f"{s:.2f} s"
    if abs(s) >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def format_count(x: float, unit: str = "") -> str:
    """``1.23 GFLOP``-style: three significant figures and an SI prefix."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_UNIT_NAMES = "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
_SIZE_RE = re.compile(r"\s*(\d+\.?\d*|\.\d+)\s*([A-Za-z]*)\s*", re.ASCII)


def parse_bytes(text: str) -> int:
    """Parse a byte size such as ``"2GB"`` (2e9), ``"1.5GiB"`` or ``"512MiB"``; a bare number is bytes.

    Raises:
        DeviceSpecError: not a non-negative number with a known unit.
    """
    if not isinstance(text, str):
        raise DeviceSpecError(f"byte size {text!r} is not a string; expected text such as '2GB' or '512MiB'")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise DeviceSpecError(f'bad byte size "{text}": expected a non-negative number and a unit, '
                              f'such as "2GB", "1.5GiB" or "512MiB"; units: {_UNIT_NAMES}')
    unit = match[2].casefold() or "b"
    if unit not in _UNITS:
        raise DeviceSpecError(f'bad byte size "{text}": unknown unit "{match[2]}"; expected {_UNIT_NAMES}')
    # Fraction keeps "1.1GB" exact; a fraction of a byte rounds down.
    return int(Fraction(match[1]) * _UNITS[unit])


# The units format_budget writes, largest first; parse_bytes reads them all.
_BUDGET_UNITS = (("TiB", 1 << 40), ("TB", 10**12), ("GiB", 1 << 30), ("GB", 10**9), ("MiB", 1 << 20),
                 ("MB", 10**6), ("KiB", 1 << 10), ("KB", 10**3), ("B", 1))


def _in_unit(n: int, size: int) -> Decimal:
    with localcontext() as context:
        context.prec = len(str(n)) + 45  # exact: n / 2**40 has at most 40 digits after the point
        return Decimal(n) / size


def _short_exact(n: int) -> str | None:
    """``n`` bytes as at most four significant digits of the largest unit that holds it exactly, if any."""
    for unit, size in _BUDGET_UNITS:
        value = _in_unit(n, size).normalize()
        if value >= 1 and len(value.as_tuple().digits) <= 4:
            return f"{value:f}{unit}"
    return None


def format_budget(n: int) -> str:
    """A memory budget as cluster strings write it, short and read back by :func:`parse_bytes`.

    Exact when four significant digits of some unit hold ``n`` (the largest such unit:
    ``"2GB"``, ``"1.5GiB"``, ``"512MiB"``); otherwise three significant digits of the largest
    binary unit that keeps the number at least 1 (``"23.6GiB"``, under 0.5% off). Either way
    ``format_budget(parse_bytes(text)) == text`` for the text it returns (docs/devices.md).

    Raises:
        DeviceSpecError: ``n`` is not an integer >= 0.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise DeviceSpecError(f"format_budget({n!r}): expected a whole number of bytes >= 0")
    n = int(n)
    if n == 0:
        return "0B"
    exact = _short_exact(n)
    if exact is not None:
        return exact
    # n >= 10,000 here (smaller counts are exact in bytes), so the unit is KiB or larger.
    unit, size = next((unit, size) for unit, size in _BUDGET_UNITS if unit.endswith("iB") and n >= size)
    value = _in_unit(n, size)
    rounded = value.quantize(Decimal(1).scaleb(value.adjusted() - 2), rounding=ROUND_HALF_EVEN)
    text = f"{rounded.normalize():f}{unit}"
    # The rounded text may parse to a size with a short exact form ("6.32MiB" is 6,627,000 bytes, "6.627MB");
    # writing that form instead keeps what this returns a fixed point of parse-then-format.
    return _short_exact(parse_bytes(text)) or text
