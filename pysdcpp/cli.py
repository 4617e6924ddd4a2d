"""The `pysdcpp` command: thin click commands over the library API."""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path

import click

from . import __version__
from .format.sampling import FEW_STEP_KINDS
from .format.names import OUTPUT_TYPES, PREDICTIONS, SKIP_SEMANTICS, TAE_PREFIX, UNET_PREFIX, VAE_PREFIX

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _default(value, default):
    return default if value is None else value


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="pysdcpp")
def main() -> None:
    """Stable Diffusion on the CPU through stable-diffusion.cpp.

    \b
    Examples:
      pysdcpp generate --demo
      pysdcpp convert ./my-diffusers-model -o model.gguf --type f16
      pysdcpp generate model.gguf -p "a lighthouse at dusk" --steps 20 -o out.png
      pysdcpp inspect model.gguf --json
    """


class _StepBar:
    """A progress bar fed by the library's per-step callback (model loading reports through it too)."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.bar, self.last = label, enabled, None, 0

    def __call__(self, step: int, steps: int, seconds: float) -> None:
        if not self.enabled or steps <= 0:
            return
        if self.bar is None or self.bar.length != steps or step < self.last:
            self.close()
            self.bar = click.progressbar(length=steps, label=self.label, file=sys.stderr, show_pos=True)
            self.bar.__enter__()
            self.last = 0
        self.bar.update(step - self.last)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@main.command(context_settings=CONTEXT)
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--demo", is_flag=True, help="Use the embedded synthetic SD1.5 model (random weights: draws noise).")
@click.option("-p", "--prompt", default=None, help="What to draw.")
@click.option("--prompts-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="One prompt per line (blank lines and #-comments skipped), each with seed SEED + its number "
                   "(from 0); images OUTPUT_1.png, OUTPUT_2.png... (pysdcpp batch for thousands, resumable).")
@click.option("-n", "--negative-prompt", default="", help="What not to draw.")
@click.option("-W", "--width", type=int, default=None,
              help="Image width, a multiple of 64 (SDXL, tiny UNets: 32) [the family's: 512, SD2 768, SDXL 1024; "
                   "demo 256].")
@click.option("-H", "--height", type=int, default=None, help="Image height, as --width.")
@click.option("--steps", type=int, default=None,
              help="Sampling steps [20; few-step models: turbo 1, lcm 4; demo 4].")
@click.option("--cfg", "guidance_scale", type=float, default=None,
              help="Guidance scale; 1 turns guidance off [7; few-step models: 1].")
@click.option("--sampler", default=None, help="Sampling method (see `pysdcpp info`) [euler_a; lcm models: lcm].")
@click.option("--scheduler", default="default", show_default=True, help="Noise schedule (see `pysdcpp info`).")
@click.option("--seed", type=int, default=42, show_default=True, help="-1 (any negative): a random seed, printed "
                                                                      "and written to the PNG.")
@click.option("--batch", "batch_size", type=int, default=1, show_default=True, help="Images per run.")
@click.option("-i", "--image", "init_image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="img2img: start from this image (its size unless -W/-H; other sizes are resized).")
@click.option("--strength", type=float, default=0.8, show_default=True,
              help="img2img: how much of the image to repaint, 0 < s <= 1 (the share of the steps that run).")
@click.option("--mask", "mask_image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Inpainting (with --image): white repaints, black keeps.")
@click.option("--control-net", "control_net", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ControlNet file (the original cldm names, as sd-cli reads them).")
@click.option("--control-image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The ControlNet's hint image (edges, depth, pose...), resized to the output.")
@click.option("--control-strength", type=float, default=1.0, show_default=True,
              help="Weight of the ControlNet's residuals (diffusers' controlnet_conditioning_scale).")
@click.option("-r", "--ref-image", "ref_images", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Instruct-Pix2Pix models: the image to edit (the prompt says how).")
@click.option("--img-cfg-scale", "image_guidance_scale", type=float, default=None,
              help="Instruct-Pix2Pix and inpainting models: image guidance, how closely to keep the image "
                   "[the --cfg value].")
@click.option("--photo-maker", "photo_maker", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PhotoMaker (v1) file, SDXL models: the prompt names the class word and then the trigger word "
                   "(\"a woman img, ...\"), --pm-id-images-dir the person.")
@click.option("--pm-id-images-dir", "pm_id_images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="PhotoMaker: a folder of ID images (jpg/png/bmp/webp, in file-name order).")
@click.option("--pm-style-strength", "pm_style_strength", type=float, default=None,
              help="PhotoMaker: the percentage of the steps before the ID joins, 0-100 [20].")
@click.option("--unet", "--diffusion-model", "unet", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A UNet file whose tensors go over the model's (an ALTER, distilled or inpainting UNet).")
@click.option("--preview", "preview_mode", type=click.Choice(["proj", "vae", "tae"]), default=None,
              help="Write a preview of each step to --preview-path: proj (cheap, 1/8 size), vae or tae (a decode "
                   "per step; tae needs --taesd).")
@click.option("--preview-path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where --preview writes [OUTPUT with .preview.png].")
@click.option("--preview-interval", type=click.IntRange(min=1), default=1, show_default=True,
              help="Preview every N-th step (and the last).")
@click.option("--taesd-preview-only", is_flag=True, help="With --taesd: previews only; images decode with the VAE.")
@click.option("--upscale-model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="An ESRGAN model (RRDBNet) the images are upscaled with.")
@click.option("--upscale-repeats", type=click.IntRange(1, 4), default=1, show_default=True,
              help="Upscale this many times.")
@click.option("--taesd", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Decode (and encode) with this tiny autoencoder (TAESD) instead of the model's VAE: faster, "
                   "rougher.")
@click.option("--vae-tiling", is_flag=True, help="Run the VAE in overlapping tiles (bounds its memory).")
@click.option("--vae-tile-size", default=None, metavar="TXxTY",
              help="VAE tile size in latent pixels (8 image pixels each) [32x32]; implies --vae-tiling.")
@click.option("--vae-tile-overlap", type=float, default=None, help="Tile overlap, a fraction of the tile [0.5].")
@click.option("--lora", "lora_args", multiple=True, metavar="PATH[:WEIGHT]",
              help="Apply a LoRA file (kohya or diffusers/PEFT names) at WEIGHT [1]; repeatable. The prompt's "
                   "<lora:NAME:WEIGHT> tags work too (NAME in --lora-dir).")
@click.option("--lora-dir", "--lora-model-dir", "lora_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Folder of the prompt's <lora:NAME:WEIGHT> tags [the current folder].")
@click.option("--lora-apply-mode", type=click.Choice(["auto", "immediately", "at_runtime"]), default="auto",
              show_default=True, help="Add LoRAs into the weights before sampling, or beside the layers at every "
                                      "step (auto: immediately unless the model is quantized).")
@click.option("--clip-skip", type=int, default=-1, show_default=True, help="-1: the model's default.")
@click.option("--eta", type=float, default=None,
              help="Samplers' noise multiplier [the sampler's: 1 ancestral, 0 ddim].")
@click.option("--sigmas", default=None, metavar="S0,S1,...,0",
              help="A custom noise schedule, decreasing to 0; sets --steps to its length - 1.")
@click.option("--hires-fix", "hires_fix", default=None, metavar="SPEC",
              help="Generate, upscale, denoise again: UPSCALER[:scale=2,steps=0,strength=0.7,width=,height=,tile=128]; "
                   "UPSCALER latent, latent-nearest, latent-bicubic, lanczos, nearest... or an ESRGAN file.")
@click.option("--embd-dir", "embd_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Textual-inversion embeddings: a prompt word equal to a file's name (stem) reads its vectors.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads [physical cores].")
@click.option("--backend", type=click.Choice(["accelerated", "upstream"]), default="accelerated", show_default=True)
@click.option("--prediction", type=click.Choice(["auto", *PREDICTIONS]), default="auto", show_default=True,
              help="Force epsilon or v prediction (auto: from the file's metadata or the model).")
@click.option("--conv", type=click.Choice(["default", "im2col", "direct", "winograd"]), default="default",
              show_default=True, help="3x3 convolution algorithm (winograd: accelerated library only).")
@click.option("--attention", type=click.Choice(["default", "upstream", "fast"]), default="default",
              show_default=True, help="Attention path: fast (fused, tiled; the accelerated library's default) or "
                                      "upstream.")
@click.option("--linear", type=click.Choice(["default", "upstream", "fast"]), default="default",
              show_default=True, help="Linear layers: fast (our GEMM, F32 activations; the accelerated library's "
                                      "default) or upstream (ggml's, activations rounded to F16).")
@click.option("--winograd-cache-mb", type=click.IntRange(min=0), default=None,
              help="Memory for Winograd's transformed filters while the UNet samples (default 1536); "
                   "layers beyond it transform their filters every evaluation (never changes the image).")
@click.option("--separate-guidance", is_flag=True,
              help="Evaluate a guided step's cond and uncond one after the other, as upstream (the accelerated "
                   "library's default: one batch-2 evaluation; separate ones need a smaller compute buffer).")
@click.option("--no-alter", is_flag=True, help="Run an ALTER file's dense model (routing off).")
@click.option("--alter-masks", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Route with the masks of this JSON file (docs/alter-gguf.md) instead of the file's own.")
@click.option("--alter-semantics", type=click.Choice(["default", *SKIP_SEMANTICS]), default="default",
              show_default=True, help="How a pruned ResNet of a plain up block treats its skip tensor "
                                      "(default: the file's, normally reference).")
@click.option("--inherit", "inherit", default=None, metavar="POLICY",
              help="Feature inheritance across steps (accelerated library; docs/inheritance.md): deepcache"
                   "[:interval=3,branch=0,schedule=uniform|non-uniform,pow=1.4,center=15] or "
                   "units[:interval=3,first=1,last=1,units=NAME+NAME...].")
@click.option("--step-cache", default=None, metavar="CACHE",
              help="Upstream's step-level cache (either library): ucache[:threshold=1,start=0.15,end=0.95,decay=1,"
                   "relative=1,reset=1] or spectrum[:w=0.4,m=3,lam=1,window=2,flex=0.5,warmup=4,stop=0.9], "
                   "as sd-cli's --cache-mode/--cache-option; not with --inherit.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("output.png"),
              show_default=True, help="PNG path; with --batch N, files get _1.._N suffixes.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files (without it they are never touched).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-v", "--verbose", count=True, help="-v: library info log, -vv: debug log.")
def generate(model, demo, prompt, prompts_file, negative_prompt, width, height, steps, guidance_scale, sampler,
             scheduler, seed, batch_size, init_image, strength, mask_image, control_net, control_image,
             control_strength, ref_images, image_guidance_scale, photo_maker, pm_id_images, pm_style_strength,
             unet, preview_mode, preview_path, preview_interval,
             taesd_preview_only, upscale_model, upscale_repeats, taesd, vae_tiling, vae_tile_size, vae_tile_overlap,
             lora_args, lora_dir, lora_apply_mode, clip_skip, eta, sigmas, hires_fix, embd_dir, threads, backend,
             prediction, conv, attention, linear, winograd_cache_mb, separate_guidance, no_alter, alter_masks,
             alter_semantics, inherit,
             step_cache, output, overwrite, as_json, verbose):
    """Text to image, or image to image. Writes PNGs carrying their generation parameters (A1111 `parameters`
    chunk). Ctrl-C stops at the next step (the upstream library: when its run ends) and writes nothing (exit 130).

    \b
    Examples:
      pysdcpp generate --demo
      pysdcpp generate model.gguf -p "a lighthouse at dusk" -W 512 -H 512 --steps 20 --seed 7 -o lighthouse.png
      pysdcpp generate model.gguf -p "the same, in winter" -i lighthouse.png --strength 0.6 -o winter.png
      pysdcpp generate model.gguf -p "a red boat" -i lighthouse.png --mask boat-mask.png -o boat.png
      pysdcpp generate model.gguf -p "a red fox" --backend upstream --sampler euler --scheduler karras
      pysdcpp generate model.gguf -p "a red fox" --steps 20 --inherit deepcache:interval=3,branch=0
      pysdcpp generate pix2pix.gguf -p "make it snow" -r photo.png --img-cfg-scale 1.5 -o snow.png
      pysdcpp generate sdxl.gguf -p "a woman img, oil painting" --photo-maker photomaker-v1.safetensors \
          --pm-id-images-dir faces/ -W 1024 -H 1024 --cfg 5 -o portrait.png
      pysdcpp generate model.gguf --prompts-file prompts.txt --upscale-model RealESRGAN_x4plus.pth -o out.png
    """
    from .api import StableDiffusion, checked_generation, png_parameters, save_png
    from .errors import PySDCppError

    _setup_logging(verbose)
    show = sys.stderr.isatty() or verbose > 0
    if demo == (model is not None):
        _fail("give a MODEL file or --demo (not both)")
    if demo:
        from .demo import synthetic_gguf

        click.echo("demo: synthetic SD1.5 (real architecture, deterministic random weights). "
                   "Random weights draw noise, not pictures: this shows the pipeline runs and how fast.",
                   err=True)
        bar = _WriteBar("making the demo model (once, cached)")
        model = synthetic_gguf("sd1", "f16", progress=bar)
        bar.close()
        width, height, steps = _default(width, 256), _default(height, 256), _default(steps, 4)
        prompt = prompt if prompt is not None or prompts_file else "a lighthouse at dusk, oil painting"
    if (prompt is None) == (prompts_file is None):
        _fail("give --prompt or --prompts-file (one of the two)")
    prompts = [prompt] if prompts_file is None else _prompt_lines(prompts_file)
    try:
        from .modelfile import read_model_file, with_unet

        header = read_model_file(model)
        if unet is not None:
            header = with_unet(header, read_model_file(unet))
    except (PySDCppError, ValueError) as e:
        _fail(str(e))
    if output.suffix.lower() != ".png":
        _fail(f"output must be a .png path, got {output}")
    if not output.parent.exists():
        _fail(f"output folder {output.parent} does not exist")
    paths = _output_paths(output, len(prompts) if prompts_file is not None else 0, batch_size)
    written = [p for group in paths for p in group]   # what the run writes, every path checked before the load
    if preview_mode is not None:
        preview_path = preview_path or output.with_suffix(".preview.png")
        if preview_path.suffix.lower() != ".png" or not preview_path.parent.is_dir():
            _fail(f"--preview-path must be a .png path in an existing folder, got {preview_path}")
    existing = [p for p in written + ([preview_path] if preview_mode else []) if p.exists()]
    if existing and not overwrite:
        _fail(f"{existing[0]} exists; pass --overwrite to replace it")
    try:
        # Every generation parameter is checked before the model loads (the library's sampler names need no model).
        policy = None
        if inherit is not None:
            from .inheritance import parse_inheritance

            policy = parse_inheritance(inherit)
        loras = [_lora_arg(a) for a in lora_args]
        if sigmas is not None:
            try:
                sigmas = [float(v) for v in sigmas.split(",")]
            except ValueError:
                raise ValueError(f"--sigmas {sigmas!r}: comma-separated numbers") from None
        if embd_dir is not None and not embd_dir.is_dir():
            raise ValueError(f"--embd-dir {embd_dir}: no such folder")
        if lora_dir is not None and not lora_dir.is_dir():
            raise ValueError(f"--lora-dir {lora_dir}: no such folder")
        pm_file = None
        if photo_maker is not None:
            from .photomaker import read_photo_maker

            pm_file = read_photo_maker(photo_maker, header)
        elif pm_id_images is not None or pm_style_strength is not None:
            raise ValueError("--pm-id-images-dir and --pm-style-strength need --photo-maker")
        checked = checked_generation(header, backend, prompts[0], negative_prompt, width=width, height=height,
                                     num_inference_steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                                     scheduler=scheduler, seed=seed, batch_size=batch_size, clip_skip=clip_skip,
                                     step_cache=step_cache, inheritance=policy, image=init_image,
                                     mask_image=mask_image, strength=strength,
                                     vae_tiling=vae_tile_size or vae_tiling, vae_tile_overlap=vae_tile_overlap,
                                     loras=loras, lora_dir=lora_dir, control_image=control_image, eta=eta,
                                     sigmas=sigmas, hires_fix=hires_fix, ref_images=list(ref_images) or None,
                                     image_guidance_scale=image_guidance_scale,
                                     controlnet_conditioning_scale=control_strength, photo_maker=pm_file,
                                     input_id_images=pm_id_images, style_strength=pm_style_strength)
        from .lora import prompt_loras

        for other in prompts[1:]:   # each prompt's own LoRA tags (the rest of its parameters are the first's)
            library_prompt = prompt_loras(other, lora_dir)[0]
            if pm_file is not None:
                from .photomaker import check_trigger

                check_trigger(library_prompt)
        if taesd_preview_only and taesd is None:
            raise ValueError("--taesd-preview-only needs --taesd")
        if preview_mode == "tae" and taesd is None:
            raise ValueError("--preview tae needs --taesd (with --taesd-preview-only to keep the VAE for images)")
        if upscale_model is not None:
            from .upscaler import check_esrgan_file

            check_esrgan_file(upscale_model)
        if control_image is not None and control_net is None:
            raise ValueError("--control-image needs --control-net")
        if control_net is not None:
            from .modelfile import read_control_net

            read_control_net(control_net)
        if taesd is not None:
            from .modelfile import read_tiny_autoencoder

            read_tiny_autoencoder(taesd)
    except (PySDCppError, ValueError, TypeError) as e:
        _fail(str(e))
    p = checked.params
    if seed < 0:
        click.echo(f"seed: {p.seed}", err=True)
    try:
        t0 = time.perf_counter()
        loading = _StepBar("loading", show)
        try:
            sd = StableDiffusion(model, unet=unet, threads=threads, backend=backend, prediction=prediction, conv=conv,
                                 attention=attention, linear=linear, winograd_cache_mb=winograd_cache_mb,
                                 batch_guidance=False if separate_guidance else None,
                                 alter=False if no_alter else None, alter_semantics=alter_semantics,
                                 alter_masks=alter_masks, taesd=taesd, control_net=control_net, lora_dir=lora_dir,
                                 embeddings=embd_dir, taesd_preview_only=taesd_preview_only,
                                 upscaler=upscale_model, upscale_repeats=upscale_repeats,
                                 photo_maker=photo_maker, lora_apply_mode=lora_apply_mode,
                                 vae_decode_only=init_image is None and not ref_images, progress=loading)
        finally:
            loading.close()
        with sd:
            load_s = time.perf_counter() - t0
            seconds = 0.0
            for i, (text_prompt, group) in enumerate(zip(prompts, paths)):
                label = "sampling" if len(prompts) == 1 else f"prompt {i + 1}/{len(prompts)}"
                bar = _StepBar(label, show)
                try:
                    inputs = checked.images
                    result = sd.generate_with_info(text_prompt, p.negative_prompt, width=p.width, height=p.height,
                                                   num_inference_steps=p.num_inference_steps,
                                                   guidance_scale=p.guidance_scale, sampler=p.sampler,
                                                   scheduler=p.scheduler, seed=p.seed + i, batch_size=p.batch_size,
                                                   clip_skip=p.clip_skip, inheritance=policy, step_cache=step_cache,
                                                   image=inputs.image, mask_image=inputs.mask_image,
                                                   strength=inputs.strength, control_image=inputs.control_image,
                                                   controlnet_conditioning_scale=inputs.control_scale,
                                                   ref_images=list(inputs.ref_images) or None,
                                                   image_guidance_scale=p.image_guidance_scale,
                                                   input_id_images=list(inputs.id_images) or None,
                                                   style_strength=inputs.style_strength,
                                                   vae_tiling=p.vae_tiling, loras=p.loras, eta=p.eta,
                                                   sigmas=p.sigmas, hires_fix=p.hires_fix, callback=bar,
                                                   preview=_preview_writer(preview_path) if preview_mode else None,
                                                   preview_mode=preview_mode or "proj",
                                                   preview_interval=preview_interval)
                finally:
                    bar.close()
                seconds += result.seconds
                text = png_parameters(result.params, Path(model).stem, backend, __version__,
                                      policy.spec() if policy is not None else None, result.images_in,
                                      result.upscaled)
                for img, path in zip(result.images, group):
                    save_png(img, path, text)
    except (PySDCppError, ValueError, TypeError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        click.echo("cancelled: no image written", err=True)
        sys.exit(130)
    summary = {"images": [str(p) for p in written], "model": str(model), "backend": backend,
               "conv": sd.conv, "attention": sd.attention, "linear": sd.linear, "threads": sd.threads,
               "alter_steps": [s.as_dict() for s in result.alter_steps],
               "inherited": [e.as_dict() for e in result.inherited],
               "step_cache_skipped_steps": result.step_cache_skipped, "load_seconds": round(load_s, 3),
               "generate_seconds": round(seconds, 3), "parameters": text}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for p in written:
            click.echo(f"wrote {p}")
        click.echo(f"{backend}, {sd.threads} threads: load {load_s:.1f} s, generate {seconds:.1f} s",
                   err=True)
        if result.alter_steps:
            fraction = sum(st.macs for st in result.alter_steps) / sum(st.dense_macs for st in result.alter_steps)
            experts = " ".join(str(st.expert) for st in result.alter_steps)
            click.echo(f"ALTER experts per step: {experts}; {100 * fraction:.0f}% of the dense UNet's MACs "
                       "(-v logs each step)", err=True)
        if result.inherited:
            n = sum(1 for e in result.inherited if e.inherited)
            fraction = sum(e.macs for e in result.inherited) / sum(e.dense_macs for e in result.inherited)
            click.echo(f"inheritance {policy.spec()}: {n} of {len(result.inherited)} UNet evaluations inherited; "
                       f"{100 * fraction:.0f}% of the dense UNet's MACs (-v logs each evaluation)", err=True)
        if result.step_cache_skipped is not None:
            click.echo(f"step cache {result.params.step_cache}: skipped {result.step_cache_skipped} of "
                       f"{result.params.num_inference_steps} steps", err=True)


def _prompt_lines(path: Path) -> list[str]:
    """--prompts-file: its prompts, one per line (blank lines and lines starting with # left out)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"--prompts-file {path}: {e}")
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        _fail(f"--prompts-file {path} holds no prompt")
    if len(prompts) > 10000:
        _fail(f"--prompts-file {path}: {len(prompts)} prompts; pysdcpp batch runs large sets (resumable)")
    return prompts


def _output_paths(output: Path, prompts: int, batch_size: int) -> list[list[Path]]:
    """Per prompt, its images' paths: OUTPUT (OUTPUT_1.. for a batch); with a prompts file OUTPUT_<n> (and
    OUTPUT_<n>_1.. for a batch), n from 1."""
    def named(*parts) -> Path:
        return output.with_name("_".join([output.stem, *map(str, parts)]) + output.suffix)

    if prompts == 0:
        return [[output] if batch_size == 1 else [named(j + 1) for j in range(batch_size)]]
    return [[named(i + 1)] if batch_size == 1 else [named(i + 1, j + 1) for j in range(batch_size)]
            for i in range(prompts)]


def _preview_writer(path: Path):
    """A preview callback writing each preview over `path` (atomically: a viewer never reads half a file)."""
    from .api import save_png

    def write(step: int, image) -> None:
        save_png(image, path, f"preview, step {step}")
    return write


def _lora_arg(text: str) -> tuple[str, float]:
    """--lora PATH[:WEIGHT] (a path may hold colons: the weight is what follows the last one, if it is a number)."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def _demo_model(family: str = "sd1", out_type: str = "f16") -> Path:
    """The synthetic model's GGUF, made (with a progress bar) the first time."""
    from .demo import synthetic_gguf

    bar = _WriteBar(f"making the synthetic {family} model ({out_type}; once, cached)")
    try:
        return synthetic_gguf(family, out_type, progress=bar)
    finally:
        bar.close()


class _WriteBar:
    """Progress bar for converters' (done_bytes, total_bytes, name) callbacks."""

    def __init__(self, label: str):
        self.label, self.bar, self.last = label, None, 0

    def __call__(self, done: int, total: int, _name: str) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.last)
        self.last = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@main.command(context_settings=CONTEXT)
