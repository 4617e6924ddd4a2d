"""What a file's ALTER routing means for a run: MACs per expert at an image size, the training timesteps each
expert serves, and which sampling steps of stable-diffusion.cpp's default (discrete) schedule it serves.

Schedule facts from upstream's denoiser.hpp / stable-diffusion.cpp (re-derived, float32 like upstream):
alphas_cumprod from the scaled-linear betas (0.00085 .. 0.012), sigma_t = sqrt((1 - a_t) / a_t), the
discrete schedule puts step i of N at t = 999 - i * 999 / (N - 1) (interpolating log sigma), and the model
is called with t = sigma_to_t(sigma_i).
"""

from __future__ import annotations

import numpy as np

from .format.macs import unet_macs
from .format.names import N_TIMESTEPS
from .format.routing import AlterRouting

_F = np.float32


def sdcpp_log_sigmas() -> np.ndarray:
    """log sigma of the 1000 training timesteps, as upstream computes them (float32)."""
    ls, le = np.sqrt(_F(0.00085)), np.sqrt(_F(0.012))
    i = np.arange(N_TIMESTEPS, dtype=_F)
    beta = ls + (le - ls) * (i / _F(N_TIMESTEPS - 1))
    alphas_cumprod = np.cumprod(_F(1) - beta * beta, dtype=_F)
    return np.log(np.sqrt((_F(1) - alphas_cumprod) / alphas_cumprod))


def _t_to_sigma(t: np.float32, log_sigmas: np.ndarray) -> np.float32:
    lo, hi = int(np.floor(t)), int(np.ceil(t))
    w = _F(t - _F(lo))
    return _F(np.exp((_F(1) - w) * log_sigmas[lo] + w * log_sigmas[hi]))


def _sigma_to_t(sigma: np.float32, log_sigmas: np.ndarray) -> float:
    log_sigma = _F(np.log(sigma))
    low = int(np.count_nonzero(log_sigma - log_sigmas >= 0)) - 1
    low = min(max(low, 0), N_TIMESTEPS - 2)
    lo_v, hi_v = log_sigmas[low], log_sigmas[low + 1]
    w = min(max(_F((lo_v - log_sigma) / (lo_v - hi_v)), _F(0)), _F(1))
    return float((_F(1) - w) * _F(low) + w * _F(low + 1))


def discrete_step_timesteps(steps: int) -> list[float]:
    """The model timestep of each sampling step under upstream's discrete schedule (the default for SD1.x/2.x).

    Samplers that evaluate the model more than once per step (heun, dpm2 ...) add evaluations in between;
    this is the first evaluation of each step (the only one for euler and euler_a).
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    log_sigmas = sdcpp_log_sigmas()
    t_max = N_TIMESTEPS - 1
    if steps == 1:
        ts = [_F(t_max)]
    else:
        step = _F(t_max) / _F(steps - 1)
        ts = [_F(_F(t_max) - step * _F(i)) for i in range(steps)]
    return [_sigma_to_t(_t_to_sigma(t, log_sigmas), log_sigmas) for t in ts]


def _ranges_text(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges) or "none"


def alter_summary(routing: AlterRouting, family: str | dict | None, size: int = 512, steps: int = 20) -> dict:
    """Everything `pysdcpp inspect` shows about a routing, as plain JSON-able values."""
    step_ts = discrete_step_timesteps(steps)
    step_experts = [routing.expert_for_timestep(t) for t in step_ts]
    macs = None
    if family is not None:
        try:
            m = unet_macs(family, size // 8, size // 8)
            expert_macs = m.experts(routing)
            macs = {"dense": m.dense, "experts": expert_macs, "units": m.per_unit}
        except (ValueError, KeyError):
            macs = None   # units that are not this family's standard table: no MAC model
    experts = []
    for e in range(routing.n_experts):
        keep = routing.masks[e]
        entry = {
            "index": e,
            "kept": [u for u, k in zip(routing.units, keep) if k],
            "skipped": [u for u, k in zip(routing.units, keep) if not k],
            "timesteps": [list(r) for r in routing.timestep_ranges(e)],
            "n_timesteps": int(np.count_nonzero(routing.table == e)),
            "steps": [i for i, x in enumerate(step_experts) if x == e],
        }
        if macs is not None:
            entry["macs"] = macs["experts"][e]
            entry["macs_fraction_of_dense"] = macs["experts"][e] / macs["dense"]
        experts.append(entry)
    out = {
        "n_experts": routing.n_experts, "n_units": routing.n_units, "units": routing.units, "kinds": routing.kinds,
        "skip_semantics": routing.semantics, "mask_source": routing.source, "dropped_units": routing.dropped,
        "image_size": size, "latent_size": [size // 8, size // 8],
        "schedule": {"scheduler": "discrete", "steps": steps, "timesteps": step_ts, "experts": step_experts},
        "experts": experts,
    }
    if macs is not None:
        out["macs"] = {"dense": macs["dense"], "units": macs["units"], "batch": 1,
                       "mean_over_steps": float(np.mean([macs["experts"][e] for e in step_experts])),
                       "note": "per UNet evaluation of one latent; classifier-free guidance evaluates two"}
    return out


def format_alter_summary(s: dict) -> list[str]:
    n_tr = sum(k == "transformer" for k in s["kinds"])
    lines = [f"  ALTER routing: {s['n_experts']} experts over {s['n_units']} units ({n_tr} transformer blocks, "
             f"{s['n_units'] - n_tr} ResNets); masks from {s['mask_source'] or '?'}, skip semantics "
             f"{s['skip_semantics']}"]
    if s["dropped_units"]:
        lines.append(f"    tensors left out for {len(s['dropped_units'])} never-kept units: "
                     + ", ".join(s["dropped_units"]))
    macs = s.get("macs")
    sched = s["schedule"]
    if macs:
        lines.append(f"    MACs per UNet evaluation at {s['image_size']}x{s['image_size']} (latent "
                     f"{s['latent_size'][0]}x{s['latent_size'][1]}): dense {macs['dense'] / 1e9:.1f} G")
    lines.append(f"    {'expert':<7}{'kept':>7}  {'MACs':>9} {'dense':>6}  {'training timesteps':<24}steps of "
                 f"{sched['steps']} (discrete)")
    for e in s["experts"]:
        mac = f"{e['macs'] / 1e9:8.1f}G {100 * e['macs_fraction_of_dense']:5.1f}%" if "macs" in e else f"{'?':>9} {'':>6}"
        ranges = _ranges_text([tuple(r) for r in e["timesteps"]])
        steps = ", ".join(str(i) for i in e["steps"]) or "-"
        lines.append(f"    {e['index']:<7}{len(e['kept']):>3}/{s['n_units']:<3}  {mac}  {ranges:<24}{steps}")
    for e in s["experts"]:
        lines.append(f"    expert {e['index']} skips: {', '.join(e['skipped']) or 'nothing'}")
    if macs:
        lines.append(f"    mean over the {sched['steps']} steps: {macs['mean_over_steps'] / 1e9:.1f} G "
                     f"({100 * macs['mean_over_steps'] / macs['dense']:.1f}% of dense)")
    return lines
