"""The Python API: `StableDiffusion`, one object owning one native context.

    with StableDiffusion("model.gguf", threads=4, backend="accelerated") as sd:
        images = sd.generate("a lighthouse at dusk", num_inference_steps=20, guidance_scale=7.0, seed=42)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from . import _native
from .errors import GenerationError, ModelLoadError, PySDCppError
from .format.families import context_width, default_image_size, y_width
from .format.names import FAMILIES, PREDICTIONS, SKIP_SEMANTICS
from .format.sampling import generation_defaults
from .images import GenerationImages, check_control_scale, checked_images
from .modelfile import ModelFile, read_control_net, read_model_file, read_tiny_autoencoder, with_unet

StepCallback = Callable[[int, int, float], None]
PreviewCallback = Callable[[int, Image.Image], None]
PREVIEW_MODES = ("proj", "vae", "tae")  # the library's latent previews (sd-cli's --preview)

# Convolution algorithms per library: upstream's two, plus Winograd in the accelerated one (which picks
# F(4x4), F(2x2) or im2col per layer).
CONV_ALGORITHMS = {"upstream": ("im2col", "direct"), "accelerated": ("im2col", "direct", "winograd")}
DEFAULT_CONV = {"upstream": "im2col", "accelerated": "winograd"}
ATTENTION_PATHS = {"upstream": ("upstream",), "accelerated": ("upstream", "fast")}
DEFAULT_ATTENTION = {"upstream": "upstream", "accelerated": "fast"}
LINEAR_PATHS = {"upstream": ("upstream",), "accelerated": ("upstream", "fast")}
DEFAULT_LINEAR = {"upstream": "upstream", "accelerated": "fast"}


@dataclass
class GenerationParams:
    """Everything that determines an image, in diffusers' names; recorded in the PNG's parameters."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    num_inference_steps: int = 20
    guidance_scale: float = 7.0
    sampler: str = "euler_a"
    scheduler: str = "default"
    seed: int = 42
    batch_size: int = 1
    clip_skip: int = -1
    step_cache: str | None = None  # upstream's step-level cache, a pysdcpp.step_cache spec (ucache, spectrum)
    vae_tiling: str | None = None  # VAE in tiles, a pysdcpp.vae_tiling spec ("32x32", "16x16:overlap=0.25")
    loras: tuple | None = None  # ((path, weight), ...) of loras= (the prompt's <lora:name:w> tags stay in it)
    eta: float | None = None  # the samplers' noise multiplier; None: the sampler's own (1 ancestral, 0 ddim/tcd)
    sigmas: tuple | None = None  # a custom noise schedule, num_inference_steps + 1 values, decreasing, to 0
    hires_fix: str | None = None  # upscale and denoise again, a pysdcpp.hires spec ("latent:scale=2,strength=0.6")
    image_guidance_scale: float | None = None  # pix2pix/inpaint models' image guidance; None: guidance_scale's

    def validate(self, samplers: list[str], schedulers: list[str], multiple: int = 64) -> None:
        """Check every field; `multiple`: what width and height must be multiples of (8 per latent pixel, times 2
        per UNet downsampler: 64 for SD1.x/SD2.x, 32 for SDXL and the three-level tiny UNets)."""
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise TypeError("prompt and negative_prompt must be strings")
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {v!r}")
            if v % multiple:
                # The latent is 1/8 of the image and the UNet halves it once per level after the first; upstream
                # would silently enlarge the image instead.
                raise ValueError(f"{name} must be a multiple of {multiple} for this model (the UNet downsamples "
                                 f"the 1/8-size latent {multiple.bit_length() - 4} times), got {v}")
            if v > 4096:
                raise ValueError(f"{name} {v} is larger than 4096")
        if not isinstance(self.num_inference_steps, (int, np.integer)) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps!r}")
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {self.guidance_scale!r}")
        if not isinstance(self.batch_size, (int, np.integer)) or not 1 <= self.batch_size <= 64:
            raise ValueError(f"batch_size must be between 1 and 64, got {self.batch_size!r}")
        if not isinstance(self.seed, (int, np.integer)) or not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if self.sampler not in samplers:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(samplers)}")
        if self.scheduler != "default" and self.scheduler not in schedulers:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose default or one of "
                             f"{', '.join(schedulers)}")
        if self.step_cache is not None:
            from .step_cache import parse_step_cache

            parse_step_cache(self.step_cache)
        if self.eta is not None and (isinstance(self.eta, bool) or not isinstance(self.eta, (int, float))
                                     or not math.isfinite(self.eta) or self.eta < 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta!r}")
        if self.sigmas is not None:
            sig = self.sigmas
            if (not isinstance(sig, (tuple, list)) or len(sig) < 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               and v >= 0 for v in sig)
                    or any(a <= b for a, b in zip(sig, sig[1:]))):
                raise ValueError("sigmas must be at least two finite, non-negative, strictly decreasing numbers "
                                 f"(the last normally 0), got {sig!r}")
            if len(sig) - 1 != self.num_inference_steps:
                raise ValueError(f"{len(sig)} sigmas make {len(sig) - 1} steps, not num_inference_steps="
                                 f"{self.num_inference_steps}")
        if self.hires_fix is not None:
            from .hires import parse_hires

            parse_hires(self.hires_fix)
        if self.image_guidance_scale is not None and (
                isinstance(self.image_guidance_scale, bool) or not isinstance(self.image_guidance_scale, (int, float))
                or not math.isfinite(self.image_guidance_scale)):
            raise ValueError(f"image_guidance_scale must be a finite number, got {self.image_guidance_scale!r}")
        if self.vae_tiling is not None:
            from .vae_tiling import parse_vae_tiling

            if not isinstance(self.vae_tiling, str):
                raise TypeError("GenerationParams.vae_tiling is a spec string (pysdcpp.vae_tiling)")
            parse_vae_tiling(self.vae_tiling)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    params: GenerationParams
    seconds: float
    step_seconds: list[float] = field(default_factory=list)
    backend: str = ""
    alter_steps: list = field(default_factory=list)  # AlterStep per sampling step when ALTER routing ran
    inherited: list = field(default_factory=list)  # InheritedEvaluation per UNet evaluation when inheritance ran
    step_cache_skipped: int | None = None  # steps the step cache skipped (no UNet evaluation), when one ran
    images_in: GenerationImages = field(default_factory=GenerationImages)  # img2img/inpainting inputs, sized
    upscaled: tuple | None = None  # (upscaler file name, factor per pass, passes) when the context's upscaler ran


# Display names A1111/ComfyUI users know, for the PNG parameters chunk.
_A1111_SAMPLERS = {"euler_a": "Euler a", "euler": "Euler", "heun": "Heun", "dpm2": "DPM2",
                   "dpm++2s_a": "DPM++ 2S a", "dpm++2m": "DPM++ 2M", "dpm++2mv2": "DPM++ 2M v2",
                   "ipndm": "IPNDM", "ipndm_v": "IPNDM_V", "lcm": "LCM", "ddim_trailing": "DDIM",
                   "tcd": "TCD"}


