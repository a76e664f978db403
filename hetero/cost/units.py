"""Quantities with units, as written in profile TOML files ("1.6 TB/s", "64 GB", "5 us").

A fixed table of the units profiles use; anything else is rejected with the list of what is
accepted. Values are returned in base units: bytes, bytes/s, seconds, watts, FLOP/s, J/byte.
"""

from __future__ import annotations

import math
import re

_SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
          "Ki": 2.0 ** 10, "Mi": 2.0 ** 20, "Gi": 2.0 ** 30, "Ti": 2.0 ** 40}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}

# kind -> {unit text: factor to base units}
UNITS: dict[str, dict[str, float]] = {
    "bytes": {f"{p}B": f for p, f in _SCALE.items()},
    "bandwidth": {f"{p}B/s": f for p, f in _SCALE.items()},
    "time": dict(_TIME),
    "power": {"mW": 1e-3, "W": 1.0, "kW": 1e3},
    "flops": {f"{p}FLOP/s": f for p, f in _SCALE.items() if "i" not in p},
    "energy_per_byte": {"pJ/B": 1e-12, "nJ/B": 1e-9, "J/B": 1.0, "pJ/bit": 8e-12},
    "fraction": {"": 1.0},
}

_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(\S*)\s*$")


def parse(text, kind: str, where: str) -> float:
    """`text` ("1.6 TB/s", or a bare number for fractions) in base units of `kind`.
    Raises ValueError naming `where` for unknown units, non-finite or negative values."""
    units = UNITS[kind]
    if isinstance(text, bool):
        raise ValueError(f"{where}: expected a {kind} value, got {text!r}")
    if isinstance(text, (int, float)):
        if kind != "fraction":
            raise ValueError(f"{where}: {text!r} has no unit; write it with one of {', '.join(units)}")
        try:
            number, unit = float(text), ""
        except OverflowError:  # an integer too large for a float (TOML integers are unbounded here)
            raise ValueError(f"{where}: {text!r} must be a finite value >= 0") from None
    elif isinstance(text, str):
        match = _NUMBER.match(text)
        if not match:
            raise ValueError(f"{where}: cannot read {text!r} as a number with a unit (e.g. '1.6 TB/s')")
        number, unit = float(match.group(1)), match.group(2)
    else:
        raise ValueError(f"{where}: expected a string like '1.6 TB/s', got {type(text).__name__}")
    if unit == "" and kind != "fraction":
        raise ValueError(f"{where}: {text!r} has no unit; write it with one of {', '.join(units)}")
    if unit not in units:
        raise ValueError(f"{where}: unknown unit {unit!r} for a {kind}; use one of {', '.join(u or '(none)' for u in units)}")
    value = number * units[unit]
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: {text!r} must be a finite value >= 0")
    return value


def format_value(value: float, kind: str) -> str:
    """A base-unit value written back with a readable unit (inverse of `parse`)."""
    if kind == "fraction":
        return f"{value:.4g}"
    if kind == "time":
        for unit in ("s", "ms", "us", "ns"):
            if value >= _TIME[unit] or unit == "ns":
                return f"{value / _TIME[unit]:.4g} {unit}"
    if kind == "power":
        return f"{value:.4g} W"
    if kind == "energy_per_byte":
        return f"{value / 1e-12:.4g} pJ/B"
    suffix = {"bytes": "B", "bandwidth": "B/s", "flops": "FLOP/s"}[kind]
    for prefix in ("P", "T", "G", "M", "K", ""):
        if value >= _SCALE[prefix] or prefix == "":
            return f"{value / _SCALE[prefix]:.4g} {prefix}{suffix}"
    raise AssertionError(kind)
