"""The peer benchmark (`pysdcpp bench --peers torch,openvino`): one UNet evaluation (batch 1 and 2), one VAE
decode and a whole guided generation of the same synthetic model in every runtime, each runtime in a worker process
of its own, timed in turn with pysdcpp's (which lives through the run) in a phase of its own; output agreement
against PyTorch, peak RSS, table."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np

from . import peer_profiles
from .machine import build_info, footer, machine_info, peak_rss, reset_peak_rss, utc_now
from .model import UPSTREAM_PATHS

# name: what runs (docs/benchmarks.md lists each runtime's configuration)
RUNTIMES = {
    "pysdcpp": "the accelerated library, its defaults (component API)",
    "upstream": "the accelerated library with every acceleration off: upstream's path, bit for bit",
    "pysdcpp-q8_0": "the accelerated library, its defaults, on the same model with q8_0 weights (ggml's int8 dot "
                    "products where the layers take them)",
    "torch": "PyTorch + diffusers, fp32, inference_mode, channels_last, SDPA",
    "torch-compile": "as torch, the UNet and decoder under torch.compile (compile time not counted)",
    "openvino": "OpenVINO, fp32 inference precision, static shapes, LATENCY hint",
    "openvino-bf16": "OpenVINO, bf16 inference precision (where the CPU has it), static shapes, LATENCY hint",
}
TASKS = ("unet-b1", "unet-b2", "vae", "gen")
DEFAULT_TASKS = ("unet-b1", "unet-b2", "vae")   # "gen" on request: a whole generation is 20 UNet evaluations
GEN_PROMPT = "a lighthouse at dusk, oil painting"   # the generation's prompt; its negative prompt is ""
GEN_GUIDANCE = 7.0   # pysdcpp's default guidance scale
GEN_STEPS = 20
# whose generations start from `gen_latent` (the others draw their own noise: no output agreement for "gen")
_SHARED_NOISE = ("torch", "torch-compile", "openvino", "openvino-bf16")
_NOTHING = object()  # ask(): only wait for the answer
_TIMESTEP = 500.0
# idle seconds before each timed run: worker threads a runtime leaves spinning after its run (OpenVINO's TBB arena,
# OpenMP) settle before the next runtime's run starts
SETTLE_SECONDS = 1.0


def inputs(family: str, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The same inputs for every runtime: latents for batch 1 and 2, a text context, a VAE latent, the initial
    noise of the peers' generations."""
    from ..format.families import CONTEXT_LENGTH, context_width

    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((2, 4, size // 8, size // 8)).astype(np.float32)
    ctx = rng.standard_normal((2, CONTEXT_LENGTH, context_width(family))).astype(np.float32)
    z = rng.standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    noise = rng.standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    return {"latent": lat, "context": ctx, "vae_latent": z, "gen_latent": noise}


def prompt_ids(gguf: str, threads: int) -> dict[str, np.ndarray]:
    """The token ids of GEN_PROMPT and of the empty negative prompt, from pysdcpp's tokenizer (its ids are CLIP's
    published ones, tests/test_components): the peers' pipelines take them through their own text encoders, so
    every runtime encodes the same ids (our synthetic folders carry no tokenizer files)."""
    from .. import StableDiffusion

    sd = StableDiffusion(gguf, threads=threads)
    try:
        return {"prompt_ids": sd.tokenize(GEN_PROMPT)[None].astype(np.int64),
                "negative_ids": sd.tokenize("")[None].astype(np.int64)}
    finally:
        sd.close()


def _image(decoded: np.ndarray) -> np.ndarray:
    """A VAE's output (1, 3, H, W) in [-1, 1] as the image a pipeline returns: (H, W, 3) in [0, 1]."""
    return np.clip(decoded[0].transpose(1, 2, 0) / 2 + 0.5, 0.0, 1.0).astype(np.float32)


class _Ours:
    def __init__(self, gguf: str, threads: int, accelerated: bool):
        from .. import StableDiffusion

        kw = {} if accelerated else UPSTREAM_PATHS
        self.sd = StableDiffusion(gguf, threads=threads, **kw)

    def run(self, task: str, x: dict) -> np.ndarray:
        if task == "vae":
            return self.sd.decode(x["vae_latent"])
        if task == "gen":   # the library's own generation: text encoding, Euler's steps (a batch-2 UNet
            size = x["latent"].shape[-1] * 8   # evaluation each; upstream's path: two batch-1), decode
            img = self.sd.generate(GEN_PROMPT, "", width=size, height=size, num_inference_steps=x["gen_steps"],
                                   guidance_scale=GEN_GUIDANCE, sampler="euler", seed=0)[0]
            return np.asarray(img, dtype=np.float32) / 255.0
        n = 1 if task == "unet-b1" else 2
        return self.sd.unet(x["latent"][:n], _TIMESTEP, x["context"][:n])

    def profile(self, task: str, x: dict) -> dict:
        return peer_profiles.profile_ours(lambda: self.run(task, x))


class _Torch:
    def __init__(self, folder: str, threads: int, compiled: bool):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel

        torch.set_num_threads(threads)
        self.torch, self.folder = torch, folder
        self.unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet", torch_dtype=torch.float32).eval()
        self.vae = AutoencoderKL.from_pretrained(f"{folder}/vae", torch_dtype=torch.float32).eval()
        self.unet.to(memory_format=torch.channels_last)
        self.vae.to(memory_format=torch.channels_last)
        self.scale = float(self.vae.config.scaling_factor)
        self.unet_fn = self.unet
        self.vae_fn = self.vae.decode
        if compiled:
            self.unet_fn = torch.compile(self.unet)
            self.vae_fn = torch.compile(self.vae.decode)
        self.pipe = None   # diffusers' pipeline, built at the first "gen"

    def _pipeline(self):
        """diffusers' StableDiffusionPipeline on these modules (the compiled ones for torch-compile, as diffusers'
        docs set them), its text encoder and the folder's Euler scheduler; no tokenizer (the ids come in)."""
        if self.pipe is None:
            from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
            from transformers import CLIPTextModel

            te = CLIPTextModel.from_pretrained(f"{self.folder}/text_encoder", torch_dtype=self.torch.float32).eval()
            sched = EulerDiscreteScheduler.from_pretrained(f"{self.folder}/scheduler")
            self.pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=te, tokenizer=None, unet=self.unet,
                                                scheduler=sched, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
            self.pipe.set_progress_bar_config(disable=True)
            if self.unet_fn is not self.unet:
                self.pipe.unet = self.unet_fn
                self.pipe.vae.decode = self.vae_fn
        return self.pipe

    def _generate(self, x: dict) -> np.ndarray:
        torch, pipe = self.torch, self._pipeline()
        te = pipe.text_encoder
        pe = te(torch.from_numpy(x["prompt_ids"]))[0]
        ne = te(torch.from_numpy(x["negative_ids"]))[0]
        size = x["latent"].shape[-1] * 8
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=size, width=size,
                   num_inference_steps=x["gen_steps"], guidance_scale=GEN_GUIDANCE,
                   latents=torch.from_numpy(x["gen_latent"]), output_type="np")
        return np.asarray(out.images[0], dtype=np.float32)

    def run(self, task: str, x: dict) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            if task == "gen":
                return self._generate(x)
            if task == "vae":
                z = torch.from_numpy(x["vae_latent"] / self.scale).to(memory_format=torch.channels_last)
                return self.vae_fn(z).sample.float().numpy()
            n = 1 if task == "unet-b1" else 2
            lat = torch.from_numpy(x["latent"][:n]).to(memory_format=torch.channels_last)
            return self.unet_fn(lat, torch.tensor([_TIMESTEP] * n), encoder_hidden_states=torch.from_numpy(
                x["context"][:n])).sample.float().numpy()

    def profile(self, task: str, x: dict) -> dict:
        return peer_profiles.profile_torch(lambda: self.run(task, x))


class _OpenVINO:
    """Each task converted from the diffusers module with its exact input shapes (static), compiled once."""

    def __init__(self, folder: str, threads: int, precision: str, size: int, family: str, tasks: tuple[str, ...],
                 keep_models: str | None = None):
        import openvino as ov
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from ..format.families import CONTEXT_LENGTH

        self.core = ov.Core()
        if precision == "bf16" and "BF16" not in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise RuntimeError("this CPU has no bf16 support in OpenVINO (OPTIMIZATION_CAPABILITIES)")
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                  "INFERENCE_PRECISION_HINT": precision}
        self.config, self.models = config, {}   # task -> the converted model's file, for profile()
        unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet", torch_dtype=torch.float32).eval()
        vae = AutoencoderKL.from_pretrained(f"{folder}/vae", torch_dtype=torch.float32).eval()
        self.scale = float(vae.config.scaling_factor)

        class UNet(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, sample, timestep, context):
                return self.m(sample, timestep, encoder_hidden_states=context).sample

        class Decoder(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, z):
                return self.m.decode(z).sample

        class TextEncoder(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, ids):
                return self.m(ids)[0]

        x = inputs(family, size)
        models = [t for t in tasks if t != "gen"]
        if "gen" in tasks:   # the generation's models: the text encoder, the UNet at batch 2, the decoder
            models += [m for m in ("text", "unet-b2", "vae") if m not in models]
            from diffusers import EulerDiscreteScheduler

            self.scheduler = EulerDiscreteScheduler.from_pretrained(f"{folder}/scheduler")
        self.compiled = {}
        with torch.no_grad():
            for task in models:
                if task == "vae":
                    example = (torch.from_numpy(x["vae_latent"]),)
                    model = ov.convert_model(Decoder(vae), example_input=example)
                elif task == "text":
                    from transformers import CLIPTextModel

                    te = CLIPTextModel.from_pretrained(f"{folder}/text_encoder", torch_dtype=torch.float32).eval()
                    example = (torch.zeros((1, CONTEXT_LENGTH), dtype=torch.int64),)
                    model = ov.convert_model(TextEncoder(te), example_input=example)
                    del te
                else:
                    n = 1 if task == "unet-b1" else 2
                    example = (torch.from_numpy(x["latent"][:n]), torch.tensor([_TIMESTEP] * n),
                               torch.from_numpy(x["context"][:n]))
                    model = ov.convert_model(UNet(unet), example_input=example)
                model.reshape({port: ov.PartialShape(list(t.shape)) for port, t in zip(model.inputs, example)})
                self.compiled[task] = self.core.compile_model(model, "CPU", config)
                if keep_models:   # for profile(): on disk (the folder keep_models), not in memory
                    self.models[task] = os.path.join(keep_models, f"{precision}-{task}.xml")
                    ov.save_model(model, self.models[task], compress_to_fp16=False)
                del model
        del unet, vae

    def _args(self, task: str, x: dict) -> list:
        if task == "vae":
            return [x["vae_latent"] / self.scale]
        n = 1 if task == "unet-b1" else 2
        return [x["latent"][:n], np.full((n,), _TIMESTEP, np.float32), x["context"][:n]]

    def run(self, task: str, x: dict) -> np.ndarray:
        if task == "gen":
            return self._generate(x)
        return np.asarray(self.compiled[task](self._args(task, x))[0], dtype=np.float32)

    def _generate(self, x: dict) -> np.ndarray:
        """diffusers' StableDiffusionPipeline's steps on the compiled models (what optimum-intel's
        OVStableDiffusionPipeline runs): both prompts encoded, batch-2 UNet evaluations guided, the folder's Euler
        scheduler, decode."""
        import torch

        text, unet, sched = self.compiled["text"], self.compiled["unet-b2"], self.scheduler
        ctx = np.concatenate([text([x["negative_ids"]])[0], text([x["prompt_ids"]])[0]]).astype(np.float32)
        sched.set_timesteps(x["gen_steps"])
        lat = torch.from_numpy(x["gen_latent"]) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat] * 2), t).numpy()
            eps = np.asarray(unet([inp, np.full((2,), float(t), np.float32), ctx])[0])
            eps = eps[:1] + GEN_GUIDANCE * (eps[1:] - eps[:1])
            lat = sched.step(torch.from_numpy(eps), t, lat).prev_sample
        return _image(np.asarray(self.compiled["vae"]([lat.numpy() / self.scale])[0]))

    def profile(self, task: str, x: dict) -> dict:
        """The task's model compiled anew with the performance counters on (the timed one has them off), in place
        of the timed one (OpenVINO holds several GB per compiled UNet at 512 px)."""
        self.compiled[task] = None
        model = self.core.read_model(self.models[task])
        compiled = self.core.compile_model(model, "CPU", {**self.config, "PERF_COUNT": True})
        del model
        try:
            return peer_profiles.profile_openvino(compiled, self._args(task, x))
        finally:
            del compiled