def png_parameters(p: GenerationParams, model_name: str, backend: str, version: str,
                   inheritance: str | None = None, images: GenerationImages | None = None,
                   upscaled: tuple | None = None) -> str:
    """The `parameters` text chunk in the A1111 layout (prompt, negative prompt, then key: value pairs; a value
    with commas in quotes); `inheritance`: the policy's spec, when one ran; `images`: img2img's inputs;
    `upscaled`: GenerationResult.upscaled."""
    fields = [("Steps", p.num_inference_steps), ("Sampler", _A1111_SAMPLERS.get(p.sampler, p.sampler))]
    if images is not None and images.image is not None:
        fields.append(("Denoising strength", f"{images.strength:g}"))
        if images.mask_image is not None:
            fields.append(("Inpaint", "masked"))
    if images is not None and images.control_image is not None:
        fields.append(("ControlNet weight", f"{images.control_scale:g}"))
    if images is not None and images.ref_images:
        fields.append(("Edit images", len(images.ref_images)))
    if p.image_guidance_scale is not None:
        fields.append(("Image CFG scale", f"{p.image_guidance_scale:g}"))
    if images is not None and images.id_images:
        fields += [("PhotoMaker ID images", len(images.id_images)),
                   ("PhotoMaker style strength", f"{images.style_strength:g}")]
    if p.scheduler != "default":
        fields.append(("Schedule type", p.scheduler))
    fields += [("CFG scale", f"{p.guidance_scale:g}"), ("Seed", p.seed), ("Size", f"{p.width}x{p.height}"),
               ("Model", model_name)]
    if p.clip_skip > 0:
        fields.append(("Clip skip", p.clip_skip))
    if p.step_cache:
        fields.append(("Step cache", f'"{p.step_cache}"' if "," in p.step_cache else p.step_cache))
    if p.vae_tiling:
        fields.append(("VAE tiling", p.vae_tiling))
    if p.eta is not None:
        fields.append(("Eta", f"{p.eta:g}"))
    if p.hires_fix is not None:
        fields.append(("Hires fix", f'"{p.hires_fix}"' if "," in p.hires_fix else p.hires_fix))
    if p.sigmas is not None:
        fields.append(("Sigmas", '"' + ", ".join(f"{v:g}" for v in p.sigmas) + '"'))
    if p.loras:
        text = ", ".join(f"{Path(path).stem}:{w:g}" for path, w in p.loras)
        fields.append(("LoRAs", f'"{text}"' if "," in text else text))
    if inheritance:
        fields.append(("Inheritance", f'"{inheritance}"' if "," in inheritance else inheritance))
    if upscaled:
        name, factor, passes = upscaled
        fields += [("Postprocess upscaler", name), ("Postprocess upscale by", factor ** passes)]
    fields.append(("Version", f"pysdcpp {version} ({backend})"))
    text = p.prompt
    if p.negative_prompt:
        text += f"\nNegative prompt: {p.negative_prompt}"
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in fields)


EMBEDDING_EXTENSIONS = (".gguf", ".safetensors", ".pt")


def _embedding_files(embeddings) -> dict[str, Path]:
    """Textual-inversion embeddings: a folder (each .gguf/.safetensors/.pt file under its stem, as sd-cli's
    --embd-dir) or {name: path}; every file must be there."""
    if embeddings is None:
        return {}
    if isinstance(embeddings, (str, os.PathLike)):
        folder = Path(embeddings)
        if not folder.is_dir():
            raise ValueError(f"embeddings {folder}: no such folder")
        return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in EMBEDDING_EXTENSIONS}
    if not isinstance(embeddings, dict):
        raise TypeError("embeddings is a folder or a {name: path} dict")
    out = {}
    for name, path in embeddings.items():
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(f"an embedding's name is one word, not {name!r}")
        if not Path(path).is_file():
            raise ValueError(f"embedding {name}: {path}: no such file")
        out[name] = Path(path)
    return out


def _threads(threads: int | None, lib: _native.NativeLibrary) -> int:
    if threads is None:
        return max(1, int(lib.lib.sd_get_num_physical_cores()))
    if not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return int(threads)


def _kernel_choice(option: str, value: str, choices: dict, defaults: dict, backend: str) -> str:
    """A per-context kernel option: "default" is the library's default, anything else one of its choices."""
    if value == "default":
        return defaults[backend]
    if value not in choices[backend]:
        raise ValueError(f"{option} must be one of {', '.join(choices[backend])} with the {backend} library, "
                         f"not {value!r}")
    return value


