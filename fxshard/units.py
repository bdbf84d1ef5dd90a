"""Human-readable sizes and durations, written one way everywhere (plan text, CLI, figures).

Cluster strings have their own, exactly parseable size notation: ``fxshard.devices.format_budget``.
"""

from __future__ import annotations

import math
import numbers

from fxshard.errors import DeviceSpecError

__all__ = ["byte_unit", "format_bytes", "format_count", "format_time"]

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
