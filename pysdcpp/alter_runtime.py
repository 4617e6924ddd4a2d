"""ALTER routing at run time: the file's routing handed to the accelerated library before every compute, and the
per-step report (expert, MACs) of a generation. The format is pysdcpp.format.routing / docs/alter-gguf.md."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .errors import ModelLoadError
from .format.errors import FormatError
from .format.macs import unet_macs
from .format.names import FAMILIES
from .format.routing import AlterRouting, read_alter, read_mask_json
from .format.unet import prunable_units, unit_prefix

log = logging.getLogger("pysdcpp.alter")


def routing_of(model_file, masks=None) -> AlterRouting | None:
    """The routing to run a model file with: from a JSON mask file (`masks`, docs/alter-gguf.md) if given, else
    the file's own (GGUF metadata); checked against the UNet's prunable units."""
    family, layout = model_file.family, model_file.unet_layout
    try:
        own = read_alter(model_file.metadata)
    except FormatError as e:
        raise ModelLoadError(f"{model_file.path}: {e}") from None
    if masks is None and own is None:
        return None
    if family not in FAMILIES or layout is None:
        raise ModelLoadError(f"{model_file.path}: ALTER routing needs a UNet of the SD family (SD1.x, SD2.x, SDXL "
                             f"and their variants); the file's family is {family or 'unknown'}")
    routing = own
    if masks is not None:
        try:
            routing = read_mask_json(masks, layout)
        except FormatError as e:
            raise ValueError(str(e)) from None
        if own is not None and own.dropped:
            routing.dropped = list(own.dropped)  # those tensors are not in the file, whatever the masks say
    if routing.dropped:
        col = [routing.units.index(u) for u in routing.dropped if u in routing.units]
        kept = [routing.units[c] for c in col if routing.masks[:, c].any()]
        if kept or len(col) != len(routing.dropped):
            raise ModelLoadError(f"{model_file.path}: the routing keeps units whose weights the file leaves out "
                                 f"(--drop-unused): {', '.join(kept or routing.dropped)[:200]}")
    known = {u.name for u in prunable_units(layout)}
    unknown = [u for u in routing.units if u not in known]
    if unknown:
        raise ModelLoadError(f"{model_file.path}: ALTER routing names units this {family} UNet does not have: "
                             f"{', '.join(unknown[:3])}")
    return routing


@dataclass
class AlterStep:
    """One sampling step: the model timestep of its first evaluation, the expert, that expert's MACs."""

    step: int
    timestep: float
    expert: int
    macs: int
    dense_macs: int
    evaluations: int = 1

    def as_dict(self) -> dict:
        return {"step": self.step, "timestep": self.timestep, "expert": self.expert, "macs": self.macs,
                "dense_macs": self.dense_macs, "fraction_of_dense": self.macs / self.dense_macs,
                "evaluations": self.evaluations}


@dataclass
class NativeRouting:
    """The routing as the native call wants it (arrays kept alive for the library's copy)."""

    routing: AlterRouting
    semantics: str
    unet: str | dict   # the UNet's family or config, for the MAC counts
    _args: tuple = field(default=(), repr=False)

    def install(self, ffi, lib) -> None:
        if not self._args:
            units = [ffi.new("char[]", u.encode()) for u in self.routing.units]
            names = ffi.new("const char*[]", units)
            keep = ffi.new("uint8_t[]", self.routing.masks.astype(np.uint8).reshape(-1).tolist())
            table = ffi.new("int32_t[]", self.routing.table.astype(np.int32).tolist())
            self._args = (units, names, keep, table)
        _, names, keep, table = self._args
        sem = lib.PYSDCPP_ALTER_CONSUME if self.semantics == "consume" else lib.PYSDCPP_ALTER_REFERENCE
        if lib.pysdcpp_alter_set(names, self.routing.n_units, self.routing.n_experts, keep, table, sem) != 0:
            raise ModelLoadError("the library refused the ALTER routing (inconsistent sizes or expert table)")

    def steps(self, history: list[tuple[float, int]], step_marks: list[tuple[int, int]], height: int, width: int
              ) -> list[AlterStep]:
        """Per sampling step, the expert of its first evaluation. `step_marks` holds (step, evaluations so far)
        from each progress callback: the evaluations between two callbacks belong to the later one's step (the
        library also reports a step 0 before sampling, with none)."""
        macs = unet_macs(self.unet, height // 8, width // 8)
        per_expert = macs.experts(self.routing)
        out = []
        start = 0
        for step, end in step_marks:
            evals = history[start:end]
            if evals:
                t, e = evals[0]
                out.append(AlterStep(step, float(t), int(e), per_expert[e], macs.dense, len(evals)))
            start = end
        return out


def missing_ok_prefixes(routing: AlterRouting) -> list[str]:
    return [unit_prefix(u) for u in routing.dropped]


def log_steps(steps: list[AlterStep]) -> None:
    for s in steps:
        log.info("step %d: t=%.1f expert %d, %.1f GMAC (%.0f%% of dense)", s.step, s.timestep, s.expert,
                 s.macs / 1e9, 100 * s.macs / s.dense_macs)