class NativeHandle:
    """What owns a native context: close() frees it; `with` and garbage collection close it too."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class StableDiffusion(NativeHandle):
    """A loaded model in one of the two native libraries; close it (or use `with`) to free its memory."""

    def __init__(self, model: str | os.PathLike, *, threads: int | None = None, backend: str = "accelerated",
                 vae: str | os.PathLike | None = None, unet: str | os.PathLike | None = None,
                 taesd: str | os.PathLike | None = None, taesd_preview_only: bool = False,
                 control_net: str | os.PathLike | None = None,
                 lora_dir: str | os.PathLike | None = None, embeddings=None,
                 upscaler: str | os.PathLike | None = None, upscale_repeats: int = 1,
                 photo_maker: str | os.PathLike | None = None, lora_apply_mode: str = "auto",
                 prediction: str = "auto", rng: str = "cuda",
                 vae_decode_only: bool = False, conv: str = "default", winograd_cache_mb: int | None = None,
                 attention: str = "default", linear: str = "default", batch_guidance: bool | None = None,
                 alter: bool | None = None, alter_semantics: str = "default",
                 alter_masks: str | os.PathLike | None = None,
                 progress: Callable[[int, int, float], None] | None = None):
        self._ctx = None
        self._upscaler = None
        self._inherit = None  # the NativePlan of the generation or InheritanceSession running, if any
        if backend not in _native.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(_native.BACKENDS)}, not {backend!r}")
        self.conv = _kernel_choice("conv", conv, CONV_ALGORITHMS, DEFAULT_CONV, backend)
        self.attention = _kernel_choice("attention", attention, ATTENTION_PATHS, DEFAULT_ATTENTION, backend)
        self.linear = _kernel_choice("linear", linear, LINEAR_PATHS, DEFAULT_LINEAR, backend)
        # a guided step's cond and uncond as one batch-2 UNet evaluation (the accelerated library's default)
        if batch_guidance not in (None, True, False):
            raise ValueError(f"batch_guidance must be True, False or None (the library's default), not "
                             f"{batch_guidance!r}")
        if batch_guidance and backend != "accelerated":
            raise ValueError("batch_guidance=True needs the accelerated library (upstream evaluates cond and uncond "
                             "one after the other)")
        self.batch_guidance = backend == "accelerated" if batch_guidance is None else batch_guidance
        if winograd_cache_mb is not None and (not isinstance(winograd_cache_mb, (int, np.integer))
                                              or winograd_cache_mb < 0):
            raise ValueError(f"winograd_cache_mb must be a non-negative integer, got {winograd_cache_mb!r}")
        from .lora import APPLY_MODES

        if lora_apply_mode not in APPLY_MODES:
            raise ValueError(f"lora_apply_mode must be one of {', '.join(APPLY_MODES)}, not {lora_apply_mode!r}")
        if lora_dir is not None and not Path(lora_dir).is_dir():
            raise ValueError(f"lora_dir {lora_dir}: no such folder")
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.lora_apply_mode = lora_apply_mode
        self._lora_state: tuple = ()   # the LoRAs the last generation applied (what the weights hold, immediately)
        self.embeddings = _embedding_files(embeddings)
        if not isinstance(taesd_preview_only, bool) or (taesd_preview_only and taesd is None):
            raise ValueError("taesd_preview_only=True keeps the VAE for the images and decodes previews with the "
                             "tiny autoencoder: give taesd= too")
        self.taesd_preview_only = taesd_preview_only
        if (isinstance(upscale_repeats, bool) or not isinstance(upscale_repeats, (int, np.integer))
                or not 1 <= upscale_repeats <= 4):
            raise ValueError(f"upscale_repeats must be 1 to 4, got {upscale_repeats!r}")
        self.upscale_repeats = int(upscale_repeats)
        if upscaler is not None:
            from .upscaler import check_esrgan_file

            check_esrgan_file(upscaler)
        if not isinstance(vae_decode_only, bool):
            raise ValueError(f"vae_decode_only must be True or False, not {vae_decode_only!r}")
        self.vae_decode_only = vae_decode_only   # True saves the VAE encoder's memory; img2img then cannot run
        if prediction != "auto" and prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be auto or one of {', '.join(PREDICTIONS)}, not {prediction!r}")
        self.model_file: ModelFile = read_model_file(model)
        unet_file = read_model_file(unet) if unet is not None else None
        if unet_file is not None:   # what the native loader will see: the model with the UNet file's tensors
            self.model_file = with_unet(self.model_file, unet_file)
        vae_file = read_model_file(vae) if vae is not None else None
        taesd_file = read_tiny_autoencoder(taesd) if taesd is not None else None
        self.control_net = read_control_net(control_net) if control_net is not None else None
        self.photo_maker = None   # a PhotoMakerFile: generations take input_id_images (pysdcpp.photomaker)
        if photo_maker is not None:
            from .photomaker import read_photo_maker

            self.photo_maker = read_photo_maker(photo_maker, self.model_file)
        self._photo_maker_merged = False   # the library merges PhotoMaker's LoRA at the first generation
        self.alter = self._alter_routing(backend, alter, alter_semantics, alter_masks)
        self.backend = backend
        self.native = _native.load(backend)
        ffi, lib = self.native.ffi, self.native.lib
        self.threads = _threads(threads, self.native)
        # Memory for Winograd's transformed filters while a component computes; the default is the library's
        # (1536 MB, measured in docs/benchmarks.md). Set before every compute: budgets are per context.
        if winograd_cache_mb is None:
            winograd_cache_mb = (int(lib.pysdcpp_winograd_cache_default_budget()) >> 20
                                 if self.native.has_components else 0)
        self.winograd_cache_mb = int(winograd_cache_mb)
        self.samplers, self.schedulers = generation_choices(backend)
        rngs = self.native.enum_names("sd_rng_type_name", int(lib.RNG_TYPE_COUNT))
        if rng not in rngs:
            raise ValueError(f"rng must be one of {', '.join(rngs)}, not {rng!r}")
        if prediction == "auto":
            prediction = self.model_file.prediction or "auto"
        self.prediction = prediction

        self._keep = []  # C strings that must outlive the context's creation
        params = ffi.new("sd_ctx_params_t*")
        lib.sd_ctx_params_init(params)
        params.model_path = self._cstr(str(self.model_file.path))
        if vae_file is not None:
            params.vae_path = self._cstr(str(vae_file.path))
        if unet_file is not None:
            params.diffusion_model_path = self._cstr(str(unet_file.path))
        if taesd_file is not None:   # decodes (and encodes) with the tiny autoencoder instead of the VAE
            params.taesd_path = self._cstr(str(taesd_file.path))
            params.tae_preview_only = taesd_preview_only   # or only the previews
        self.taesd = taesd_file.path if taesd_file is not None else None
        if self.control_net is not None:
            params.control_net_path = self._cstr(str(self.control_net.path))
        if self.photo_maker is not None:
            params.photo_maker_path = self._cstr(str(self.photo_maker.path))
        if self.embeddings:   # textual inversion: a prompt word equal to a name reads that file's vectors
            table = ffi.new("sd_embedding_t[]", len(self.embeddings))
            self._keep.append(table)
            for i, (name, path) in enumerate(sorted(self.embeddings.items())):
                table[i].name, table[i].path = self._cstr(name), self._cstr(str(path))
            params.embeddings, params.embedding_count = table, len(self.embeddings)
        params.n_threads = self.threads
        params.free_params_immediately = False  # one context serves many generations
        params.vae_decode_only = vae_decode_only
        params.lora_apply_mode = lib.str_to_lora_apply_mode(lora_apply_mode.encode())
        params.rng_type = lib.str_to_rng_type(rng.encode())
        params.sampler_rng_type = params.rng_type
        if prediction != "auto":
            params.prediction = lib.EPS_PRED if prediction == "eps" else lib.V_PRED
        params.diffusion_conv_direct = params.vae_conv_direct = conv == "direct"
        with self.native.lock:
            self.native.set_progress(progress)
            self.native.take_errors()
            missing = []
            if self.alter is not None and self.alter.routing.dropped:
                # Units no expert keeps were left out of the file (convert --drop-unused): never computed.
                from .alter_runtime import missing_ok_prefixes

                missing = [ffi.new("char[]", p.encode()) for p in missing_ok_prefixes(self.alter.routing)]
                lib.pysdcpp_alter_set_missing_ok(ffi.new("const char*[]", missing), len(missing))
            self.native.arm_stop()
            try:
                ctx = lib.new_sd_ctx(params)
            finally:
                self.native.set_progress(None)
                stop = self.native.disarm_stop()
                if missing:
                    lib.pysdcpp_alter_set_missing_ok(ffi.NULL, 0)
            if stop is not None:   # Ctrl-C (or the progress callback) while loading
                if ctx != ffi.NULL:
                    lib.free_sd_ctx(ctx)
                raise stop
            if ctx == ffi.NULL:
                why = self.native.take_errors() or "see the pysdcpp.native log for details"
                what = self.model_file.path if unet_file is None else f"{self.model_file.path} with {unet_file.path}"
                raise ModelLoadError(f"could not load {what}: {why}")
        self._ctx = ctx
        self._keep.clear()
        if upscaler is not None:   # after the model: a failed load leaves nothing to free
            from .upscaler import Upscaler

            try:
                self._upscaler = Upscaler(upscaler, threads=self.threads, backend=backend,
                                          conv="default" if conv == "direct" else conv)
            except BaseException:
                self.close()
                raise

    def _alter_routing(self, backend: str, alter: bool | None, semantics: str, masks):
        """The ALTER routing this context runs with (None: dense): a JSON mask file's (`alter_masks`, for masks
        not converted into the file) or the file's own, as the alter= arguments say."""
        from .alter_runtime import NativeRouting, routing_of

        if alter not in (None, True, False):
            raise ValueError(f"alter must be True, False or None (on when the file has routing), not {alter!r}")
        if semantics != "default" and semantics not in SKIP_SEMANTICS:
            raise ValueError(f"alter_semantics must be default, {' or '.join(SKIP_SEMANTICS)}, not {semantics!r}")
        if masks is not None:
            if alter is False:
                raise ValueError("alter_masks with alter=False: give one or the other")
            if not Path(masks).is_file():
                raise ValueError(f"{masks}: no such mask file")
            alter = True  # asking for masks is asking for routing
        routing = routing_of(self.model_file, masks) if self.model_file.format == "gguf" or masks else None
        path = self.model_file.path
        if routing is None:
            if alter:
                raise ValueError(f"{path} carries no ALTER routing (convert an ALTER output, or pass "
                                 "--alter-masks to pysdcpp convert)")
            return None
        on = alter is not False and backend == "accelerated"
        if alter and backend != "accelerated":
            raise ValueError("ALTER routing runs in the accelerated library; use backend='accelerated' or "
                             "alter=False for the dense model")
        if not on:
            if routing.dropped:
                raise ModelLoadError(f"{path} leaves out the weights of {len(routing.dropped)} units no expert "
                                     "keeps (convert --drop-unused): it runs only with ALTER routing on, in the "
                                     "accelerated library")
            return None
        return NativeRouting(routing, routing.semantics if semantics == "default" else semantics,
                             self.model_file.unet_layout)

    def _cstr(self, s: str):
        buf = self.native.ffi.new("char[]", s.encode("utf-8"))
        self._keep.append(buf)
        return buf

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        if self._upscaler is not None:
            self._upscaler.close()
            self._upscaler = None
        if self._ctx is not None:
            with self.native.lock:
                self.native.lib.free_sd_ctx(self._ctx)
                if self.native.has_components:
                    # Cached Winograd filters point into this context's weights, which are gone now.
                    self.native.lib.pysdcpp_winograd_cache_clear()
                    if self._inherit is not None and getattr(self.native, "inherit_owner", None) is self._inherit:
                        self.native.lib.pysdcpp_inherit_clear()   # an inheritance session left open
                        self.native.inherit_owner = None
            self._ctx = None

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def _require_open(self):
        if self._ctx is None:
            raise PySDCppError("this StableDiffusion context is closed")
        return self._ctx

    def _select_kernels(self) -> None:
        """The conv, attention and linear hooks read process-wide settings: set this context's before every compute
        (under the lock)."""
        if self.native.has_components:
            lib = self.native.lib
            lib.pysdcpp_set_conv_algorithm(lib.PYSDCPP_CONV_WINOGRAD_F4 if self.conv == "winograd"
                                           else lib.PYSDCPP_CONV_IM2COL)
            lib.pysdcpp_set_attention_mode(lib.PYSDCPP_ATTN_FAST if self.attention == "fast"
                                           else lib.PYSDCPP_ATTN_UPSTREAM)
            lib.pysdcpp_set_linear_mode(lib.PYSDCPP_LINEAR_FAST if self.linear == "fast"
                                        else lib.PYSDCPP_LINEAR_UPSTREAM)
            lib.pysdcpp_set_winograd_cache_budget(self.winograd_cache_mb << 20)
            lib.pysdcpp_set_winograd_threads(self.threads)   # filters cached at graph build use this context's
            lib.pysdcpp_set_guidance_batch(int(self.batch_guidance))
            if self.alter is not None:
                self.alter.install(self.native.ffi, lib)
            else:
                lib.pysdcpp_alter_clear()
            # The inheritance plan is process-wide too, and installing one empties its caches: only when another
            # plan (or none) is in place.
            if getattr(self.native, "inherit_owner", None) is not self._inherit:
                if self._inherit is not None:
                    self._inherit.install(self.native.ffi, lib)
                else:
                    lib.pysdcpp_inherit_clear()
                self.native.inherit_owner = self._inherit

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt: str, negative_prompt: str = "", *, width: int | None = None,
                 height: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None,
                 scheduler: str = "default", seed: int | None = 42, batch_size: int = 1,
                 num_images_per_prompt: int | None = None, clip_skip: int = -1,
                 image=None, strength: float = 0.8, mask_image=None, control_image=None,
                 controlnet_conditioning_scale: float = 1.0,
                 inheritance=None, step_cache: str | None = None, vae_tiling=False,
                 vae_tile_overlap: float | None = None, loras=None, eta: float | None = None, sigmas=None,
                 hires_fix: str | None = None, ref_images=None, image_guidance_scale: float | None = None,
                 input_id_images=None, style_strength: float | None = None,
                 callback: StepCallback | None = None, preview: PreviewCallback | None = None,
                 preview_mode: str = "proj", preview_interval: int = 1, preview_noisy: bool = False
                 ) -> list[Image.Image]:
        """Text to image, or image to image with `image`; returns PIL images.

        `callback(step, steps, seconds)` is called after every step; an exception it raises (raise
        pysdcpp.StopGeneration to just stop; Ctrl-C's KeyboardInterrupt too) stops the run before its next step in
        the accelerated library (the upstream library finishes the run first) and comes out of generate(), with no
        image. `seed`: None or a negative one draws a random seed (GenerationResult.params has it). Width
        and height default to the family's size (SD1.x 512, SD2.x 768, SDXL 1024); steps, guidance and sampler to
        20, 7.0 and euler_a, or for a few-step model (the file records turbo or lcm) to its kind's
        (`pysdcpp.format.sampling`: turbo 1 step, guidance off, euler_a; lcm 4 steps, guidance off, lcm).
        guidance_scale 1.0 turns guidance off (one UNet evaluation per step). `inheritance` (accelerated
        library): a pysdcpp.inheritance policy (DeepCache, UnitSchedule or a Plan) whose units reuse their last
        computed contribution at the steps it says (docs/inheritance.md). `step_cache`: upstream's step-level
        cache, `ucache[:threshold=..,start=..,end=..,decay=..,relative=..,reset=..]` or `spectrum[:w=..,m=..,
        lam=..,window=..,flex=..,warmup=..,stop=..]` as sd-cli's --cache-mode/--cache-option take them; a step it
        skips reuses (or forecasts) the whole UNet output (pysdcpp.step_cache).

        img2img: `image` (PIL, numpy or a path; pysdcpp.images) is encoded and noised to `strength` (0 < strength
        <= 1: the share of the steps that run; 1 starts from noise and the image); width and height default to its
        size. Inpainting: `mask_image` too, white where to repaint; an inpainting model (9 input channels) sees the
        masked image, any other model keeps the unmasked latent at every step. ControlNet (a context made with
        control_net=): `control_image` (the hint: edges, depth, pose... as the ControlNet was trained) and
        `controlnet_conditioning_scale`, the weight of its residuals. `num_images_per_prompt` is diffusers'
        name for batch_size (give one of the two). `vae_tiling`: True, a tile size in latent pixels (int or (x, y))
        or a spec "TXxTY:overlap=O" (pysdcpp.vae_tiling): the VAE encodes and decodes in overlapping tiles, which
        bounds its memory; `vae_tile_overlap` the tiles' overlap (0.5). `loras`: {path: weight} or (path, weight)
        pairs, on top of the prompt's `<lora:name:weight>` tags (names in the context's lora_dir; pysdcpp.lora).
        A generation with other LoRAs than the last one drops the Winograd filters cached from the old weights.
        `eta`: the samplers' noise multiplier (None: the sampler's default). `sigmas`: a custom noise schedule,
        decreasing to 0; it sets the step count (len(sigmas) - 1). `hires_fix`: generate, upscale, denoise again
        ("latent:scale=2,steps=0,strength=0.7", or an ESRGAN file's path as the upscaler; pysdcpp.hires).
        Instruct-Pix2Pix models (variant pix2pix): `ref_images`, the image to edit (one, or a list), and
        `image_guidance_scale`, how closely to keep it (None: the same as guidance_scale, upstream's default,
        which runs no separate image condition; diffusers' default is 1.5). PhotoMaker (a context made with
        photo_maker=, SDXL): `input_id_images`, the ID images (one, a list, or a folder read as sd-cli's
        --pm-id-images-dir), with the prompt's trigger word after its class word ("a woman img, ..."), and
        `style_strength`, the percentage of the steps before the ID joins (20; pysdcpp.photomaker).

        `preview(step, image)`: called with a preview of the latent at every `preview_interval`-th step:
        `preview_mode` "proj" (a linear map of the latent to RGB at its size, 1/8 of the image's: cheap), "vae"
        (the full decode) or "tae" (the tiny autoencoder of a context made with taesd=; with
        taesd_preview_only=True the images still decode with the VAE). The library previews every step whatever
        the interval (its own interval is not used), so "vae" and "tae" cost a decode each step. `preview_noisy`:
        the noisy input of each step instead of its denoised estimate. An exception it raises stops the run as
        the step callback's does. A context made with upscaler= (an ESRGAN file) returns its images upscaled
        upscale_repeats times."""
        return self.generate_with_info(prompt, negative_prompt, width=width, height=height,
                                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                       sampler=sampler, scheduler=scheduler, seed=seed, batch_size=batch_size,
                                       num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip,
                                       image=image, strength=strength, mask_image=mask_image,
                                       control_image=control_image,
                                       controlnet_conditioning_scale=controlnet_conditioning_scale,
                                       inheritance=inheritance, step_cache=step_cache, vae_tiling=vae_tiling,
                                       vae_tile_overlap=vae_tile_overlap, loras=loras, eta=eta, sigmas=sigmas,
                                       hires_fix=hires_fix, ref_images=ref_images,
                                       image_guidance_scale=image_guidance_scale, input_id_images=input_id_images,
                                       style_strength=style_strength, callback=callback,
                                       preview=preview, preview_mode=preview_mode,
                                       preview_interval=preview_interval, preview_noisy=preview_noisy).images

    def generate_with_info(self, prompt: str, negative_prompt: str = "", *, callback: StepCallback | None = None,
                           inheritance=None, preview: PreviewCallback | None = None, preview_mode: str = "proj",
                           preview_interval: int = 1, preview_noisy: bool = False, **kwargs) -> GenerationResult:
        if preview is not None:
            if not callable(preview):
                raise TypeError("preview must be a function (step, image)")
            if preview_mode not in PREVIEW_MODES:
                raise ValueError(f"preview_mode must be one of {', '.join(PREVIEW_MODES)}, not {preview_mode!r}")
            if preview_mode == "tae" and self.taesd is None:
                raise ValueError('preview_mode="tae" needs a context made with taesd= (and taesd_preview_only=True '
                                 'to keep the VAE for the images)')
            if (isinstance(preview_interval, bool) or not isinstance(preview_interval, (int, np.integer))
                    or preview_interval < 1):
                raise ValueError(f"preview_interval must be a positive integer, got {preview_interval!r}")
            if not isinstance(preview_noisy, bool):
                raise ValueError(f"preview_noisy must be True or False, not {preview_noisy!r}")
        checked = checked_generation(self.model_file, self.backend, prompt, negative_prompt, inheritance=inheritance,
                                     lora_dir=self.lora_dir, photo_maker=self.photo_maker, **kwargs)
        p, step_cache, inputs = checked.params, checked.step_cache, checked.images
        if inputs.image is not None and self.vae_decode_only:
            raise ValueError("img2img needs the VAE encoder: this context was made with vae_decode_only=True")
        if inputs.control_image is not None and self.control_net is None:
            raise ValueError("control_image needs a ControlNet: StableDiffusion(..., "
                             "control_net='controlnet.safetensors')")
        native_plan = self._native_plan(checked.plan)
        ctx = self._require_open()
        ffi, lib = self.native.ffi, self.native.lib
        keep = []

        def cstr(s: str):
            keep.append(ffi.new("char[]", s.encode("utf-8")))
            return keep[-1]

        g = ffi.new("sd_img_gen_params_t*")
        lib.sd_img_gen_params_init(g)
        g.prompt = cstr(checked.library_prompt)
        g.negative_prompt = cstr(p.negative_prompt)
        g.width, g.height = p.width, p.height
        g.seed = p.seed
        g.batch_count = p.batch_size
        g.clip_skip = p.clip_skip
        g.sample_params.sample_steps = p.num_inference_steps
        g.sample_params.guidance.txt_cfg = float(p.guidance_scale)
        g.sample_params.sample_method = lib.str_to_sample_method(p.sampler.encode())
        g.sample_params.scheduler = (lib.SCHEDULER_COUNT if p.scheduler == "default"
                                     else lib.str_to_scheduler(p.scheduler.encode()))
        if step_cache is not None:
            step_cache.apply(lib, g.cache)
        if p.eta is not None:
            g.sample_params.eta = float(p.eta)
        if p.image_guidance_scale is not None:
            g.sample_params.guidance.img_cfg = float(p.image_guidance_scale)
        if checked.hires is not None:
            checked.hires.apply(g.hires, keep, ffi)
        if p.sigmas is not None:
            keep.append(ffi.new("float[]", [float(v) for v in p.sigmas]))
            g.sample_params.custom_sigmas, g.sample_params.custom_sigmas_count = keep[-1], len(p.sigmas)
        inputs.fill(ffi, g, keep)
        if checked.tiling is not None:
            checked.tiling.apply(g.vae_tiling_params)
        from . import lora

        loras = checked.loras
        lora.fill(ffi, g, loras, keep)
        step_times: list[float] = []
        step_marks: list[tuple[int, int]] = []  # (step, UNet evaluations recorded so far), for the ALTER report

        def on_preview(step: int, image: Image.Image, _noisy: bool) -> None:
            if step % preview_interval == 0 or step == p.num_inference_steps:
                preview(step, image)

        def on_step(step: int, steps: int, seconds: float) -> None:
            step_times.append(seconds)
            if self.alter is not None:
                step_marks.append((step, int(lib.pysdcpp_alter_history(ffi.NULL, ffi.NULL, 0))))
            if callback is not None:
                callback(step, steps, seconds)

        t0 = time.perf_counter()
        with self.native.lock:
            self._inherit = native_plan
            try:
                self._select_kernels()
                if self.alter is not None:
                    lib.pysdcpp_alter_history_clear()
                if native_plan is not None:
                    lib.pysdcpp_inherit_history_clear()
                self.native.set_progress(on_step)
                if preview is not None:
                    self.native.set_preview(on_preview, preview_mode, preview_interval, preview_noisy)
                self.native.take_errors()
                merges = self.photo_maker is not None and not self._photo_maker_merged
                if (loras != self._lora_state or merges) and self.native.has_components:
                    # In "immediately" mode (and PhotoMaker's LoRA always) the library is about to change the
                    # weights in place: filters transformed from the old ones (component calls keep them) must go.
                    lib.pysdcpp_winograd_cache_clear()
                self.native.arm_stop()
                try:
                    with self.native.capture() as log_lines:
                        out = lib.generate_image(ctx, g)
                finally:
                    self._lora_state = loras
                    self._photo_maker_merged = self.photo_maker is not None
                    self.native.set_progress(None)
                    if preview is not None:
                        self.native.set_preview(None)
                    stop = self.native.disarm_stop()
                if stop is not None:   # the callback (or Ctrl-C) stopped the run: no image
                    if out != ffi.NULL:
                        _take_images(ffi, out, p.batch_size)
                    raise stop
                if out == ffi.NULL:
                    raise GenerationError(f"generation failed: {self.native.take_errors() or 'see the log'}")
                images = _take_images(ffi, out, p.batch_size)
                upscaled = None
                if self._upscaler is not None:
                    images = [self._upscale(img) for img in images]
                    upscaled = (self._upscaler.model.stem, self._upscaler.factor, self.upscale_repeats)
                alter_steps = self._alter_report(step_marks, p) if self.alter is not None else []
                inherited = self._inheritance_report(native_plan, p.height, p.width) if native_plan else []
                skipped = None
                if step_cache is not None:
                    from .step_cache import skipped_steps

                    skipped = skipped_steps(step_cache.mode, log_lines)
            finally:
                self._inherit = None
                if native_plan is not None:
                    self._select_kernels()   # the plan goes, and with it what is left of its caches
        return GenerationResult(images, p, time.perf_counter() - t0, step_times, self.backend, alter_steps,
                                inherited, skipped, inputs, upscaled)

    def _upscale(self, image: Image.Image) -> Image.Image:
        for _ in range(self.upscale_repeats):
            image = self._upscaler.upscale(image)
        return image

    def _native_plan(self, plan):
        """A checked inheritance plan (checked_plan) as the library's, or None."""
        if plan is None:
            return None
        from .inheritance import NativePlan

        return NativePlan(plan, self.model_file.unet_layout)

    def _inheritance_report(self, native_plan, height: int, width: int) -> list:
        """Per evaluation, what it inherited and computed and its MACs (with ALTER, its expert's skips too)."""
        from .inheritance import log_evaluations, read_records

        ffi, lib = self.native.ffi, self.native.lib
        records = read_records(ffi, lib)
        skipped = None
        if self.alter is not None:
            n = int(lib.pysdcpp_alter_history(ffi.NULL, ffi.NULL, 0))
            ts, es = ffi.new("float[]", max(n, 1)), ffi.new("int32_t[]", max(n, 1))
            n = min(n, int(lib.pysdcpp_alter_history(ts, es, n)))
            forwards = sum(1 for r in records if r[3] < 0)
            if n == forwards:
                skipped = [self._pruned_units(es[i]) for i in range(n)]
        evaluations = native_plan.report(records, height, width, skipped)
        log_evaluations(evaluations)
        return evaluations

    def _pruned_units(self, expert: int) -> set[str]:
        """The units an ALTER expert of this context's routing skips (none for -1 or no routing)."""
        if self.alter is None or expert < 0:
            return set()
        routing = self.alter.routing
        return {u for u, k in zip(routing.units, routing.masks[expert]) if not k}

    def inheriting(self, inheritance, steps: int) -> "InheritanceSession":
        """A run of component UNet evaluations under an inheritance policy for `steps` steps: call its `unet(...,
        step=i, slot=k)`; its caches live until the session closes (use `with`)."""
        if inheritance is None:
            raise ValueError("inheriting() needs a policy")
        plan = self._native_plan(checked_plan(self.model_file, self.backend, inheritance, steps))
        self._components()
        return InheritanceSession(self, plan)

    def _alter_report(self, step_marks: list[tuple[int, int]], p: GenerationParams) -> list:
        from .alter_runtime import log_steps

        ffi, lib = self.native.ffi, self.native.lib
        n = int(lib.pysdcpp_alter_history(ffi.NULL, ffi.NULL, 0))
        ts, es = ffi.new("float[]", max(n, 1)), ffi.new("int32_t[]", max(n, 1))
        n = min(n, int(lib.pysdcpp_alter_history(ts, es, n)))
        steps = self.alter.steps([(ts[i], es[i]) for i in range(n)], step_marks, p.height, p.width)
        log_steps(steps)
        return steps

    # -- components (accelerated library) --------------------------------------------------------
    def _components(self):
        if not self.native.has_components:
            raise PySDCppError(f"component calls need the accelerated library; this context uses {self.backend}")
        return self._require_open()

    def _call_tensor(self, fn_name: str, *args) -> np.ndarray:
        ffi, lib = self.native.ffi, self.native.lib
        out = ffi.new("pysdcpp_tensor_t*")
        with self.native.lock:
            self._select_kernels()
            if self.alter is not None:
                lib.pysdcpp_alter_history_clear()  # only generate() reads it back; keep it from growing
            self.native.take_errors()
            rc = getattr(lib, fn_name)(*args, out)
            if rc != 0:
                msg = ffi.string(lib.pysdcpp_last_error()).decode("utf-8", "replace")
                logged = self.native.take_errors()
                raise GenerationError(f"{fn_name[8:]} failed: {msg}" + (f" ({logged})" if logged else ""))
        try:
            return _tensor_array(ffi, out)
        finally:
            lib.pysdcpp_tensor_free(out)

    def tokenize(self, text: str) -> np.ndarray:
        """The token ids the text encoder sees (BOS, tokens, EOS, padding to whole 77-token chunks)."""
        ctx = self._components()
        ffi, lib = self.native.ffi, self.native.lib
        cap = 77 * 64
        ids = ffi.new("int32_t[]", cap)
        count = ffi.new("int*")
        with self.native.lock:
            if lib.pysdcpp_tokenize(ctx, text.encode("utf-8"), ids, cap, count) != 0:
                raise GenerationError(ffi.string(lib.pysdcpp_last_error()).decode())
        return np.frombuffer(ffi.buffer(ids, 4 * count[0]), dtype=np.int32).copy()

    def encode_prompt(self, text: str, clip_skip: int = -1, *, width: int | None = None, height: int | None = None,
                      return_y: bool = False):
        """Text-encoder hidden states, shape (1, tokens, hidden): the UNet's cross-attention context. With
        `return_y`: (context, y), y the UNet's extra input of shape (1, y_width) or None for models without one
        (SDXL: the pooled text embedding and the size conditioning for a width x height image, original = target
        size, crop 0, as stable-diffusion.cpp's generation builds it; `size_conditioning` builds other ones)."""
        if not isinstance(text, str):
            raise TypeError("text must be a string")
        w, h = self._default_size(width, height)
        ctx = self._components()
        ffi, lib = self.native.ffi, self.native.lib
        y_out = ffi.new("pysdcpp_tensor_t*")
        try:
            out = self._call_tensor("pysdcpp_encode_prompt", ctx, text.encode("utf-8"), int(clip_skip), int(w),
                                    int(h), y_out)
            y = None if y_out.data == ffi.NULL else _tensor_array(ffi, y_out).reshape(1, -1)
        finally:
            lib.pysdcpp_tensor_free(y_out)
        context = out.reshape(1, *out.shape[-2:])
        return (context, y) if return_y else context

    def _context_width(self) -> int:
        family = self.model_file.family
        return context_width(family) if family in FAMILIES else 0

    @property
    def y_width(self) -> int:
        """Width of the UNet's extra input y (SDXL: 2816), 0 where it takes none."""
        family = self.model_file.family
        return y_width(family) if family in FAMILIES else 0

    @property
    def in_channels(self) -> int:
        """Channels of the UNet's input: 4, and 9 (inpaint) or 8 (pix2pix) for the variants with an extra input."""
        arch = self.model_file.architecture
        return int(arch.config["in_channels"]) if arch is not None else 4

    def _default_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        side = default_image_size(self.model_file.family)
        return (side if width is None else width), (side if height is None else height)

    def unet(self, latent: np.ndarray, timestep, context: np.ndarray, y: np.ndarray | None = None, *,
             control_image=None, controlnet_conditioning_scale: float = 1.0) -> np.ndarray:
        """One diffusion-model evaluation: latent (N, C, h, w) (C = `in_channels`), timestep scalar or (N,), context
        (N, T, D), and for SDXL y (N, 2816) (`encode_prompt(..., return_y=True)`). The UNet's working memory and
        cached Winograd filters stay between calls (a loop of calls pays the filter transforms once) until a
        generation's sampling ends or the context closes. With a ControlNet (a context made with control_net=):
        `control_image`, the hint at 8 h x 8 w (PIL, a path, uint8 H x W x 3 or float 0..1, or a float array
        (N, 3, 8h, 8w) in 0..1), and `controlnet_conditioning_scale`, its residuals' weight."""
        ctx = self._components()
        x = np.ascontiguousarray(latent, dtype=np.float32)
        cin = self.in_channels
        if x.ndim != 4 or x.shape[1] != cin:
            raise ValueError(f"latent must have shape (N, {cin}, h, w), got {x.shape}")
        multiple = self._latent_multiple()
        if x.shape[2] % multiple or x.shape[3] % multiple or x.shape[2] < multiple or x.shape[3] < multiple:
            raise ValueError(f"latent height and width must be multiples of {multiple}, got {x.shape[2:]}")
        n = x.shape[0]
        t = np.broadcast_to(np.asarray(timestep, dtype=np.float32), (n,)).copy()
        if not np.all(np.isfinite(t)):
            raise ValueError("timesteps must be finite")
        c = np.ascontiguousarray(context, dtype=np.float32)
        if c.ndim == 2:
            c = c[None]
        width = self._context_width()
        if c.ndim != 3 or (width and c.shape[2] != width) or c.shape[0] not in (1, n):
            raise ValueError(f"context must have shape ({n}, tokens, {width or 'hidden'}), got {c.shape}")
        if c.shape[0] != n:
            c = np.ascontiguousarray(np.broadcast_to(c, (n, *c.shape[1:])))
        yw = self.y_width
        if yw and y is None:
            raise ValueError(f"this {self.model_file.family} UNet needs y of shape ({n}, {yw}): the pooled text "
                             "embedding and size conditioning (encode_prompt(..., return_y=True))")
        if not yw and y is not None:
            raise ValueError(f"this {self.model_file.family} UNet takes no y")
        if y is not None:
            y = np.ascontiguousarray(y, dtype=np.float32)
            if y.ndim == 1:
                y = y[None]
            if y.ndim != 2 or y.shape[1] != yw or y.shape[0] not in (1, n) or not np.all(np.isfinite(y)):
                raise ValueError(f"y must be finite with shape ({n}, {yw}), got {y.shape}")
            if y.shape[0] != n:
                y = np.ascontiguousarray(np.broadcast_to(y, (n, yw)))
        hint = None
        if control_image is not None:
            hint = self._hint(control_image, n, 8 * x.shape[2], 8 * x.shape[3], controlnet_conditioning_scale)
        if self.alter is not None and n > 1:
            # Elements routed to different experts: one call per run of equal experts keeps every graph to one
            # UNet (the library would otherwise build one UNet per element into a single graph).
            experts = [self.alter.routing.expert_for_timestep(float(v)) for v in t]
            cuts = [0] + [i for i in range(1, n) if experts[i] != experts[i - 1]] + [n]
            if len(cuts) > 2:
                return np.concatenate([self.unet(x[a:b], t[a:b], c[a:b], None if y is None else y[a:b],
                                                 control_image=None if hint is None else hint[a:b],
                                                 controlnet_conditioning_scale=controlnet_conditioning_scale)
                                       for a, b in zip(cuts, cuts[1:])])
        ffi = self.native.ffi
        x_ne = ffi.new("int64_t[4]", list(reversed(x.shape)))
        c_ne = ffi.new("int64_t[3]", list(reversed(c.shape)))
        y_ptr, y_ne = (ffi.NULL, ffi.NULL) if y is None else (ffi.from_buffer("float[]", y),
                                                              ffi.new("int64_t[2]", [y.shape[1], y.shape[0]]))
        if hint is not None:
            h_ne = ffi.new("int64_t[4]", list(reversed(hint.shape)))
            return self._call_tensor("pysdcpp_unet_controlled", ctx, ffi.from_buffer("float[]", x), x_ne,
                                     ffi.from_buffer("float[]", t), ffi.from_buffer("float[]", c), c_ne, y_ptr, y_ne,
                                     ffi.from_buffer("float[]", hint), h_ne, float(controlnet_conditioning_scale))
        return self._call_tensor("pysdcpp_unet", ctx, ffi.from_buffer("float[]", x), x_ne,
                                 ffi.from_buffer("float[]", t), ffi.from_buffer("float[]", c), c_ne, y_ptr, y_ne)

    def _hint(self, control_image, n: int, height: int, width: int, scale) -> np.ndarray:
        """A component call's ControlNet hint as (n, 3, height, width) float32 in 0..1, checked."""
        if self.control_net is None:
            raise ValueError("control_image needs a ControlNet: StableDiffusion(..., control_net=...)")
        check_control_scale(scale)
        if isinstance(control_image, np.ndarray) and control_image.ndim == 4:
            h = np.ascontiguousarray(control_image, dtype=np.float32)
            if h.shape[1:] != (3, height, width) or h.shape[0] not in (1, n):
                raise ValueError(f"a hint array must have shape ({n}, 3, {height}, {width}), got {h.shape}")
            if not np.all(np.isfinite(h)) or h.min() < 0 or h.max() > 1:
                raise ValueError("a hint array must hold values in 0..1")
        else:
            from .images import read_image

            img = read_image(control_image, "control_image")
            if img.size != (width, height):
                raise ValueError(f"the hint must be {width}x{height} (8 times the latent), got {img.width}x"
                                 f"{img.height}")
            h = (np.asarray(img, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]
        return np.ascontiguousarray(np.broadcast_to(h, (n, *h.shape[1:])))

    def _latent_multiple(self) -> int:
        """The latent's sides must be multiples of this: the UNet halves it once per level after the first."""
        return image_size_rules(self.model_file)[1] // 8

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """VAE decode of a diffusion latent (N, 4, h, w) -> the decoder's raw output (N, 3, 8h, 8w), about -1..1."""
        ctx = self._components()
        z = np.ascontiguousarray(latent, dtype=np.float32)
        if z.ndim != 4 or z.shape[1] != 4 or min(z.shape[2:]) < 1:
            raise ValueError(f"latent must have shape (N, 4, h, w), got {z.shape}")
        ffi = self.native.ffi
        z_ne = ffi.new("int64_t[4]", list(reversed(z.shape)))
        return self._call_tensor("pysdcpp_decode", ctx, ffi.from_buffer("float[]", z), z_ne)


class InheritanceSession:
    """Component UNet evaluations with feature inheritance (StableDiffusion.inheriting): each `unet` call names its
    step and slot (0 cond, 1 uncond, ...); `evaluations` reports what each computed and inherited."""

    def __init__(self, sd: "StableDiffusion", native_plan):
        self.sd, self.native_plan = sd, native_plan
        self.evaluations: list = []
        self._open = True
        with sd.native.lock:
            sd._inherit = native_plan
            sd._select_kernels()
            sd.native.lib.pysdcpp_inherit_history_clear()

    def unet(self, latent: np.ndarray, timestep, context: np.ndarray, y: np.ndarray | None = None, *, step: int,
             slot: int = 0) -> np.ndarray:
        if not self._open:
            raise PySDCppError("this inheritance session is closed")
        if not isinstance(step, (int, np.integer)) or not 0 <= step < self.native_plan.plan.steps:
            raise ValueError(f"step must be an integer from 0 to {self.native_plan.plan.steps - 1}, got {step!r}")
        if not isinstance(slot, (int, np.integer)) or slot < 0:
            raise ValueError(f"slot must be a non-negative integer, got {slot!r}")
        sd = self.sd
        experts = {-1}
        if sd.alter is not None:
            experts = {sd.alter.routing.expert_for_timestep(float(v)) for v in
                       np.broadcast_to(np.asarray(timestep, dtype=np.float32), (np.shape(latent)[0],))}
            if len(experts) > 1:
                raise ValueError("with inheritance, a batch's elements must go to one ALTER expert (call per "
                                 "element, each with a slot of its own)")
        from .inheritance import read_records

        with sd.native.lock:
            sd._inherit = self.native_plan
            sd.native.lib.pysdcpp_inherit_set_evaluation(int(step), int(slot))
            sd.native.lib.pysdcpp_inherit_history_clear()
            out = sd.unet(latent, timestep, context, y)
            records = read_records(sd.native.ffi, sd.native.lib)
            sd.native.lib.pysdcpp_inherit_set_evaluation(-1, 0)
        h, w = 8 * np.shape(latent)[2], 8 * np.shape(latent)[3]
        pruned = sd._pruned_units(experts.pop())
        forwards = sum(1 for r in records if r[3] < 0)
        self.evaluations += self.native_plan.report(records, h, w, [pruned] * forwards)
        return out

    def cache_bytes(self) -> int:
        return int(self.sd.native.lib.pysdcpp_inherit_cache_bytes())

    def close(self) -> None:
        if self._open:
            self._open = False
            with self.sd.native.lock:
                self.sd._inherit = None
                if getattr(self.sd.native, "inherit_owner", None) is self.native_plan:
                    self.sd.native.lib.pysdcpp_inherit_clear()
                    self.sd.native.inherit_owner = None

    def __enter__(self) -> "InheritanceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensor_array(ffi, t) -> np.ndarray:
    """A copy of a library tensor (pysdcpp_tensor_t, ggml dimension order) as a numpy array (numpy order)."""
    n = int(np.prod([t.ne[i] for i in range(t.n_dims)]))
    arr = np.frombuffer(ffi.buffer(t.data, n * 4), dtype=np.float32).copy()
    return arr.reshape([t.ne[i] for i in reversed(range(t.n_dims))])


def take_image(ffi, img) -> Image.Image | None:
    """Copy one library image (sd_image_t) into a PIL image and free its data; None for an empty one."""
    if img.data == ffi.NULL:
        return None
    try:
        return _native.copy_image(ffi, img)
    finally:
        _native.libc().free(img.data)
        img.data = ffi.NULL


def _take_images(ffi, out, count: int) -> list[Image.Image]:
    """Copy the library's images into PIL images and free the C buffers (each image's data, then the array)."""
    images = []
    try:
        for i in range(count):
            img = take_image(ffi, out[i])
            if img is not None:
                images.append(img)
    finally:
        for i in range(count):
            if out[i].data != ffi.NULL:
                _native.libc().free(out[i].data)
        _native.libc().free(out)
    return images


def png_bytes(image: Image.Image, parameters: str, extra: dict[str, str] | None = None) -> bytes:
    """A PNG with its `parameters` text chunk (and any `extra` text chunks)."""
    import io

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str) -> None:
    """Write a PNG with its `parameters` chunk atomically: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(png_bytes(image, parameters))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def image_size_rules(model_file: ModelFile) -> tuple[int, int]:
    """(default side, what width and height must be multiples of) for a model: the family's published size, and 8
    per latent pixel times 2 per UNet downsampler."""
    arch = model_file.architecture
    levels = len(arch.config["block_out_channels"]) if arch is not None else 4
    return default_image_size(model_file.family if model_file.family in FAMILIES else None), 8 << (levels - 1)


@dataclass
class CheckedGeneration:
    """A generation's inputs, checked: its parameters, the parsed step cache, the sized input images and the
    inheritance plan (None where not asked for)."""

    params: GenerationParams
    step_cache: object = None
    images: GenerationImages = field(default_factory=GenerationImages)
    plan: object = None
    library_prompt: str = ""   # the prompt without its <lora:...> tags, as the library gets it
    loras: tuple = ()   # every LoRA the generation applies (the tags' and loras='s), sorted (path, weight) pairs
    tiling: object = None   # the parsed vae_tiling (pysdcpp.vae_tiling.VaeTiling)
    hires: object = None    # the parsed hires_fix (pysdcpp.hires.HiresFix)


def random_seed() -> int:
    """A seed for a generation asked for with a negative one (sd-cli's range: 0 .. 2**31 - 1)."""
    import secrets

    return secrets.randbelow(2**31)


def checked_generation(model_file: ModelFile, backend: str, prompt: str, negative_prompt: str = "", *,
                       inheritance=None, image=None, strength: float = 0.8, mask_image=None, control_image=None,
                       controlnet_conditioning_scale: float = 1.0, ref_images=None,
                       num_images_per_prompt: int | None = None, vae_tiling=None,
                       vae_tile_overlap: float | None = None, loras=None, lora_dir=None, photo_maker=None,
                       input_id_images=None, style_strength: float | None = None,
                       **kwargs) -> CheckedGeneration:
    """A generation's parameters with the model's defaults filled in (size, and a few-step model's steps, guidance
    and sampler), every one checked before anything loads: sizes, sampler, the input images, the step cache, and
    an inheritance policy (a pysdcpp.inheritance policy) against the UNet, PhotoMaker's inputs against the
    context's `photo_maker` file (pysdcpp.photomaker). A seed of None or below 0 becomes a random one; the step
    cache is in its canonical spec."""
    side, multiple = image_size_rules(model_file)
    images, kwargs["width"], kwargs["height"] = checked_images(image, mask_image, strength, kwargs.get("width"),
                                                               kwargs.get("height"), multiple, control_image,
                                                               controlnet_conditioning_scale, ref_images)
    kind = f"{model_file.family or 'unknown'} {model_file.variant or 'base'}"
    if images.ref_images and model_file.variant != "pix2pix":
        raise ValueError("ref_images edit with an Instruct-Pix2Pix model (8 input channels); this is a "
                         f"{kind} model (for img2img give image=)")
    if kwargs.get("image_guidance_scale") is not None and model_file.variant not in ("pix2pix", "inpaint"):
        raise ValueError("image_guidance_scale guides by the image of an Instruct-Pix2Pix or inpainting model "
                         f"(8 or 9 input channels); this is a {kind} model")
    for key in ("width", "height"):
        if kwargs.get(key) is None:
            kwargs[key] = side
    if kwargs.get("sigmas") is not None:
        if not isinstance(kwargs["sigmas"], (tuple, list, np.ndarray)):
            raise TypeError(f"sigmas must be a sequence of numbers, not {type(kwargs['sigmas']).__name__}")
        kwargs["sigmas"] = tuple(float(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                                 else v for v in kwargs["sigmas"])
        if len(kwargs["sigmas"]) < 2:
            raise ValueError(f"sigmas must be at least two numbers (one step), got {list(kwargs['sigmas'])}")
        if kwargs.get("num_inference_steps") is None:
            kwargs["num_inference_steps"] = len(kwargs["sigmas"]) - 1
    for key, value in generation_defaults(model_file.few_step).items():
        if kwargs.get(key) is None:
            kwargs[key] = value
    if num_images_per_prompt is not None:
        if kwargs.get("batch_size", 1) not in (1, num_images_per_prompt):
            raise ValueError("num_images_per_prompt and batch_size are the same setting; give one")
        kwargs["batch_size"] = num_images_per_prompt
    from .vae_tiling import parse_vae_tiling

    tiling = parse_vae_tiling(vae_tiling, vae_tile_overlap)
    kwargs["vae_tiling"] = tiling.spec() if tiling is not None else None
    seed = kwargs.get("seed", 42)
    if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed < 0):
        kwargs["seed"] = random_seed()
    p = GenerationParams(prompt, negative_prompt, **kwargs)
    p.validate(*generation_choices(backend), multiple)
    from .lora import checked_loras

    if loras is not None and p.loras is not None:
        raise ValueError("loras is given twice")
    library_prompt, applied, explicit = checked_loras(loras if loras is not None else p.loras, prompt, lora_dir)
    p.loras = explicit or None   # the prompt keeps its tags: replaying the parameters applies the same LoRAs
    if photo_maker is not None or input_id_images is not None or style_strength is not None:
        from .photomaker import checked_inputs

        ids, strength = checked_inputs(photo_maker, library_prompt, input_id_images, style_strength, backend)
        images = replace(images, id_images=ids, style_strength=strength)
    step_cache = None
    if p.step_cache is not None:
        from .step_cache import parse_step_cache

        step_cache = parse_step_cache(p.step_cache)
        p.step_cache = step_cache.spec()
        if inheritance is not None:
            raise ValueError("a step cache and feature inheritance each decide what a step reuses; use one")
        if model_file.unet_layout is None:
            raise ValueError(f"upstream's {step_cache.mode} runs on UNets only (SD1.x, SD2.x, SDXL)")
    hires = None
    if p.hires_fix is not None:
        from .hires import parse_hires

        hires = fix = parse_hires(p.hires_fix)
        p.hires_fix = fix.spec()
        if inheritance is not None:
            raise ValueError("hires_fix runs a second sampling pass, which an inheritance plan does not cover")
        if max(fix.target(p.width, p.height)) > 4096:
            raise ValueError(f"hires_fix would make a {fix.target(p.width, p.height)} image; at most 4096 a side")
    plan = None
    if inheritance is not None:
        plan = checked_plan(model_file, backend, inheritance, p.num_inference_steps)
    return CheckedGeneration(p, step_cache, images, plan, library_prompt, applied, tiling, hires)


def checked_plan(model_file: ModelFile, backend: str, inheritance, steps: int):
    """An inheritance policy's plan for `steps` steps of this model (pysdcpp.inheritance.plan_for), or ValueError."""
    from .inheritance import plan_for

    if backend != "accelerated":
        raise ValueError(f"inheritance needs the accelerated library, not {backend}")
    if model_file.unet_layout is None:
        raise ValueError("inheritance needs a UNet of the SD family (SD1.x, SD2.x, SDXL and their variants)")
    return plan_for(inheritance, steps, model_file.unet_layout)


def generation_choices(backend: str = "accelerated") -> tuple[list[str], list[str]]:
    """(sampler names, scheduler names) of a library, for checking parameters before any model is loaded."""
    if backend not in _native.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_native.BACKENDS)}, not {backend!r}")
    native = _native.load(backend)
    lib = native.lib
    return (native.enum_names("sd_sample_method_name", int(lib.SAMPLE_METHOD_COUNT)),
            native.enum_names("sd_scheduler_name", int(lib.SCHEDULER_COUNT)))


__all__ = ["StableDiffusion", "GenerationParams", "GenerationResult", "CheckedGeneration", "checked_generation",
           "generation_choices", "random_seed",
           "image_size_rules",
           "png_bytes", "png_parameters", "save_png"]