@click.option("-m", "--model", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The GGUF every worker loads (on a cluster: the same file at this path on every machine).")
@click.argument("prompts", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the PNGs (named by job id) and manifest.jsonl; rerunning into it resumes.")
@click.option("--workers", type=int, default=None,
              help="Worker processes (Ray: actors) [local: physical cores / threads per worker; Ray: the cluster's "
                   "CPUs / threads per worker].")
@click.option("--threads-per-worker", type=int, default=None,
              help="Threads per worker [physical cores / workers; one worker with every core when neither is given].")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run on Ray: --ray alone starts a local instance, --ray auto or --ray HOST:PORT joins a cluster "
                   "(pip install \"pysdcpp[ray]\").")
@click.option("-n", "--negative-prompt", default=None, help="For lines that give none.")
@click.option("-W", "--width", type=int, default=None, help="[the family's size]")
@click.option("-H", "--height", type=int, default=None, help="[the family's size]")
@click.option("--steps", type=int, default=None, help="[20; few-step models: their kind's]")
@click.option("--cfg", "guidance_scale", type=float, default=None, help="[7; few-step models: 1]")
@click.option("--sampler", default=None, help="[euler_a; lcm models: lcm]")
@click.option("--scheduler", default=None, help="[default]")
@click.option("--seed", type=int, default=42, show_default=True,
              help="A line without a seed gets this plus its 0-based line number.")
@click.option("--clip-skip", type=int, default=None)
@click.option("--inherit", default=None, metavar="POLICY", help="Feature inheritance, as `generate --inherit`.")
@click.option("--step-cache", default=None, metavar="CACHE", help="Upstream's step cache, as `generate --step-cache`.")
@click.option("--backend", type=click.Choice(["accelerated", "upstream"]), default="accelerated", show_default=True)
@click.option("--conv", type=click.Choice(["default", "im2col", "direct", "winograd"]), default="default",
              show_default=True)
@click.option("--attention", type=click.Choice(["default", "upstream", "fast"]), default="default", show_default=True)
@click.option("--linear", type=click.Choice(["default", "upstream", "fast"]), default="default", show_default=True)
@click.option("--prediction", type=click.Choice(["auto", *PREDICTIONS]), default="auto", show_default=True)
@click.option("--no-alter", is_flag=True, help="Run an ALTER file's dense model.")
@click.option("--alter-masks", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--alter-semantics", type=click.Choice(["default", *SKIP_SEMANTICS]), default="default",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-v", "--verbose", count=True, help="-v: worker notes and the library's info log.")
def batch(model, prompts, outdir, workers, threads_per_worker, ray_address, negative_prompt, width, height, steps,
          guidance_scale, sampler, scheduler, seed, clip_skip, inherit, step_cache, backend, conv, attention, linear,
          prediction, no_alter, alter_masks, alter_semantics, as_json, verbose):
    """Generate a prompt set: one image per line, resumable.

    PROMPTS is a text file (one prompt a line; blank and #-lines skipped) or a .jsonl file (one JSON object a
    line with any generate parameter: prompt, negative_prompt, seed, width, height, steps, cfg, sampler,
    scheduler, clip_skip, inheritance, step_cache). Options set what a line leaves out. Model options (backend,
    conv, ..., ALTER) are per run: a line asking for another value fails alone, as does any invalid line.

    \b
    Each job's id hashes the model file, the run's model options and the job's parameters. Only this process
    writes: OUTDIR/<id>.png (atomically, as workers hand it back) and a line of OUTDIR/manifest.jsonl per job.
    Rerunning the same command skips what is done; Ctrl-C or a kill loses only the images in flight. Exit status:
    0 all done, 1 some failed, 130 interrupted.

    \b
    Examples:
      pysdcpp batch -m sd15.gguf prompts.txt -o out/ --steps 20
      pysdcpp batch -m sd15.gguf jobs.jsonl -o out/ --workers 2 --threads-per-worker 1
      pysdcpp batch -m /shared/sd15.gguf prompts.txt -o out/ --ray auto
    """
    from .batch import BatchError, run_batch
    from .errors import PySDCppError

    _setup_logging(verbose)
    show = sys.stderr.isatty() or verbose > 0
    defaults = {"negative_prompt": negative_prompt, "width": width, "height": height, "num_inference_steps": steps,
                "guidance_scale": guidance_scale, "sampler": sampler, "scheduler": scheduler, "seed": seed,
                "clip_skip": clip_skip, "inheritance": inherit, "step_cache": step_cache}
    run = {"backend": backend, "conv": conv, "attention": attention, "linear": linear, "prediction": prediction,
           "alter": False if no_alter else None, "alter_masks": str(alter_masks) if alter_masks else None,
           "alter_semantics": alter_semantics}
    bar = {"bar": None, "last": 0, "start": None, "first": 0}

    def progress(done: int, failed: int, total: int) -> None:
        if not show:
            return
        if bar["bar"] is None:   # the first call: what earlier runs did (no rate from those)
            bar["bar"] = click.progressbar(length=total, label="batch", file=sys.stderr, show_pos=True, show_eta=True,
                                           item_show_func=lambda s: s)
            bar["bar"].__enter__()
            bar["start"], bar["first"] = time.perf_counter(), done + failed
        b = bar["bar"]
        elapsed = time.perf_counter() - bar["start"]
        new = done + failed - bar["first"]
        rate = f"{60 * new / elapsed:.1f} img/min" if new and elapsed > 0 else ""
        b.update(done + failed - bar["last"], ", ".join(x for x in (f"{failed} failed" if failed else "", rate) if x))
        bar["last"] = done + failed

    def log(text: str) -> None:
        if verbose:
            click.echo(text, err=True)

    try:
        summary = run_batch(str(model), str(prompts), str(outdir), defaults=defaults, run=run, workers=workers,
                            threads_per_worker=threads_per_worker, use_ray=ray_address is not None,
                            ray_address=ray_address or None, progress=progress, log=log)
    except (PySDCppError, BatchError, ValueError, TypeError, OSError, RuntimeError) as e:
        _fail(str(e))
    finally:
        if bar["bar"] is not None:
            bar["bar"].__exit__(None, None, None)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        click.echo(summary.text(), err=True)
    if summary.interrupted:
        sys.exit(130)
    if summary.failed:
        sys.exit(1)


@main.command(context_settings=CONTEXT)
@click.argument("image", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("-m", "--model", "model", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="ESRGAN (RRDBNet) file, e.g. Real-ESRGAN x4plus.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG path.")
@click.option("--repeats", type=click.IntRange(1, 4), default=1, show_default=True, help="Upscale this many times.")
@click.option("--tile-size", type=click.IntRange(0, 4096), default=128, show_default=True,
              help="Input pixels per tile (0: the whole image at once).")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads [physical cores].")
@click.option("--backend", type=click.Choice(["accelerated", "upstream"]), default="accelerated", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("-v", "--verbose", count=True, help="-v: library info log, -vv: debug log.")
def upscale(image, model, output, repeats, tile_size, threads, backend, overwrite, verbose):
    """Upscale an image with an ESRGAN model (sd-cli's -M upscale --upscale-model).

    \b
    Example:
      pysdcpp upscale lighthouse.png -m RealESRGAN_x4plus.safetensors -o lighthouse-4x.png
    """
    from .api import save_png
    from .errors import PySDCppError
    from .upscaler import Upscaler

    _setup_logging(verbose)
    if output.suffix.lower() != ".png":
        _fail(f"output must be a .png path, got {output}")
    if output.exists() and not overwrite:
        _fail(f"{output} exists; pass --overwrite to replace it")
    try:
        from .images import read_image

        img = read_image(image, "image")
        with Upscaler(model, threads=threads, backend=backend, tile_size=tile_size) as up:
            for _ in range(repeats):
                img = up.upscale(img)
        save_png(img, output, f"upscaled {Path(image).name} with {Path(model).name} x{up.factor ** repeats}")
    except (PySDCppError, ValueError, TypeError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        click.echo("cancelled: no image written", err=True)
        sys.exit(130)
    click.echo(f"wrote {output} ({img.width}x{img.height})")


@main.command(context_settings=CONTEXT)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The GGUF file to write.")
@click.option("--type", "out_type", type=click.Choice(OUTPUT_TYPES),
              default="f16", show_default=True, help="Weight type (biases, norms and embeddings keep theirs).")
@click.option("--prediction", type=click.Choice(["auto", *PREDICTIONS]), default="auto", show_default=True,
              help="Record epsilon or v prediction (auto: from a diffusers folder's scheduler config).")
@click.option("--base", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to take a missing text_encoder/ or vae/ from.")
@click.option("--alter-masks", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON mask file (docs/alter-gguf.md) to write as ALTER routing; wins over an ALTER folder's masks.")
@click.option("--drop-unused", is_flag=True,
              help="Leave out the tensors of units no ALTER expert keeps (stock stable-diffusion.cpp cannot load that).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (without it an existing file is never touched).")
@click.option("--few-step", type=click.Choice(["auto", "none", *FEW_STEP_KINDS]), default="auto", show_default=True,
              help="Record a few-step model (turbo: 1 step, lcm: 4, both without guidance) for generate's defaults; "
                   "auto: only where the source declares it (scheduler config, safetensors ModelSpec metadata).")
def convert(input_path, output, out_type, prediction, base, alter_masks, drop_unused, overwrite, few_step):
    """Convert a checkpoint to GGUF: a .safetensors / .ckpt file, a diffusers folder or an ALTER output folder (SD1.x,
    SD2.x, SDXL and the UNet variants stable-diffusion.cpp builds: inpaint, pix2pix, tiny, SDXS, SSD-1B, Vega; the
    layout is read from the weights). ALTER masks (pruning_mask.pth, else hypernet/, or --alter-masks) become
    routing metadata.

    \b
    Examples:
      pysdcpp convert v1-5-pruned-emaonly.safetensors -o sd15-f16.gguf
      pysdcpp convert ./stable-diffusion-2-1 -o sd21-q8.gguf --type q8_0
      pysdcpp convert ./alter-run --base ./stable-diffusion-2-1 -o alter.gguf --drop-unused
      pysdcpp convert ./stable-diffusion-2-1 --alter-masks masks.json -o sd21-pruned.gguf
      pysdcpp convert pytorch_lora_weights.safetensors -o lora.safetensors   # a LoRA: kohya text-encoder names
      pysdcpp convert ./sd-controlnet-canny -o canny.safetensors   # a diffusers ControlNet: cldm names

    A LoRA file (every tensor lora_A/lora_B, lora_down/lora_up or alpha) is written as a LoRA: its diffusers/PEFT
    text-encoder tensors renamed to kohya's lora_te* (stable-diffusion.cpp applies no text_encoder.* tensor),
    every tensor's bytes as they are (--type does not apply). A diffusers ControlNet (its folder or
    diffusion_pytorch_model.safetensors) is written in the original cldm names, the ones stable-diffusion.cpp reads
    (bytes as they are; a .safetensors output); cldm-named ControlNets load as they are.
    """
    from ._converters import converters, submodule
    from .format.errors import FormatError

    controlnet = submodule("controlnet")
    if controlnet.weights_file(input_path) is not None:
        try:
            r = controlnet.convert_controlnet(input_path, output, overwrite=overwrite)
        except FormatError as e:
            _fail(str(e))
        click.echo(f"wrote {r.output}: {r.family} ControlNet, {r.n_tensors} tensors in the original (cldm) names")
        return
    lora = submodule("lora")
    if lora.is_lora_file(input_path):
        try:
            r = lora.convert_lora(input_path, output, overwrite=overwrite)
        except FormatError as e:
            _fail(str(e))
        click.echo(f"wrote {r.output}: LoRA, {r.n_tensors} tensors, {len(r.renamed)} text-encoder tensors renamed "
                   "to kohya's lora_te* names")
        return

    bar = _WriteBar(f"writing {output.name}")
    try:
        report = converters().convert(input_path, output, out_type, prediction=prediction, base=base,
                                      alter_masks=alter_masks, drop_unused=drop_unused, overwrite=overwrite,
                                      few_step=few_step, progress=bar)
    except FormatError as e:
        _fail(str(e))
    finally:
        bar.close()
    types = ", ".join(f"{k} {v}" for k, v in sorted(report.types.items()))
    variant = "" if report.variant == "base" else f" ({report.variant} UNet)"
    few = f", few-step {report.few_step}" if report.few_step else ""
    click.echo(f"wrote {report.output}: {report.family}{variant}, {report.n_tensors} tensors ({types}), "
               f"prediction {report.prediction or 'not recorded'}{few}")
    if report.alter is not None:
        r = report.alter
        dropped = f", tensors of {len(r.dropped)} never-kept units left out" if drop_unused else ""
        click.echo(f"ALTER routing: {r.n_experts} experts over {r.n_units} units, masks from {r.source}, "
                   f"skip semantics {r.semantics}{dropped}")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _short(value) -> str:
    """A metadata value for the human listing: long arrays (ALTER masks, timestep tables) abbreviated."""
    if isinstance(value, list):
        more = f", ...] ({len(value)} entries)" if len(value) > 8 else "]"
        return "[" + ", ".join(map(str, value[:8])) + more
    return str(value)


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--tensors", "list_tensors", is_flag=True, help="List every tensor.")
@click.option("--size", type=int, default=512, show_default=True,
              help="ALTER files: image size for the per-expert MACs.")
@click.option("--steps", type=int, default=20, show_default=True,
              help="ALTER files: sampling steps of the default (discrete) schedule to map onto experts.")
def inspect(model, as_json, list_tensors, size, steps):
    """Architecture, tensor types and sizes, and metadata of a model file; for a file with ALTER routing, its
    experts, their kept and skipped units, MACs, and the timesteps and sampling steps each serves.

    \b
    Examples:
      pysdcpp inspect model.gguf
      pysdcpp inspect alter.gguf --size 768 --steps 20 --json
    """
    from .errors import ModelLoadError
    from .format.errors import FormatError
    from .format.routing import read_alter
    from .modelfile import read_model_file

    if size <= 0 or size % 8:
        _fail(f"--size must be a positive multiple of 8, got {size}")
    if steps < 1:
        _fail("--steps must be at least 1")
    try:
        mf = read_model_file(model)
        routing = read_alter(mf.metadata)
    except ModelLoadError as e:
        _fail(str(e))
    except FormatError as e:
        _fail(f"{model}: {e}")
    by_type: dict[str, list[int]] = {}
    groups: dict[str, int] = {}
    for t in mf.tensors:
        entry = by_type.setdefault(t.type, [0, 0])
        entry[0] += 1
        entry[1] += t.nbytes
        head = next((p for p in (UNET_PREFIX, VAE_PREFIX, TAE_PREFIX, "cond_stage_model.")
                     if t.name.startswith(p)), "other")
        groups[head] = groups.get(head, 0) + t.nbytes
    arch = mf.architecture
    layout = None
    if mf.unet_layout is not None:
        from .format.detect import describe_layout

        layout = describe_layout(mf.unet_layout)
    info = {"path": str(mf.path), "format": mf.format, "family": mf.family, "variant": mf.variant,
            "upstream_version": arch.upstream_version if arch is not None else None, "unet_layout": layout,
            "prediction": mf.prediction,
            "n_tensors": len(mf.tensors), "bytes": mf.total_bytes,
            "types": {k: {"tensors": v[0], "bytes": v[1]} for k, v in sorted(by_type.items())},
            "components": {"unet" if k == UNET_PREFIX else "vae" if k == VAE_PREFIX else
                           "tiny_vae" if k == TAE_PREFIX else
                           "text_encoder" if k.startswith("cond") else k: v for k, v in groups.items()},
            "metadata": {k: v for k, v in mf.metadata.items()}}
    if list_tensors:
        info["tensors"] = [{"name": t.name, "type": t.type, "shape": list(t.shape), "bytes": t.nbytes}
                           for t in mf.tensors]
    if routing is not None:
        from .alter_info import alter_summary

        info["alter"] = alter_summary(routing, mf.unet_layout, size, steps)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"{mf.path}  ({mf.format}, {_human(mf.total_bytes)})")
    click.echo(f"  family      {mf.family or 'unknown'}" + (f", {mf.variant} UNet" if mf.variant else "")
               + (f" (stable-diffusion.cpp: {arch.upstream_version})" if arch is not None else ""))
    if layout:
        click.echo(f"  unet        {layout}")
    click.echo(f"  prediction  {mf.prediction or 'not recorded (decided at load)'}")
    click.echo(f"  tensors     {len(mf.tensors)}")
    for k, v in info["components"].items():
        click.echo(f"  {k:<12}{_human(v)}")
    click.echo("  types:")
    for k, v in info["types"].items():
        click.echo(f"    {k:<8}{v['tensors']:>6} tensors  {_human(v['bytes'])}")
    if mf.metadata:
        click.echo("  metadata:")
        for k, v in mf.metadata.items():
            click.echo(f"    {k} = {_short(v)}")
    if routing is not None:
        from .alter_info import format_alter_summary

        for line in format_alter_summary(info["alter"]):
            click.echo(line)
    if list_tensors:
        for t in mf.tensors:
            click.echo(f"  {t.name:<90} {t.type:<6} {list(t.shape)}")


@main.command(context_settings=CONTEXT)
@click.option("-m", "--model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="GGUF (or checkpoint) to run [the synthetic SD1.5 demo model].")
@click.option("--layers", is_flag=True,
              help="Benchmark every distinct 3x3 conv of SD1.5's UNet and VAE (--family for others) instead.")
@click.option("--alter-demo", is_flag=True,
              help="Run the synthetic SD1.5 with demo ALTER routing (10 experts at ~65% of the dense MACs).")
@click.option("--experts", "experts", is_flag=True,
              help="With -m ALTER_FILE: one UNet evaluation per expert against the dense model.")
@click.option("--peers", default=None, metavar="RUNTIMES",
              help="One UNet evaluation (batch 1, 2) and one VAE decode in other runtimes beside ours (pysdcpp, "
                   "upstream's path): torch, torch-compile, openvino, openvino-bf16 (pip install '.[peers]'), "
                   "pysdcpp-q8_0 (ours on q8_0 weights); "
                   "the synthetic model of --family, --size [256], --repeat, --tasks.")
@click.option("--tasks", "peer_tasks", default="unet-b1,unet-b2,vae", show_default=True,
              help="With --peers: comma-separated of unet-b1, unet-b2, vae, gen (a whole guided generation of "
                   "--steps [20] Euler steps through each runtime's pipeline; SD1.x and SD2.x).")
@click.option("--profile", "profile_peers", is_flag=True,
              help="With --peers: then one more run per task and runtime, its time by op class (3x3 and 1x1 convs, "
                   "linear layers, attention, norms, element-wise, data movement): ours from the library's node "
                   "profiler, OpenVINO's performance counters, PyTorch's profiler.")
@click.option("--batch", "batch_splits", default=None, metavar="SPLITS",
              help="Images per second of `pysdcpp batch` for each split of the cores, e.g. 1x2,2x1 (workers x "
                   "threads; --steps, --size, --repeat apply; 6 jobs).")
@click.option("--linear", "linear_layers", is_flag=True,
              help="Benchmark every distinct linear layer of SD1.5's UNet (ggml's path against ours) instead.")
@click.option("--attention", "attention_layers", is_flag=True,
              help="Benchmark every distinct attention shape of SD1.5 and SD2.1 (UNet and VAE; --family for "
                   "others) instead.")
@click.option("--size", type=int, default=None,
              help="Image size [256 for a model, 512 for --layers and --linear, 512 and 768 for --attention].")
@click.option("--steps", type=int, default=None, help="Sampling steps per generation [4; --peers' gen 20].")
@click.option("--cfg", "guidance_scale", type=float, default=None,
              help="Guidance scale of the generations; 1 turns guidance off [the model's: 7, few-step models 1].")
@click.option("-t", "--threads", type=int, default=2, show_default=True)
@click.option("--repeat", type=int, default=2, show_default=True, help="Interleaved repetitions per variant.")
@click.option("--variants", default="upstream,accelerated", show_default=True,
              help="Comma-separated, the first is the baseline: upstream, accelerated, im2col, direct, winograd, "
                   "fast-attention, fast-linear, upstream-direct, dense (an ALTER file with routing off), deepcache (interval "
                   "3, branch 0), deepcache-b1, deepcache-5 (interval 5), units (the default unit schedule), ucache, ucache-t4 (threshold 4), spectrum, upstream-ucache (upstream's step caches), narrow-gemm, wide-gemm (our GEMM's register tiles), "
                   "separate-guidance (all but batched guidance), batched-guidance (upstream's kernels, guidance "
                   "batched); NAME@STEPS gives a "
                   "variant its own step count (e.g. upstream@50,accelerated with --steps 20).")
@click.option("--algorithms", default="im2col,winograd_f4,winograd_f4_fused,winograd_f2_fused,winograd_f4_ggml_gemm", show_default=True,
              help="With --layers: im2col, direct, winograd_f4, winograd_f2, winograd_f4_in_graph (the filter "
                   "transform inside the graph, every evaluation), winograd_f4_ggml_gemm (the products through "
                   "ggml's GEMM instead of ours), winograd_f4_scalar (our GEMM's portable scalar build), "
                   "winograd_f4_fused and winograd_f2_fused (the filter transform inside the products, never "
                   "cached).")
@click.option("--paths", default="upstream,gemm,fused", show_default=True,
              help="With --attention: upstream, gemm, fused, fused_scalar, fast, upstream_flash.")
@click.option("--only", default=None, help="With --layers: only shapes of layers whose name contains this.")
@click.option("--family", "families", default=None,
              help="With --layers (one) and --attention (comma-separated): the UNet families whose shapes to time "
                   "[--layers sd1; --attention sd1,sd2]; sdxl gives SDXL's.")
@click.option("--timeout", type=float, default=1800, show_default=True, help="Seconds per worker run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full report (machine, build, every timing) here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a chart (PNG) here; needs matplotlib (pip install 'pysdcpp[plot]').")
def bench(model, layers, alter_demo, experts, peers, profile_peers, peer_tasks, batch_splits, attention_layers,
          linear_layers,
          size, steps, guidance_scale, threads, repeat, variants, algorithms, paths, only, families, timeout, json_path,
          plot_path):
    """Latency, memory and fidelity against upstream stable-diffusion.cpp, measured in the same run.

    Each variant's generation runs in its own worker process (peak RSS per variant; a crash or timeout is
    reported and the rest go on), repetitions interleaved so machine drift hits every variant alike. Latency
    does not depend on the weight values, so the synthetic model times like a real one; fidelity (PSNR) does.

    \b
    Examples:
      pysdcpp bench                                     # synthetic SD1.5, 256 px, 4 steps
      pysdcpp bench -m sd15.gguf --size 512 --steps 20 --variants upstream,accelerated,im2col --json run.json
      pysdcpp bench --layers --size 512 --json layers-512.json
      pysdcpp bench --attention --json attention.json
      pysdcpp bench --linear --json linear-512.json
      pysdcpp bench -m alter.gguf --steps 20 --variants upstream@50,accelerated   # ALTER vs 50 dense steps
      pysdcpp bench -m alter.gguf --experts --size 512
      pysdcpp bench --batch 1x2,2x1 --size 256 --steps 10 --json batch-256.json
      pysdcpp bench --peers torch,openvino --size 512 --json peers-512.json
      pysdcpp bench --peers openvino --profile           # where each runtime's time goes, by op class
      pysdcpp bench --peers torch,openvino --tasks unet-b2,gen   # and a 20-step generation in each pipeline
    """
    from .bench import (VARIANTS, batch_bench, format_batch_table, parse_splits, attention_bench, expert_bench, format_attention_table, format_expert_table,
                        format_layer_table, format_linear_table, format_model_table, layer_bench, linear_bench,
                        model_bench, parse_variant)
    from .errors import PySDCppError
    from .layers import ATTENTION_VARIANTS, CONV_VARIANTS

    if profile_peers and peers is None:
        _fail("--profile goes with --peers (e.g. --peers openvino --profile)")
    if plot_path is not None and plot_path.suffix.lower() != ".png":
        _fail(f"--plot writes a PNG: give a .png path, not {plot_path}")
    if peer_tasks != "unet-b1,unet-b2,vae" and peers is None:
        _fail("--tasks goes with --peers (e.g. --peers openvino --tasks unet-b2,gen)")
    steps_arg, steps = steps, _default(steps, 4)
    if repeat < 1 or threads < 1 or steps < 1:
        _fail("--repeat, --threads and --steps must be at least 1")
    if layers + attention_layers + linear_layers + experts + (batch_splits is not None) + (peers is not None) > 1:
        _fail("--layers, --attention, --linear, --experts, --batch and --peers are separate benchmarks: give one")
    if size is not None and (size <= 0 or size % 64):
        _fail(f"--size must be a positive multiple of 64, got {size}")
    from .format.names import FAMILIES

    family_list = tuple(f.strip() for f in (families or ("sd1" if layers or peers else "sd1,sd2")).split(",") if f.strip())
    if not family_list or any(f not in FAMILIES for f in family_list):
        _fail(f"--family takes {', '.join(FAMILIES)} (comma-separated for --attention), got {families!r}")
    if layers and len(family_list) != 1:
        _fail("--layers times one family's shapes: give one --family")
    size_arg = size
    sizes = (size,) if size is not None else (512, 768)  # --attention
    if alter_demo:
        if model is not None:
            _fail("--alter-demo and -m are alternatives: give one")
        from .demo import synthetic_gguf

        bar = _WriteBar("making the ALTER demo model (once, cached)")
        model = synthetic_gguf("sd1", "f16", progress=bar, alter=True)
        bar.close()
    size = _default(size, 512 if layers or linear_layers else 256)
    if experts:
        if model is None or not model.is_file():
            _fail("--experts needs -m FILE: a GGUF with ALTER routing")
        if plot_path is not None:
            _fail("--plot draws model, --layers and --peers reports; the --experts report is a table")

        def expert_progress(i, n, row):
            click.echo(f"  [{i}/{n}] expert {row['expert']}: {row['speedup_vs_dense']:.2f}x", err=True)

        try:
            report = expert_bench(str(model), _default(size_arg, 512), threads, repeat, progress=expert_progress)
        except (PySDCppError, ValueError) as e:
            _fail(str(e))
        click.echo(format_expert_table(report))
    elif peers is not None:
        from .bench.peers import RUNTIMES, format_peers_table, peers_bench
        from .demo import synthetic_diffusers_folder

        from .bench.peers import GEN_STEPS, check_tasks

        chosen = [r.strip() for r in peers.split(",") if r.strip()]
        tasks = tuple(dict.fromkeys(t.strip() for t in peer_tasks.split(",") if t.strip()))
        try:
            check_tasks(tasks, family_list[0], _default(steps_arg, GEN_STEPS))
        except ValueError as e:
            _fail(str(e))
        runtimes = list(dict.fromkeys(["pysdcpp", "upstream", *chosen]))
        bad = [r for r in runtimes if r not in RUNTIMES]
        if bad:
            others = ", ".join(r for r in RUNTIMES if r not in ("pysdcpp", "upstream"))
            _fail(f"unknown runtime {bad[0]!r}; --peers takes {others}")
        if model is not None or len(family_list) != 1:
            _fail("--peers runs the synthetic model of one --family (every runtime loads the same weights)")
        gguf = _demo_model(family_list[0])
        click.echo("writing its diffusers folder (once, cached)", err=True)
        folder = synthetic_diffusers_folder(family_list[0])

        def peers_progress(rep, name, msg):
            state = ("FAILED: " + msg["error"]) if not msg.get("ok") else (
                f"set up in {msg['setup_seconds']:.1f} s" if rep == "setup" else f"{msg['seconds']:.2f} s")
            what = rep if isinstance(rep, str) else f"repetition {rep + 1}/{repeat}"
            click.echo(f"  {what} {name}: {state}", err=True)

        q8 = _demo_model(family_list[0], "q8_0") if "pysdcpp-q8_0" in runtimes else None
        report = peers_bench(str(gguf), str(folder), runtimes, _default(size_arg, 256), threads, repeat,
                             family_list[0], tasks=tasks, progress=peers_progress,
                             q8_gguf=str(q8) if q8 else None, profile=profile_peers,
                             steps=_default(steps_arg, GEN_STEPS))
        click.echo(format_peers_table(report))
        if profile_peers:
            from .bench.peer_profiles import format_profile_table

            click.echo(format_profile_table(report))
    elif batch_splits is not None:
        if plot_path is not None:
            _fail("--plot draws model, --layers and --peers reports; the --batch report is a table")
        try:
            splits = parse_splits(batch_splits)
        except ValueError as e:
            _fail(str(e))
        if model is None:
            model = _demo_model()

        def batch_progress(rep, name, r):
            click.echo(f"  repetition {rep + 1}/{repeat} {name}: {60 * r['images_per_second']:.2f} images/min",
                       err=True)

        try:
            report = batch_bench(str(model), splits, size, steps, repeat=repeat, progress=batch_progress)
        except (PySDCppError, ValueError, RuntimeError) as e:
            _fail(str(e))
        click.echo(format_batch_table(report))
    elif attention_layers:
        chosen = tuple(a.strip() for a in paths.split(",") if a.strip())
        bad = [a for a in chosen if a not in ATTENTION_VARIANTS]
        if bad or not chosen:
            _fail(f"unknown attention path {bad[0] if bad else ''!r}; choose from {', '.join(ATTENTION_VARIANTS)}")
        if plot_path is not None:
            _fail("--plot draws model, --layers and --peers reports; the --attention report is a table")

        def attention_progress(i, n, shape):
            click.echo(f"  [{i}/{n}] {shape.Lq}x{shape.Lk} {shape.heads}x{shape.d}", err=True)

        report = attention_bench(family_list, sizes, threads, repeat, chosen, progress=attention_progress)
        click.echo(format_attention_table(report))
    elif linear_layers:
        if plot_path is not None:
            _fail("--plot draws model, --layers and --peers reports; the --linear report is a table")

        def linear_progress(i, n, row):
            click.echo(f"  [{i}/{n}] {row['rows']} x {row['K']} -> {row['N']}", err=True)

        report = linear_bench(size, threads, max(repeat, 5), progress=linear_progress)
        click.echo(format_linear_table(report))
    elif layers:
        algos = tuple(a.strip() for a in algorithms.split(",") if a.strip())
        bad = [a for a in algos if a not in CONV_VARIANTS]
        if bad:
            _fail(f"unknown algorithm {bad[0]!r}; choose from {', '.join(CONV_VARIANTS)}")

        def layer_progress(i, n, res):
            click.echo(f"  [{i}/{n}] {res.shape.C}->{res.shape.K} at {res.shape.H}x{res.shape.W}", err=True)

        report = layer_bench(size, threads, repeat, algos, progress=layer_progress, only=only, family=family_list[0])
        click.echo(format_layer_table(report))
    else:
        names = [v.strip() for v in variants.split(",") if v.strip()]
        if not names:
            _fail(f"no variants given; choose from {', '.join(VARIANTS)}")
        for spec in names:
            try:
                parse_variant(spec)
            except ValueError as e:
                _fail(str(e))
        if model is None:
            model = _demo_model()
        elif not model.is_file():
            _fail(f"{model}: no such file")

        def model_progress(rep, name, r):
            state = f"{r['phases']['total']:.1f} s" if r.get("ok") else f"FAILED ({r['error']})"
            click.echo(f"  repetition {rep + 1}/{repeat} {name}: {state}", err=True)

        report = model_bench(str(model), names, size, steps, threads, repeat, timeout, progress=model_progress,
                             guidance_scale=guidance_scale)
        click.echo(format_model_table(report))
    if json_path:
        json_path.write_text(json.dumps(report, indent=2, default=float))
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        from .bench import plot_report

        try:
            plot_report(report, plot_path)
        except RuntimeError as e:
            _fail(str(e))
        click.echo(f"wrote {plot_path}", err=True)


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(as_json):
    """Package and upstream versions, build flags, CPU features, built backends, samplers and schedulers."""
    from . import _native
    from .errors import PySDCppError

    out: dict = {"pysdcpp": __version__, "python": platform.python_version(), "machine": platform.machine(),
                 "library_dir": str(_native.lib_dir()), "build": _native.build_info(), "backends": {}}
    for backend in _native.BACKENDS:
        try:
            lib = _native.load(backend)
        except PySDCppError as e:
            out["backends"][backend] = {"available": False, "error": str(e)}
            continue
        # sd_commit() is whatever git said where the tree was built (nothing for the registry source, our own
        # repository for the patched copy): the commit the build pinned is the reliable answer.
        commit = out["build"].get("upstream_commit") or lib.commit()
        entry = {"available": True, "path": str(lib.path), "upstream_version": lib.version(),
                 "upstream_commit": commit, "system_info": lib.system_info().strip(),
                 "components": lib.has_components}
        entry["samplers"] = lib.enum_names("sd_sample_method_name", int(lib.lib.SAMPLE_METHOD_COUNT))
        entry["schedulers"] = lib.enum_names("sd_scheduler_name", int(lib.lib.SCHEDULER_COUNT))
        out["backends"][backend] = entry
    out["upstream_cli"] = str(_native.upstream_cli() or "")
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"pysdcpp {out['pysdcpp']} (Python {out['python']}, {out['machine']})")
    click.echo(f"libraries: {out['library_dir']}")
    for k, v in out["build"].items():
        click.echo(f"  build {k}: {v}")
    for backend, entry in out["backends"].items():
        if not entry["available"]:
            click.echo(f"{backend}: not available ({entry['error']})")
            continue
        click.echo(f"{backend}: stable-diffusion.cpp {entry['upstream_version']} ({entry['upstream_commit']})")
        click.echo(f"  {entry['system_info']}")
    first = next((e for e in out["backends"].values() if e.get("available")), None)
    if first:
        click.echo("samplers: " + ", ".join(first["samplers"]))
        click.echo("schedulers: default, " + ", ".join(first["schedulers"]))


if __name__ == "__main__":
    main()
