"""GGUF metadata keys pysdcpp writes and reads: one place, so writers and readers cannot drift apart.

stable-diffusion.cpp ignores metadata; these keys are for pysdcpp (and other runtimes) only. Beside them the
converter writes gguf-py's standard keys (gguf.Keys.General: name, file_type, quantization_version, source).
"""

ARCHITECTURE = "stable-diffusion"      # value of general.architecture
FAMILY = "pysdcpp.model.family"        # names.FAMILIES
VARIANT = "pysdcpp.model.variant"      # names.VARIANTS; absent: base (files before SDXL support)
FEW_STEP = "pysdcpp.model.few_step"    # sampling.FEW_STEP_KINDS; absent: a model for the usual 20+ steps
FEW_STEP_SOURCE = "pysdcpp.model.few_step_source"  # what declared it: a scheduler config, a metadata field, the user
PREDICTION = "pysdcpp.model.prediction"  # names.PREDICTIONS; absent: let the runtime decide
SOURCE = "pysdcpp.convert.source"      # what the file was converted from
SOURCE_LAYOUT = "pysdcpp.convert.layout"  # "diffusers-folder" | "ldm-file" | "diffusers-file" | "synthetic"
OUTPUT_TYPE = "pysdcpp.convert.type"   # names.OUTPUT_TYPES
CONVERTER_VERSION = "pysdcpp.convert.version"
SYNTHETIC = "pysdcpp.model.synthetic"  # true for the random-weight demo / test models

# ALTER routing (layer pruning with temporal experts); see docs/alter-gguf.md for the semantics.
ALTER_PREFIX = "pysdcpp.alter."
ALTER_VERSION = "pysdcpp.alter.version"            # uint32, 1
ALTER_UNITS = "pysdcpp.alter.units"                # [str] U unit names relative to model.diffusion_model.
ALTER_UNIT_KINDS = "pysdcpp.alter.unit_kinds"      # [str] U entries, names.UNIT_KINDS
ALTER_N_EXPERTS = "pysdcpp.alter.n_experts"        # uint32 E
ALTER_EXPERT_MASKS = "pysdcpp.alter.expert_masks"  # [uint8] E*U row-major, 1 keep / 0 skip
ALTER_TIMESTEP_EXPERT = "pysdcpp.alter.timestep_expert"  # [uint32] 1000: expert of training timestep t
ALTER_SKIP_SEMANTICS = "pysdcpp.alter.skip_semantics"    # names.SKIP_SEMANTICS
ALTER_MASK_SOURCE = "pysdcpp.alter.mask_source"    # "pruning_mask.pth" | "hypernet" | "json:<file name>"
ALTER_DROPPED_UNITS = "pysdcpp.alter.dropped_units"  # [str] units whose tensors the file leaves out; absent: none


def describes_unet(key: str) -> bool:
    """Whether a key describes the UNet (its family, variant, few-step kind, prediction, ALTER routing): a separate
    UNet file's values replace the model file's for these."""
    return key in (FAMILY, VARIANT, FEW_STEP, FEW_STEP_SOURCE, PREDICTION) or key.startswith(ALTER_PREFIX)
