"""Which images a ``--train-images`` / ``--eval-images`` value selects (``N`` or ``START:STOP``)."""

from __future__ import annotations

from ..errors import ConfigError


def subset_indices(spec: "str | None", n: int, flag: str) -> "list[int] | None":
    """The image indices ``spec`` selects out of ``n`` (None: all). ``N`` -> the first N; ``A:B`` -> that slice."""
    if spec is None or spec == "":
        return None
    if ":" not in spec:
        return list(range(min(int(spec), n)))
    a, b = spec.split(":", 1)
    idx = list(range(n))[int(a) if a.strip() else 0:int(b) if b.strip() else n]
    if not idx:
        raise ConfigError(f"{flag} {spec!r} selects no image out of {n}; give a non-empty START:STOP or a count N")
    return idx


def subset_count(spec: "str | None", flag: str) -> "int | None":
    """``N`` as an int (classification subsets are class-balanced counts, not slices)."""
    if spec is None:
        return None
    if ":" in spec:
        raise ConfigError(f"{flag} {spec!r}: classification subsets are fixed class-balanced samples, so give a "
                          "count N (e.g. 1000), not a slice")
    return int(spec)