def _worker(conn, runtime: str, gguf: str, folder: str, threads: int, size: int, family: str,
            tasks: tuple[str, ...], q8_gguf: str | None, profile: bool = False, scratch: str | None = None,
            gen: dict | None = None) -> None:
    """A runtime in its own process: builds it, then runs what the driver asks, one task at a time. `scratch`: a
    folder the driver removes after the run, for what profiling keeps on disk; `gen`: the generation's steps and
    prompt ids."""
    try:
        t0 = time.perf_counter()
        if runtime in ("pysdcpp", "upstream"):
            rt = _Ours(gguf, threads, runtime == "pysdcpp")
        elif runtime == "pysdcpp-q8_0":
            if q8_gguf is None:
                raise ValueError("pysdcpp-q8_0 needs the model's q8_0 GGUF (q8_gguf=)")
            rt = _Ours(q8_gguf, threads, True)
        elif runtime in ("torch", "torch-compile"):
            rt = _Torch(folder, threads, runtime == "torch-compile")
        elif runtime in ("openvino", "openvino-bf16"):
            rt = _OpenVINO(folder, threads, "bf16" if runtime.endswith("bf16") else "f32", size, family, tasks,
                           keep_models=scratch if profile else None)
        else:
            raise ValueError(f"unknown runtime {runtime!r}")
        x = {**inputs(family, size), **(gen or {})}
        setup_peak = peak_rss()   # then the peak starts over: what the runs hold, apart from what setup took
        runs_peak = reset_peak_rss()
        conn.send({"ok": True, "setup_seconds": time.perf_counter() - t0})
        warm, timed_peak = set(), None
        while (msg := conn.recv()) is not None:
            if isinstance(msg, tuple):   # ("profile", task), after the timed runs; a failure costs only the profile
                if timed_peak is None:   # the peak reported: setup and timed runs, not profiling's recompiles
                    timed_peak = peak_rss()
                try:
                    conn.send({"ok": True, "profile": rt.profile(msg[1], x)})
                except Exception as e:
                    conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"})
                continue
            if msg not in warm:  # one untimed call first: allocations, one-off transforms, compilation (a
                rt.run(msg, {**x, "gen_steps": 1} if msg == "gen" else x)   # generation: of one step)
                warm.add(msg)
            t1 = time.perf_counter()
            out = rt.run(msg, x)
            conn.send({"ok": True, "seconds": time.perf_counter() - t1, "output": out})
        timed_peak = timed_peak if timed_peak is not None else peak_rss()
        conn.send({"ok": True, "peak_rss": max(setup_peak, timed_peak), "peak_rss_runs": timed_peak if runs_peak
                   else None})
    except BaseException as e:  # reported; the other runtimes go on
        try:
            conn.send({"ok": False, "error": f"{type(e).__name__}: {e}"})
        except OSError:
            pass


