"""One wording for the checks every layer makes on a value it is given (a config key, an argument).

check_choice("sampler.method", "euler2", METHODS)   # ValueError: sampler.method='euler2' is unknown; allowed: ...
check_number("sampler.eta", -1.0)                   # ValueError: sampler.eta=-1.0 must be a number >= 0
check_count("callbacks.fid.num_reference", 1, 2)   # ValueError: ...=1 must be an integer >= 2
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    """ValueError unless value is one of `allowed` (bools and ints are not mixed up)."""
    allowed = tuple(allowed)
    if value not in allowed or any(isinstance(value, bool) != isinstance(a, bool) for a in allowed if a == value):
        raise ValueError(f"{key}={value!r} is unknown; allowed: {', '.join(map(str, allowed))}")


def check_number(key: str, value: Any, minimum: float = 0.0, finite: bool = False, maximum: float = math.inf) -> float:
    """ValueError unless value is a real number in [minimum, maximum] (and finite when asked); returns a float."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and minimum <= value <= maximum
    if not ok or (finite and not math.isfinite(value)):
        bound = f">= {minimum:g}" if maximum == math.inf else f"in [{minimum:g}, {maximum:g}]"
        raise ValueError(f"{key}={value!r} must be a {'finite ' if finite else ''}number {bound}")
    return float(value)


def check_count(key: str, value: Any, minimum: int = 1, why: str = "") -> int:
    """ValueError unless value is an integer >= minimum (a bool or 2.0 is not one); returns it as an int. why: a
    few words after the message ("(a training step)")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{key}={value!r} must be an integer >= {minimum}" + (f" {why}" if why else ""))
    return int(value)
