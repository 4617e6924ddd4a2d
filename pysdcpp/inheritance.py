"""Feature inheritance policies (DeepCache's branch caching, unit-level schedules in the manner of A-SDM) as the
per-step plan the accelerated library runs, and the report of what each evaluation computed (docs/inheritance.md)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .format.macs import evaluation_macs
from .format.unet import inheritable_units, skip_entries

log = logging.getLogger("pysdcpp.inheritance")

BRANCH_PREFIX = "branch."   # the plan's unit for DeepCache's branch at a skip-stack entry (kernels/inherit.h)
DEEPCACHE_SCHEDULES = ("uniform", "non-uniform")


@dataclass(frozen=True)
class Plan:
    """Which units each sampling step inherits: `units` (inheritable_units names, or one "branch.B"), and
    `inherit[step, unit]`. A step that inherits nothing computes every unit; every computed unit of the plan is
    cached for the steps after it."""

    units: tuple[str, ...]
    inherit: np.ndarray   # bool, (steps, units)

    @property
    def steps(self) -> int:
        return int(self.inherit.shape[0])

    def spec(self) -> str:
        return f"plan:{len(self.units)} units over {self.steps} steps"

    @property
    def branch(self) -> int | None:
        b = [u for u in self.units if u.startswith(BRANCH_PREFIX)]
        return int(b[0][len(BRANCH_PREFIX):]) if b else None

    def check(self, unet_layout) -> None:
        known = set(inheritable_units(unet_layout))
        entries = skip_entries(unet_layout)
        branches = [u for u in self.units if u.startswith(BRANCH_PREFIX)]
        if len(branches) > 1:
            raise ValueError("a plan has at most one DeepCache branch")
        for u in branches:
            b = u[len(BRANCH_PREFIX):]
            if not b.isdigit() or not 0 <= int(b) < entries:
                raise ValueError(f"DeepCache branch {b!r}: this UNet's branches are 0 to {entries - 1}")
        unknown = [u for u in self.units if u not in known and not u.startswith(BRANCH_PREFIX)]
        if unknown:
            raise ValueError(f"this UNet has no inheritable unit {unknown[0]!r} (its units: ResNets such as "
                             f"{sorted(known)[0]!r} and transformer blocks)")
        if self.inherit.ndim != 2 or self.inherit.shape[1] != len(self.units):
            raise ValueError(f"the plan's table must have one column per unit ({len(self.units)})")


@dataclass(frozen=True)
class DeepCache:
    """DeepCache (Ma et al., CVPR 2024): full evaluations at some steps; in between, only the blocks above the
    branch at skip-stack entry `branch` (0: conv_in's) run, on the deep features of the last full step. Full
    steps: every `interval`-th from step 0 (uniform), or DeepCache's non-uniform schedule (denser around step
    `center`, shaped by `pow`; its published settings for 50 steps are pow 1.4, center 15)."""

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    pow: float = 1.4
    center: int = 15

    def __post_init__(self):
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"DeepCache interval must be a positive integer, got {self.interval!r}")
        if not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"DeepCache branch must be a non-negative integer, got {self.branch!r}")
        if self.schedule not in DEEPCACHE_SCHEDULES:
            raise ValueError(f"DeepCache schedule must be one of {', '.join(DEEPCACHE_SCHEDULES)}, "
                             f"not {self.schedule!r}")

    def spec(self) -> str:
        """The policy as --inherit writes it (parse_inheritance reads it back)."""
        shape = f",pow={self.pow:g},center={self.center}" if self.schedule == "non-uniform" else ""
        return f"deepcache:interval={self.interval},branch={self.branch},schedule={self.schedule}{shape}"

    def full_steps(self, steps: int) -> list[int]:
        if self.interval == 1:
            return list(range(steps))
        if self.schedule == "uniform":
            return list(range(0, steps, self.interval))
        return _quad_center_steps(steps, math.ceil(steps / self.interval), self.center, self.pow)

    def plan(self, steps: int, unet_layout) -> Plan:
        table = np.ones((steps, 1), dtype=bool)
        table[self.full_steps(steps), 0] = False
        table[0, 0] = False   # the first step is always full: nothing is cached before it
        plan = Plan((f"{BRANCH_PREFIX}{self.branch}",), table)
        plan.check(unet_layout)
        return plan


def _quad_center_steps(steps: int, n_full: int, center: int, power: float) -> list[int]:
    """DeepCache's non-uniform full steps: n_full points of a power curve through `center`, as its pipeline picks
    them. Its curve starts at (-center) ** (1 / pow), a complex number, and the points' integer parts are their
    real parts truncated; the exponent drops by 0.02 until the points are distinct enough."""
    while power > 1:
        start = complex(-center) ** (1 / power)
        points = np.linspace(start, complex(steps - center) ** (1 / power), n_full + 1) ** power
        ints = np.unique(points.real.astype(np.int32))
        chosen = [0] + [int(v) + center for v in ints[1:-1]]
        if len(chosen) == n_full:
            return sorted(chosen)
        power -= 0.02
    raise ValueError(f"DeepCache's non-uniform schedule finds no {n_full} full steps among {steps} around step "
                     f"{center}: use fewer steps per full one (interval), another center, or the uniform schedule")


@dataclass(frozen=True)
class UnitSchedule:
    """Unit-level inheritance in the manner of A-SDM: the listed units (inheritable_units names) are computed at
    steps `first`, `first + interval`, ... and at the last `last` steps, and inherited at the others; steps
    before `first` compute everything. The default units: every transformer block and every ResNet below the
    outermost level (the ResNets at the latent's own size stay computed), which with interval 3 spends 57% of the
    dense MACs over 20 steps at 512 px (a default set by that count, for >= 1.4x; not tuned on trained weights)."""

    units: tuple[str, ...] | None = None
    interval: int = 3
    first: int = 1
    last: int = 1

    def __post_init__(self):
        for name in ("interval", "first", "last"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (1 if name == "interval" else 0):
                raise ValueError(f"unit schedule {name} must be a{' positive' if name == 'interval' else ' non-negative'}"
                                 f" integer, got {v!r}")

    def spec(self) -> str:
        units = f",units={'+'.join(self.units)}" if self.units is not None else ""
        return f"units:interval={self.interval},first={self.first},last={self.last}{units}"

    def chosen_units(self, unet_layout) -> tuple[str, ...]:
        if self.units is not None:
            return tuple(self.units)
        from .format.unet import unet_blocks

        outer = {b.ldm for b in unet_blocks(unet_layout) if b.kind == "resnet" and b.level == 0 and b.section != "mid"}
        return tuple(u for u in inheritable_units(unet_layout) if u not in outer)

    def plan(self, steps: int, unet_layout) -> Plan:
        units = self.chosen_units(unet_layout)
        if not units:
            raise ValueError("a unit schedule needs at least one unit")
        rows = np.zeros((steps, len(units)), dtype=bool)
        for s in range(self.first, max(self.first, steps - self.last)):
            rows[s, :] = (s - self.first) % self.interval != 0
        plan = Plan(units, rows)
        plan.check(unet_layout)
        return plan


Policy = DeepCache | UnitSchedule | Plan


def parse_inheritance(spec: str) -> Policy:
    """The CLI's --inherit: `deepcache[:interval=3,branch=0,schedule=uniform|non-uniform,pow=1.4,center=15]` or
    `units[:interval=3,first=1,last=1,units=NAME+NAME...]`."""
    kind, _, rest = spec.partition(":")
    args: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--inherit {spec!r}: {item!r} is not key=value")
        args[key.strip()] = value.strip()
    try:
        if kind == "deepcache":
            typed = {"interval": int, "branch": int, "schedule": str, "pow": float, "center": int}
            bad = set(args) - set(typed)
            if bad:
                raise ValueError(f"unknown DeepCache setting {sorted(bad)[0]!r} (settings: {', '.join(typed)})")
            return DeepCache(**{k: typed[k](v) for k, v in args.items()})
        if kind == "units":
            typed = {"interval": int, "first": int, "last": int}
            bad = set(args) - set(typed) - {"units"}
            if bad:
                raise ValueError(f"unknown unit-schedule setting {sorted(bad)[0]!r} (settings: {', '.join(typed)}, "
                                 "units)")
            units = tuple(args.pop("units").split("+")) if "units" in args else None
            return UnitSchedule(units, **{k: typed[k](v) for k, v in args.items()})
    except ValueError as e:
        raise ValueError(f"--inherit {spec!r}: {e}") from None
    raise ValueError(f"--inherit {spec!r}: the policy must be deepcache or units")


def plan_for(policy: Policy, steps: int, unet_layout) -> Plan:
    if isinstance(policy, Plan):
        if policy.steps != steps:
            raise ValueError(f"the plan covers {policy.steps} steps; this run has {steps}")
        policy.check(unet_layout)
        return policy
    if isinstance(policy, (DeepCache, UnitSchedule)):
        return policy.plan(steps, unet_layout)
    raise TypeError(f"inheritance must be a DeepCache, a UnitSchedule, a Plan or None, not {type(policy).__name__}")


@dataclass
class InheritedEvaluation:
    """One UNet evaluation as the library ran it: its step and slot (0 cond, 1 uncond, ...), the units it
    inherited and those it computed and cached, and the MACs it spent."""

    step: int
    slot: int
    inherited: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    macs: int = 0
    dense_macs: int = 0

    def as_dict(self) -> dict:
        return {"step": self.step, "slot": self.slot, "inherited": self.inherited, "computed": self.computed,
                "macs": self.macs, "dense_macs": self.dense_macs}


@dataclass
class NativePlan:
    """A plan as the native call wants it (arrays kept alive while installed)."""

    plan: Plan
    unet: str | dict
    _args: tuple = field(default=(), repr=False)

    def install(self, ffi, lib) -> None:
        if not self._args:
            units = [ffi.new("char[]", u.encode()) for u in self.plan.units]
            names = ffi.new("const char*[]", units)
            table = ffi.new("uint8_t[]", self.plan.inherit.astype(np.uint8).reshape(-1).tolist())
            self._args = (units, names, table)
        _, names, table = self._args
        if lib.pysdcpp_inherit_set(names, len(self.plan.units), self.plan.steps, table) != 0:
            raise ValueError("the library refused the inheritance plan (empty, or more than one branch)")

    def report(self, records: list[tuple[int, int, int, int, int]], height: int, width: int,
               skipped_per_evaluation: list[set[str]] | None = None) -> list[InheritedEvaluation]:
        """The library's records (step, slot, part, unit, action) as one entry per evaluation, with the MACs spent
        (ALTER's skipped units per evaluation, where given, left out too)."""
        out: list[InheritedEvaluation] = []
        for step, slot, _part, unit, action in records:
            if unit < 0:
                out.append(InheritedEvaluation(step, slot))
            elif out:
                (out[-1].inherited if action == 2 else out[-1].computed).append(self.plan.units[unit])
        branch = self.plan.branch
        dense = evaluation_macs(self.unet, height // 8, width // 8)
        for i, e in enumerate(out):
            skipped = skipped_per_evaluation[i] if skipped_per_evaluation else set()
            cut = branch is not None and f"{BRANCH_PREFIX}{branch}" in e.inherited
            e.dense_macs = dense
            e.macs = evaluation_macs(self.unet, height // 8, width // 8, skipped=skipped,
                                     inherited=[u for u in e.inherited if not u.startswith(BRANCH_PREFIX)],
                                     branch=branch if cut else None)
        return out


def read_records(ffi, lib) -> list[tuple[int, int, int, int, int]]:
    n = int(lib.pysdcpp_inherit_history(ffi.NULL, 0))
    buf = ffi.new("int32_t[]", max(5 * n, 1))
    n = min(n, int(lib.pysdcpp_inherit_history(buf, n)))
    return [tuple(buf[5 * i + k] for k in range(5)) for i in range(n)]


def log_evaluations(evaluations: list[InheritedEvaluation]) -> None:
    for e in evaluations:
        log.info("step %d slot %d: %d units inherited, %d computed, %.1f GMAC (%.0f%% of dense)", e.step, e.slot,
                 len(e.inherited), len(e.computed), e.macs / 1e9, 100 * e.macs / max(e.dense_macs, 1))
