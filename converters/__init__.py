"""Pure-Python checkpoint -> GGUF conversion for stable-diffusion.cpp (numpy, safetensors, gguf; no torch).

Pipeline: read (checkpoint_io) -> rename to the names stable-diffusion.cpp loads (sd_layout) -> check the
architecture -> attach ALTER routing metadata if there are masks (alter) -> write GGUF with upstream's type
rules (gguf_out).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from gguf import Keys

from pysdcpp.format import keys
from pysdcpp.format.checkpoint_io import (TensorSource, checkpoint_format, read_checkpoint_file,
                                          safetensors_metadata)
from pysdcpp.format.sampling import FEW_STEP_KINDS, few_step_from_metadata, few_step_from_scheduler
from pysdcpp.format.families import TEXT_ENCODERS
from pysdcpp.format.names import DIFFUSERS_PREDICTIONS, PREDICTIONS
from pysdcpp.format.routing import AlterRouting, routing_metadata

from . import alter
from .errors import ConversionError
from .gguf_out import OUTPUT_TYPES, ProgressFn, write_gguf
from .sd_layout import (ModelInfo, detect, map_single_file, map_tae, map_text_encoder, single_file_layout, map_unet,
                        map_vae)

__all__ = ["ConversionError", "ConversionReport", "OUTPUT_TYPES", "convert", "load_model_tensors"]
CONVERTER_VERSION = "1"

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin")


@dataclass
class ConversionReport:
    output: Path
    family: str
    variant: str
    layout: str
    prediction: str | None
    n_tensors: int
    types: dict[str, int] = field(default_factory=dict)
    alter: AlterRouting | None = None  # the routing written into the file, if any
    few_step: str | None = None        # sampling.FEW_STEP_KINDS recorded for the runtime's defaults


def _component_file(folder: Path, component: str) -> Path | None:
    sub = folder / component
    if not sub.is_dir():
        return None
    for name in _WEIGHT_FILES:
        if (sub / name).is_file():
            return sub / name
    raise ConversionError(f"{sub}: no weights file (looked for {', '.join(_WEIGHT_FILES)})")


def _scheduler_config(folder: Path | None) -> dict | None:
    cfg = folder / "scheduler" / "scheduler_config.json" if folder is not None else None
    return _json(cfg) if cfg is not None and cfg.is_file() else None


def _diffusers_prediction(folder: Path) -> str | None:
    cfg = _scheduler_config(folder)
    return DIFFUSERS_PREDICTIONS.get(cfg.get("prediction_type")) if cfg else None


def declared_few_step(src: Path, base: Path | None = None) -> tuple[str, str] | None:
    """(few-step kind, what declared it) for a conversion input: a diffusers folder's scheduler config, a
    safetensors file's ModelSpec metadata; None where the source declares nothing."""
    if src.is_dir():
        for folder in (src, base):
            cfg = _scheduler_config(folder)
            if cfg and (kind := few_step_from_scheduler(cfg)):
                return kind, f"scheduler/scheduler_config.json ({cfg.get('_class_name')})"
        return None
    if checkpoint_format(src) == "safetensors":
        found = few_step_from_metadata(safetensors_metadata(src))
        if found:
            return found[0], f"safetensors metadata {found[1]}"
    return None


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: a JSON object is needed")
    return value


def read_diffusers_folder(folder: Path, base: Path | None = None) -> tuple[list[TensorSource], str | None]:
    """UNet from `folder`; text encoders and VAE from `folder`, else from `base` (e.g. ALTER outputs). The UNet's
    layout is read from its weights and checked against its config.json."""
    unet = _component_file(folder, "unet")
    if unet is None:
        raise ConversionError(f"{folder}: no unet/ folder: not a diffusers Stable Diffusion pipeline folder")
    cfg_file = folder / "unet" / "config.json"
    config = _json(cfg_file) if cfg_file.is_file() else None
    tensors = map_unet(read_checkpoint_file(unet), config)
    for component, mapper in (("vae", map_vae), ("text_encoder", map_text_encoder),
                              ("text_encoder_2", lambda t: map_text_encoder(t, second=True))):
        path = _component_file(folder, component) or (base and _component_file(base, component))
        if component == "vae" and path is not None and (path.parent / "config.json").is_file() and \
                _json(path.parent / "config.json").get("_class_name") == "AutoencoderTiny":
            mapper = map_tae   # TAESD, as the SDXS models ship (detection checks the UNet decodes with one)
        if path is None:
            if component == "text_encoder_2":
                continue   # SDXL's; detection says if the UNet needs it
            raise ConversionError(f"{folder}: no {component}/ folder" + (f" (nor in {base})" if base else ""))
        tensors += mapper(read_checkpoint_file(path))
    prediction = _diffusers_prediction(folder) or (base and _diffusers_prediction(base)) or None
    return tensors, prediction


