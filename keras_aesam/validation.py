"""Argument checks shared by every constructor: errors name the parameter and its range."""

import math
import numbers


def _interval(low, high, low_open, high_open):
    left = "(" if low_open or low == -math.inf else "["
    right = ")" if high_open or high == math.inf else "]"
    fmt = lambda v: "-inf" if v == -math.inf else ("inf" if v == math.inf else f"{v:g}")
    return f"{left}{fmt(low)}, {fmt(high)}{right}"


def check_range(name, value, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """Return ``float(value)`` if it is a finite real number in the interval, else raise.

    ``ValueError`` names ``name`` and the accepted interval.
    """
    interval = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number in {interval}, got {value!r}.")
    value = float(value)
    ok = math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")
    return value


def check_in_open_interval(name, value, low, high):
    """``check_range`` for an open interval ``(low, high)``."""
    return check_range(name, value, low, high, low_open=True, high_open=True)


def check_int(name, value, low=1, high=None, allow_none=False):
    """Return ``int(value)`` if it is a whole number ``>= low`` (and ``<= high``)."""
    if value is None and allow_none:
        return None
    upper = "" if high is None else f" and <= {high}"
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or int(value) != value
    ):
        raise ValueError(f"{name} must be an integer >= {low}{upper}, got {value!r}.")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer >= {low}{upper}, got {value!r}.")
    return int(value)


def check_bool(name, value):
    """Return ``value`` as a bool if it is one (Python or NumPy), else raise.

    ``bool("false")`` is ``True``: switches take real booleans only.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}.")


#: Seeds are mixed with a stream number into one int64 counter key.
MAX_SEED = 2**32 - 1


def check_seed(value):
    """A seed: a whole number in [0, 2**32 - 1]."""
    return check_int("seed", value, low=0, high=MAX_SEED)


def canonical_name(name):
    """Case-, '-', '_', '/' and space-insensitive form of a name ('WRN-28-10' == 'wrn28_10')."""
    return "".join(c for c in str(name).lower() if c not in "-_/ ")
