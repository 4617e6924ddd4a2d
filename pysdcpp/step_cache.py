"""Upstream's step-level caches for UNets (ucache, spectrum): the spec a user writes, checked before anything
loads, written into the library's `sd_cache_params_t`, and what the run's log says they skipped.

A spec is `MODE` or `MODE:key=value,...` with sd-cli's `--cache-mode` / `--cache-option` names, e.g.
`ucache:threshold=1.5,start=0.15`. Either cache reuses the whole UNet output of a step (ucache: the last one,
while an error estimate stays under the threshold; spectrum: a Chebyshev/Taylor forecast), so a skipped step
spends no UNet MACs at all; feature inheritance (docs/inheritance.md) instead reuses parts of it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# key: (the sd_cache_params_t field, type, lowest, highest); bools are written 0 or 1 as sd-cli reads them.
_OPTIONS: dict[str, dict[str, tuple[str, type, float, float]]] = {
    "ucache": {
        "threshold": ("reuse_threshold", float, 0.0, math.inf),
        "start": ("start_percent", float, 0.0, 1.0),
        "end": ("end_percent", float, 0.0, 1.0),
        "decay": ("error_decay_rate", float, 0.0, 1.0),
        "relative": ("use_relative_threshold", bool, 0, 1),
        "reset": ("reset_error_on_compute", bool, 0, 1),
    },
    "spectrum": {
        "w": ("spectrum_w", float, 0.0, 1.0),
        "m": ("spectrum_m", int, 1, 16),
        "lam": ("spectrum_lam", float, 0.0, math.inf),
        "window": ("spectrum_window_size", int, 1, 1000),
        "flex": ("spectrum_flex_window", float, 0.0, math.inf),
        "warmup": ("spectrum_warmup_steps", int, 0, 1000),
        "stop": ("spectrum_stop_percent", float, 0.0, 1.0),
    },
}
MODES = tuple(_OPTIONS)
_ENUM = {"ucache": "SD_CACHE_UCACHE", "spectrum": "SD_CACHE_SPECTRUM"}
_LOG_NAME = {"ucache": "UCache", "spectrum": "Spectrum"}


@dataclass(frozen=True)
class StepCache:
    mode: str
    options: tuple[tuple[str, float], ...] = ()

    def spec(self) -> str:
        if not self.options:
            return self.mode
        return self.mode + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.options)

    def apply(self, lib, cache) -> None:
        """Fill `cache` (an sd_cache_params_t, already at the library's defaults)."""
        cache.mode = getattr(lib, _ENUM[self.mode])
        for key, value in self.options:
            field, kind, _, _ = _OPTIONS[self.mode][key]
            setattr(cache, field, bool(value) if kind is bool else kind(value))


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def parse_step_cache(spec: str) -> StepCache:
    """`ucache`, `ucache:threshold=1.5,start=0.15`, `spectrum:w=0.4`; ValueError with the accepted keys."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("a step cache is a string such as 'ucache' or 'ucache:threshold=1.5'")
    mode, _, rest = spec.strip().partition(":")
    if mode not in _OPTIONS:
        raise ValueError(f"unknown step cache {mode!r}; choose {' or '.join(MODES)} (upstream's caches for UNets)")
    allowed = _OPTIONS[mode]
    values: dict[str, float] = {}
    for token in filter(None, (t.strip() for t in rest.split(","))):
        key, eq, raw = token.partition("=")
        if not eq:
            raise ValueError(f"step cache option {token!r} needs key=value")
        if key not in allowed:
            raise ValueError(f"unknown {mode} option {key!r}; it takes {', '.join(allowed)}")
        if key in values:
            raise ValueError(f"{mode} option {key!r} is given twice")
        _, kind, lo, hi = allowed[key]
        try:
            v = float(raw) if kind is not int else int(raw)
        except ValueError:
            raise ValueError(f"{mode} option {key}={raw!r} is not a {'whole ' if kind is int else ''}number") from None
        if kind is bool and v not in (0, 1):
            raise ValueError(f"{mode} option {key} is 0 or 1, got {raw}")
        if not (lo <= v <= hi) or (kind is float and not math.isfinite(v)):
            raise ValueError(f"{mode} option {key}={raw} is outside [{lo:g}, {hi:g}]")
        values[key] = v
    if mode == "ucache":
        start, end = values.get("start", 0.15), values.get("end", 0.95)  # the library's defaults
        if not start < end or start >= 1.0 or end <= 0.0:
            raise ValueError(f"ucache needs 0 <= start < end <= 1, got start={start:g}, end={end:g}")
    return StepCache(mode, tuple((k, values[k]) for k in allowed if k in values))  # in the table's order


def skipped_steps(mode: str, log_lines: list[str]) -> int | None:
    """How many steps the cache skipped, from the run's info log; None if the log says nothing (cache off)."""
    name = _LOG_NAME[mode]
    rx = re.compile(rf"{name} skipped (\d+)/(\d+) steps")
    for line in reversed(log_lines):
        if m := rx.search(line):
            return int(m.group(1))
        if f"{name} completed without skipping" in line or f"{name} enabled" in line:
            return 0
    return None