def load_model_tensors(input_path: str | os.PathLike, base: str | os.PathLike | None = None
                       ) -> tuple[list[TensorSource], ModelInfo, str, str | None]:
    """Read and rename a checkpoint: (tensors, detected model, layout name, prediction or None)."""
    path = Path(input_path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    if path.is_dir():
        tensors, prediction = read_diffusers_folder(path, Path(base) if base else None)
        layout = "diffusers-folder"
    else:
        raw = read_checkpoint_file(path)
        layout = {"ldm": "ldm-file", "diffusers": "diffusers-file"}.get(
            single_file_layout([t.name for t in raw]), "unknown")
        try:
            tensors = map_single_file(raw)
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from None
        prediction = None
    try:
        info = detect(tensors)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    if not info.has_text_encoder or not info.has_vae:
        encoders = " and ".join(TEXT_ENCODERS[info.family])
        missing = [n for n, ok in ((f"text encoder ({encoders})", info.has_text_encoder), ("VAE", info.has_vae))
                   if not ok]
        raise ConversionError(f"{path}: the checkpoint has no {' and no '.join(missing)}; a full "
                              f"{info.architecture.name} model is needed")
    return tensors, info, layout, prediction


def convert(input_path: str | os.PathLike, output_path: str | os.PathLike, out_type: str = "f16", *,
            prediction: str = "auto", base: str | os.PathLike | None = None, synthetic: bool = False,
            alter_masks: str | os.PathLike | None = None, drop_unused: bool = False, overwrite: bool = False,
            few_step: str = "auto", progress: ProgressFn | None = None) -> ConversionReport:
    """Convert a checkpoint (single file, diffusers folder or ALTER output folder) to a GGUF stable-diffusion.cpp loads.

    An ALTER folder's masks (pruning_mask.pth, else hypernet/) or a JSON mask file (`alter_masks`, any input;
    it wins over the folder's) become routing metadata; `drop_unused` leaves out the units no expert keeps. An
    existing output is refused unless `overwrite`; the file appears only when complete (written under a temporary
    name, then renamed).
    """
    if out_type not in OUTPUT_TYPES:
        raise ConversionError(f"unknown output type {out_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    if few_step not in ("auto", "none", *FEW_STEP_KINDS):
        raise ConversionError(f"few_step must be auto, none or one of {', '.join(FEW_STEP_KINDS)}, not {few_step!r}")
    if prediction != "auto" and prediction not in PREDICTIONS:
        raise ConversionError(f"prediction must be auto or one of {', '.join(PREDICTIONS)}, not {prediction!r}")
    output = Path(output_path)
    src = Path(input_path)
    if src.exists() and output.exists() and output.resolve() == src.resolve():
        raise ConversionError("the output path is the input checkpoint; refusing to overwrite it")
    if not output.parent.is_dir():
        raise ConversionError(f"{output.parent}: output folder does not exist")
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    tensors, info, layout, found_prediction = load_model_tensors(src, base)
    tensors, routing = alter.attach_routing(src, tensors, info.architecture.config, alter_masks,
                                            drop_unused)
    pred = found_prediction if prediction == "auto" else prediction
    meta: dict[str, object] = {
        Keys.General.NAME: src.stem if src.is_file() else src.name,
        keys.FAMILY: info.family,
        keys.VARIANT: info.variant,
        keys.SOURCE: src.name,
        keys.SOURCE_LAYOUT: layout,
        keys.OUTPUT_TYPE: out_type,
        keys.CONVERTER_VERSION: CONVERTER_VERSION,
    }
    if pred:
        meta[keys.PREDICTION] = pred
    declared = declared_few_step(src, Path(base) if base else None) if few_step == "auto" else \
        None if few_step == "none" else (few_step, "the user (--few-step)")
    if declared:
        meta[keys.FEW_STEP], meta[keys.FEW_STEP_SOURCE] = declared
    if synthetic:
        meta[keys.SYNTHETIC] = True
    if routing is not None:
        meta.update(routing_metadata(routing))
    types = write_gguf(output, tensors, out_type, meta, progress)
    return ConversionReport(output, info.family, info.variant, layout, pred, sum(types.values()), types, routing,
                            declared[0] if declared else None)
