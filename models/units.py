"""Human-readable quantities for messages and logs (torch-free)."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """``512 bytes``, ``1.5 KiB``, ``10.0 MiB``... up to TiB."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
