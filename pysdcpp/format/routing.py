"""ALTER routing as pysdcpp stores it: experts (keep masks over the prunable units) and the expert of every
training timestep; its GGUF metadata (written by the converter, read by the runtime) and the JSON mask files any
pruning method can write (schema: docs/alter-gguf.md)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import keys
from .errors import FormatError
from .names import N_TIMESTEPS, SKIP_SEMANTICS, UNET_PREFIX, UNIT_KINDS
from .unet import PrunableUnit, prunable_units

ALTER_FORMAT_VERSION = 1
MASK_FORMAT = "pysdcpp.alter-masks"


@dataclass
class AlterRouting:
    """Experts (keep masks over the prunable units) and the expert of each training timestep 0..999."""

    units: list[str]
    kinds: list[str]
    masks: np.ndarray           # bool [E, U], True = keep
    table: np.ndarray           # int [1000], expert of each training timestep
    semantics: str = "reference"
    source: str = ""
    dropped: list[str] = field(default_factory=list)

    @property
    def n_experts(self) -> int:
        return int(self.masks.shape[0])

    @property
    def n_units(self) -> int:
        return len(self.units)

    def expert_for_timestep(self, t: float) -> int:
        """The expert for a (possibly fractional) model timestep: nearest integer, clamped to 0..999."""
        if not math.isfinite(t):
            raise ValueError(f"timestep must be finite, not {t}")
        i = min(max(int(math.floor(t + 0.5)), 0), N_TIMESTEPS - 1)
        return int(self.table[i])

    def mask_for_timestep(self, t: float) -> np.ndarray:
        return self.masks[self.expert_for_timestep(t)]

    def timestep_ranges(self, expert: int) -> list[tuple[int, int]]:
        """Inclusive ranges of training timesteps routed to `expert`."""
        hit = np.flatnonzero(self.table == expert)
        if hit.size == 0:
            return []
        breaks = np.flatnonzero(np.diff(hit) > 1)
        starts = np.concatenate([[hit[0]], hit[breaks + 1]])
        ends = np.concatenate([hit[breaks], [hit[-1]]])
        return [(int(a), int(b)) for a, b in zip(starts, ends)]

    def never_kept(self) -> list[str]:
        """Units that no expert keeps (what `drop_unused` leaves out)."""
        return [u for u, any_keep in zip(self.units, self.masks.any(axis=0)) if not any_keep]


def routing_from_timestep_masks(rows: np.ndarray, units: Sequence[PrunableUnit], source: str,
                                semantics: str = "reference") -> AlterRouting:
    """Deduplicate per-timestep keep rows [1000, U] into experts, in order of first appearance."""
    rows = np.asarray(rows, dtype=bool)
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)            # unique rows sorted by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    masks = rows[first[order]]
    table = rank[inverse.reshape(-1)]
    return AlterRouting([u.name for u in units], [u.kind for u in units], masks, table.astype(np.int64),
                        semantics, source)


def check_values_01(array: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(a)) or not np.all((a == 0.0) | (a == 1.0)):
        bad = a[~((a == 0.0) | (a == 1.0))].ravel()[:3]
        raise FormatError(f"{what}: mask values must be exactly 0 or 1, found {bad.tolist()}")
    return a == 1.0


def _unit_lookup(units: Sequence[PrunableUnit]) -> dict[str, int]:
    out = {}
    for u in units:
        out[u.name] = out[UNET_PREFIX + u.name] = out[u.diffusers] = u.index
    return out


def read_mask_json(path: str | os.PathLike, family_or_config: str | dict) -> AlterRouting:
    """A JSON mask file (schema in docs/alter-gguf.md): experts + timestep table, or one mask row per timestep."""
    path = Path(path)
    units = prunable_units(family_or_config)
    if not path.is_file():
        raise FormatError(f"{path}: no such mask file")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: the mask file must hold a JSON object")
    allowed = {"format", "version", "units", "experts", "timestep_expert", "timestep_masks", "skip_semantics"}
    extra = sorted(set(doc) - allowed)
    if extra:
        raise FormatError(f"{path}: unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")
    if doc.get("format", MASK_FORMAT) != MASK_FORMAT or doc.get("version", 1) != 1:
        raise FormatError(f"{path}: unsupported format {doc.get('format')!r} version {doc.get('version')!r} "
                          f"(expected {MASK_FORMAT} version 1)")
    semantics = doc.get("skip_semantics", "reference")
    if semantics not in SKIP_SEMANTICS:
        raise FormatError(f"{path}: skip_semantics must be one of {', '.join(SKIP_SEMANTICS)}, not {semantics!r}")

    lookup = _unit_lookup(units)
    if "units" in doc:
        names = doc["units"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise FormatError(f"{path}: 'units' must be a list of unit names")
        unknown = [n for n in names if n not in lookup]
        if unknown:
            raise FormatError(f"{path}: unknown unit {unknown[0]!r}; the prunable units are "
                              f"{', '.join(u.name for u in units)}")
        columns = [lookup[n] for n in names]
        if len(set(columns)) != len(columns):
            dup = next(n for n in names if columns.count(lookup[n]) > 1)
            raise FormatError(f"{path}: unit {dup!r} is listed twice")
    else:
        columns = list(range(len(units)))

    def full_rows(rows, what: str) -> np.ndarray:
        """Rows over the listed units -> rows over all units (unlisted units are always kept)."""
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
            raise FormatError(f"{path}: '{what}' must be a non-empty list of lists of 0/1")
        lengths = {len(r) for r in rows}
        if lengths != {len(columns)}:
            raise FormatError(f"{path}: every row of '{what}' must have {len(columns)} entries (one per "
                              f"{'listed ' if 'units' in doc else ''}unit), found lengths {sorted(lengths)}")
        if not all(isinstance(v, (int, float)) for r in rows for v in r):   # true/false count as 1/0
            raise FormatError(f"{path}: '{what}' must hold only the numbers 0 and 1")
        values = np.array(rows, dtype=np.float64)
        keep = np.ones((len(rows), len(units)), dtype=bool)
        keep[:, columns] = check_values_01(values, f"{path}: {what}")
        return keep

    if "timestep_masks" in doc:
        if "experts" in doc or "timestep_expert" in doc:
            raise FormatError(f"{path}: give either 'timestep_masks' or 'experts' (+ 'timestep_expert'), "
                              "not both")
        rows = full_rows(doc["timestep_masks"], "timestep_masks")
        if rows.shape[0] != N_TIMESTEPS:
            raise FormatError(f"{path}: 'timestep_masks' needs one row per timestep ({N_TIMESTEPS}), found "
                              f"{rows.shape[0]}")
        routing = routing_from_timestep_masks(rows, units, f"json:{path.name}", semantics)
        return routing
    if "experts" not in doc:
        raise FormatError(f"{path}: no 'experts' (nor 'timestep_masks') in the mask file")
    masks = full_rows(doc["experts"], "experts")
    if "timestep_expert" in doc:
        table = doc["timestep_expert"]
        if not isinstance(table, list) or len(table) != N_TIMESTEPS or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in table):
            raise FormatError(f"{path}: 'timestep_expert' must be a list of {N_TIMESTEPS} integers (the expert "
                              "of each training timestep 0..999)")
        table = np.array(table, dtype=np.int64)
        if table.min() < 0 or table.max() >= masks.shape[0]:
            bad = int(table[(table < 0) | (table >= masks.shape[0])][0])
            raise FormatError(f"{path}: 'timestep_expert' refers to expert {bad}, but there are "
                              f"{masks.shape[0]} experts (0..{masks.shape[0] - 1})")
    elif masks.shape[0] == 1:
        table = np.zeros(N_TIMESTEPS, dtype=np.int64)   # one static mask for every timestep
    else:
        raise FormatError(f"{path}: {masks.shape[0]} experts but no 'timestep_expert' table")
    return AlterRouting([u.name for u in units], [u.kind for u in units], masks, table, semantics,
                        f"json:{path.name}")


def routing_metadata(routing: AlterRouting) -> dict[str, object]:
    """The GGUF key/values of a routing (keys.ALTER_*)."""
    _validate(routing)
    return {
        keys.ALTER_VERSION: ALTER_FORMAT_VERSION,
        keys.ALTER_UNITS: list(routing.units),
        keys.ALTER_UNIT_KINDS: list(routing.kinds),
        keys.ALTER_N_EXPERTS: routing.n_experts,
        keys.ALTER_EXPERT_MASKS: np.ascontiguousarray(routing.masks, dtype=np.uint8).reshape(-1),
        keys.ALTER_TIMESTEP_EXPERT: np.asarray(routing.table, dtype=np.uint32),
        keys.ALTER_SKIP_SEMANTICS: routing.semantics,
        keys.ALTER_MASK_SOURCE: routing.source,
    } | ({keys.ALTER_DROPPED_UNITS: list(routing.dropped)} if routing.dropped else {})


def _validate(r: AlterRouting) -> None:
    u = len(r.units)
    if len(r.kinds) != u or any(k not in UNIT_KINDS for k in r.kinds):
        raise FormatError(f"ALTER routing: {len(r.kinds)} unit kinds for {u} units, or a kind not in {UNIT_KINDS}")
    if r.masks.ndim != 2 or r.masks.shape[1] != u or r.masks.shape[0] < 1:
        raise FormatError(f"ALTER routing: expert masks of shape {list(r.masks.shape)}, expected [E>=1, {u}]")
    if r.table.shape != (N_TIMESTEPS,) or r.table.min() < 0 or r.table.max() >= r.masks.shape[0]:
        raise FormatError(f"ALTER routing: the timestep table must hold {N_TIMESTEPS} expert indices "
                          f"in 0..{r.masks.shape[0] - 1}")
    if r.semantics not in SKIP_SEMANTICS:
        raise FormatError(f"ALTER routing: skip semantics {r.semantics!r} not in {SKIP_SEMANTICS}")
    if set(r.dropped) - set(r.units):
        raise FormatError("ALTER routing: a dropped unit is not a unit")


def read_alter(metadata: dict) -> AlterRouting | None:
    """The routing stored in a GGUF's metadata (as pysdcpp.modelfile reads it); None without ALTER keys.

    Arrays may be lists or numpy arrays. Raises FormatError for incomplete or inconsistent metadata.
    """
    if keys.ALTER_VERSION not in metadata:
        if any(str(k).startswith(keys.ALTER_PREFIX) for k in metadata):
            raise FormatError(f"ALTER metadata without {keys.ALTER_VERSION}")
        return None
    version = metadata[keys.ALTER_VERSION]
    if version != ALTER_FORMAT_VERSION:
        raise FormatError(f"ALTER metadata version {version!r}; this pysdcpp reads version {ALTER_FORMAT_VERSION}")
    need = (keys.ALTER_UNITS, keys.ALTER_UNIT_KINDS, keys.ALTER_N_EXPERTS, keys.ALTER_EXPERT_MASKS,
            keys.ALTER_TIMESTEP_EXPERT)
    missing = [k for k in need if k not in metadata]
    if missing:
        raise FormatError(f"ALTER metadata incomplete: no {', '.join(missing)}")
    units = [str(u) for u in metadata[keys.ALTER_UNITS]]
    kinds = [str(k) for k in metadata[keys.ALTER_UNIT_KINDS]]
    n_experts = int(metadata[keys.ALTER_N_EXPERTS])
    flat = np.asarray(metadata[keys.ALTER_EXPERT_MASKS]).reshape(-1)
    if flat.size != n_experts * len(units) or not np.all((flat == 0) | (flat == 1)):
        raise FormatError(f"ALTER metadata: expert_masks has {flat.size} entries, expected "
                          f"{n_experts} x {len(units)} values of 0/1")
    routing = AlterRouting(
        units, kinds, flat.astype(bool).reshape(n_experts, len(units)),
        np.asarray(metadata[keys.ALTER_TIMESTEP_EXPERT], dtype=np.int64).reshape(-1),
        str(metadata.get(keys.ALTER_SKIP_SEMANTICS, "reference")), str(metadata.get(keys.ALTER_MASK_SOURCE, "")),
        [str(d) for d in metadata.get(keys.ALTER_DROPPED_UNITS, []) or []])
    _validate(routing)
    return routing
