"""Generation defaults: the usual ones, and those of the few-step (distilled) models, which only the model's source
can declare (its diffusers scheduler config or its safetensors metadata: tensors cannot tell), recorded in the GGUF
at convert time (keys.FEW_STEP) or set with `pysdcpp convert --few-step`."""

from __future__ import annotations

import re

DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 7.0, "sampler": "euler_a"}
# guidance_scale 1.0: no unconditional pass (stable-diffusion.cpp skips it; diffusers' 0.0 for the turbo models)
FEW_STEP_DEFAULTS = {
    "turbo": {"num_inference_steps": 1, "guidance_scale": 1.0, "sampler": "euler_a"},   # SD-Turbo, SDXL-Turbo
    "lcm": {"num_inference_steps": 4, "guidance_scale": 1.0, "sampler": "lcm"},         # latent consistency models
}
FEW_STEP_KINDS = tuple(FEW_STEP_DEFAULTS)


def generation_defaults(few_step: str | None) -> dict:
    """Steps, guidance and sampler for a model: its few-step kind's, else the usual."""
    return dict(FEW_STEP_DEFAULTS.get(few_step, DEFAULTS))


def few_step_from_scheduler(config: dict) -> str | None:
    """The few-step kind a diffusers scheduler config declares: LCMScheduler -> lcm; Euler ancestral with trailing
    timestep spacing (how Stability configures SD-Turbo and SDXL-Turbo) -> turbo."""
    name = config.get("_class_name")
    if name == "LCMScheduler":
        return "lcm"
    if name == "EulerAncestralDiscreteScheduler" and config.get("timestep_spacing") == "trailing":
        return "turbo"
    return None


_MODELSPEC_FIELDS = ("modelspec.title", "modelspec.description", "modelspec.architecture")


def few_step_from_metadata(metadata: dict[str, str]) -> tuple[str, str] | None:
    """(kind, the field that says so) from a safetensors file's ModelSpec metadata naming a turbo or LCM model."""
    for field in _MODELSPEC_FIELDS:
        value = metadata.get(field, "")
        if re.search(r"\bturbo\b", value, re.I):
            return "turbo", field
        if re.search(r"\blcm\b|latent consistency", value, re.I):
            return "lcm", field
    return None