def check_tasks(tasks, family: str, steps: int = GEN_STEPS) -> None:
    """ValueError unless `tasks` are known ones that `family` runs (the CLI checks before writing any model)."""
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks are {', '.join(TASKS)} (--tasks takes them comma-separated), got {list(tasks)}")
    if "gen" in tasks and family == "sdxl":
        raise ValueError("the generation task runs SD1.x and SD2.x pipelines; SDXL's two text encoders are not "
                         "wired into it yet: leave \"gen\" out for sdxl")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


def peers_bench(gguf: str, folder: str, runtimes: list[str], size: int = 256, threads: int = 2, repeat: int = 3,
                family: str = "sd1", tasks: tuple[str, ...] = DEFAULT_TASKS, timeout: float = 3600.0, progress=None,
                q8_gguf: str | None = None, profile: bool = False, steps: int = GEN_STEPS) -> dict:
    """Every runtime on the same inputs; `folder`: the same model as a diffusers folder (the peers load it);
    `q8_gguf`: the same model with q8_0 weights (for pysdcpp-q8_0); `profile`: after each runtime's timed runs,
    one more run per task profiled by op class (report["profile"]; peer_profiles; not "gen"). "gen": a guided
    generation of `steps` Euler steps (GEN_PROMPT, guidance GEN_GUIDANCE) through each runtime's pipeline: ours,
    diffusers' for torch, diffusers' steps on the compiled models for OpenVINO (as optimum-intel runs them); the
    peers start from the same noise, ours from its own."""
    import multiprocessing as mp

    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise ValueError(f"unknown runtime {bad[0]!r}; choose from {', '.join(RUNTIMES)}")
    if size <= 0 or size % 64:
        raise ValueError(f"size must be a positive multiple of 64, got {size}")
    check_tasks(tasks, family, steps)
    gen = None
    if "gen" in tasks:   # before any worker: a model that does not load fails here
        gen = {"gen_steps": int(steps)}
        if any(rt in _SHARED_NOISE for rt in runtimes):
            gen.update(prompt_ids(gguf, threads))
    ctx = mp.get_context("spawn")
    # the workers' files (OpenVINO's models kept for --profile): removed after the run, also if a worker was killed
    scratch = tempfile.TemporaryDirectory(prefix="pysdcpp-peers-")
    workers, setup, errors = {}, {}, {}
    times = {rt: {t: [] for t in tasks} for rt in runtimes}
    ours_times = {rt: {t: [] for t in tasks} for rt in runtimes}   # pysdcpp's, in that runtime's phase
    outputs: dict[str, dict[str, np.ndarray]] = {rt: {} for rt in runtimes}
    peak = {}
    profiles: dict[str, dict] = {}
    profile_errors: dict[str, dict[str, str]] = {}

    def ask(conn, p, msg, wait):
        """Send `msg`, return the worker's answer; a worker that died (the OOM killer, a crash) is an error."""
        try:
            if msg is not _NOTHING:
                conn.send(msg)
            if conn.poll(wait):
                return conn.recv()
            return {"ok": False, "error": f"no answer in {wait:.0f} s"}
        except (EOFError, OSError):
            p.join(timeout=5)
            return {"ok": False, "error": f"the worker died (exit code {p.exitcode}; -9: killed, e.g. out of memory)"}

    def start(rt):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, rt, gguf, folder, threads, size, family, tuple(tasks), q8_gguf,
                                              profile, scratch.name, gen), daemon=True)
        p.start()
        child.close()
        workers[rt] = (p, parent)
        msg = ask(parent, p, _NOTHING, timeout)   # each setup has the machine to itself
        if msg["ok"]:
            setup[rt] = msg["setup_seconds"]
        else:
            errors[rt] = msg["error"]
        if progress:
            progress("setup", rt, msg)

    def stop(rt):
        p, conn = workers.pop(rt)
        if rt not in errors:
            msg = ask(conn, p, None, 60)
            peak[rt] = (msg.get("peak_rss"), msg.get("peak_rss_runs"))
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
        conn.close()

    # Phases: pysdcpp lives through the run; every other runtime lives through a phase of its own, timed in turn
    # with pysdcpp, so no two peers hold their memory at once (OpenVINO keeps a compiled model per shape, 9-11 GB
    # at 512 px) and each ratio compares times measured side by side.
    others = [rt for rt in runtimes if rt != "pysdcpp"]
    try:
        if "pysdcpp" in runtimes:
            start("pysdcpp")
        for phase in (others or [None]):
            if phase is not None:
                start(phase)
            for rep in range(repeat):
                for task in tasks:
                    for rt in [r for r in ("pysdcpp", phase) if r in workers and r not in errors]:
                        p, conn = workers[rt]
                        time.sleep(SETTLE_SECONDS)
                        msg = ask(conn, p, task, timeout)
                        if not msg["ok"]:
                            errors[rt] = msg["error"]
                            continue
                        times[rt][task].append(msg["seconds"])
                        if rt == "pysdcpp" and phase is not None:
                            ours_times[phase][task].append(msg["seconds"])
                        outputs[rt].setdefault(task, msg["output"])
                        if progress:
                            progress(rep, f"{rt} {task}", msg)
            for rt in [r for r in ("pysdcpp", phase) if profile and r in workers and r not in errors]:
                for task in [t for t in tasks if t != "gen" and t not in profiles.get(rt, {})]:
                    p, conn = workers[rt]
                    msg = ask(conn, p, ("profile", task), timeout)
                    if msg["ok"]:
                        profiles.setdefault(rt, {})[task] = msg["profile"]
                        msg = {"ok": True, "seconds": msg["profile"]["seconds"]}
                    else:   # the timings stand; the profile is reported missing
                        profile_errors.setdefault(rt, {})[task] = msg["error"]
                    if progress:
                        progress("profile", f"{rt} {task}", msg)
            if phase is not None:
                stop(phase)
        if "pysdcpp" in workers:
            stop("pysdcpp")
    finally:   # whatever happened, no worker outlives the benchmark, nor its files
        for p, conn in workers.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
            conn.close()
        scratch.cleanup()
    ref = outputs.get("torch", {})
    summary = {}
    for rt in runtimes:
        overall, runs = peak.get(rt, (None, None))
        e: dict = {"setup_seconds": setup.get(rt), "peak_rss": overall, "peak_rss_runs": runs, "error": errors.get(rt)}
        for task in tasks:
            ts = times.get(rt, {}).get(task, [])
            if ts:
                e[task] = {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "runs": len(ts)}
                ours = ours_times[rt][task] if rt != "pysdcpp" else []
                if ours:   # this runtime over pysdcpp, both measured in this runtime's phase
                    e[task]["pysdcpp_median_same_phase"] = statistics.median(ours)
                    e[task]["vs_pysdcpp"] = e[task]["median"] / statistics.median(ours)
                for name, against in (("torch", ref), ("pysdcpp", outputs.get("pysdcpp", {}))):
                    if task == "gen" and not (rt in _SHARED_NOISE and name in _SHARED_NOISE):
                        continue   # different starting noise: no agreement to measure
                    if task in against and rt != name and task in outputs[rt]:
                        a, b = outputs[rt][task].astype(np.float64), against[task].astype(np.float64)
                        e[task][f"rel_l2_vs_{name}"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        summary[rt] = e
    report = {"kind": "peers", "model": gguf, "family": family, "size": size, "threads": threads, "repeat": repeat,
              "tasks": list(tasks), "runtimes": {rt: RUNTIMES[rt] for rt in runtimes}, "date": utc_now(),
              "machine": machine_info(), "build": build_info(), "summary": summary, "versions": _versions()}
    if gen:
        report["gen"] = {"steps": steps, "guidance": GEN_GUIDANCE, "sampler": "euler", "prompt": GEN_PROMPT,
                         "pysdcpp_guidance": "one batch-2 UNet evaluation per step"}
    if profile:
        report["profile"] = profiles
        if profile_errors:
            report["profile_errors"] = profile_errors
    return report


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "diffusers", "openvino"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def task_names(report: dict) -> dict[str, str]:
    """Each task's name in tables and charts."""
    return {"unet-b1": "UNet, batch 1", "unet-b2": "UNet, batch 2", "vae": "VAE decode",
            "gen": f"generation, {report.get('gen', {}).get('steps', '?')} steps"}


def vs_pysdcpp(runtime: str, entry: dict, task: str, ours: dict) -> float | None:
    """A runtime's time for `task` over pysdcpp's measured in turn with it (a report from before the phases: over
    pysdcpp's median of the run); None for pysdcpp itself or without a time."""
    if runtime == "pysdcpp" or task not in entry:
        return None
    if "vs_pysdcpp" in entry[task]:
        return entry[task]["vs_pysdcpp"]
    return entry[task]["median"] / ours[task]["median"] if task in ours else None


def gen_note(g: dict) -> str:
    """What a peers report's generation column measured."""
    return (f"Generation: \"{g['prompt']}\", negative prompt \"\", {g['steps']} Euler steps at guidance "
            f"{g['guidance']}, text encoding and decode included: pysdcpp's generate() (cond and uncond as "
            f"{g.get('pysdcpp_guidance', 'two batch-1 UNet evaluations per step')}; upstream's path: two batch-1 "
            "ones), diffusers' StableDiffusionPipeline for torch, the same pipeline's steps on OpenVINO's compiled "
            "text encoder, batch-2 UNet and decoder (what optimum-intel runs). The peers start from the same "
            "noise (rel. L2 between them); pysdcpp draws its own.")


def format_peers_table(report: dict) -> str:
    tasks = report["tasks"]
    head = f"{'runtime':<15}" + "".join(f"{t:>22}" for t in tasks) + f"{'RSS runs':>10}{'w/ setup':>10}{'setup':>9}"
    lines = [head, "-" * len(head)]
    ours = report["summary"].get("pysdcpp", {})
    for rt, e in report["summary"].items():
        if e.get("error") and not any(t in e for t in tasks):
            lines.append(f"{rt:<15} FAILED: {e['error']}")
            continue
        row = f"{rt:<15}"
        for t in tasks:
            if t not in e:
                row += f"{'-':>22}"
                continue
            cell = f"{e[t]['median']:.2f}s"
            ratio = vs_pysdcpp(rt, e, t, ours)
            if ratio is not None:
                cell += f" ({ratio:.2f}x)"
            if "rel_l2_vs_torch" in e[t]:
                cell += f" {e[t]['rel_l2_vs_torch']:.0e}"
            row += f"{cell:>22}"
        for key in ("peak_rss_runs", "peak_rss"):
            rss = e.get(key)
            row += f"{rss / 2**20:>8.0f}MB" if rss else f"{'-':>10}"
        row += f"{e['setup_seconds']:>8.1f}s" if e.get("setup_seconds") is not None else f"{'-':>9}"
        lines.append(row)
    lines.append(footer(report, f"median of {report['repeat']} after a warm-up; (x): that runtime's time over "
                                "pysdcpp's measured in turn with it, above 1 means pysdcpp is faster; then rel. L2 "
                                "against torch's output; peak RSS of each worker: over the timed runs (after "
                                "setup), and over all of it, setup included"))
    if "gen" in report:
        lines.append(gen_note(report["gen"]))
    return "\n".join(lines)
