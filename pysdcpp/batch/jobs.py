"""The jobs of a batch: a prompt file read into per-job generation parameters, each checked without loading the
model, and each job's stable id (the model file's hash, the run's settings and the job's full parameters)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..api import GenerationParams, checked_generation
from ..modelfile import ModelFile

# Names a JSONL line may use besides GenerationParams' own (diffusers') names: sd-cli's and our CLI's.
ALIASES = {"steps": "num_inference_steps", "cfg": "guidance_scale", "cfg_scale": "guidance_scale",
           "negative": "negative_prompt", "sampling_method": "sampler"}
PER_JOB = tuple(f.name for f in dataclasses.fields(GenerationParams) if f.name != "batch_size") + ("inheritance",)


@dataclass(frozen=True)
class RunConfig:
    """What the model constructor takes: one per run, the same in every worker. `threads` is per worker."""

    model: str
    backend: str = "accelerated"
    conv: str = "default"
    attention: str = "default"
    linear: str = "default"
    prediction: str = "auto"
    alter: bool | None = None
    alter_masks: str | None = None
    alter_semantics: str = "default"
    threads: int = 1

    def constructor_kwargs(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "model"}

    def image_settings(self) -> dict:
        """The settings that can change an image (threads and the model's path do not; the model's hash does)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("model", "threads", "alter_masks")}
        if self.alter_masks is not None:
            out["alter_masks_sha256"] = hashlib.sha256(Path(self.alter_masks).read_bytes()).hexdigest()
        return out


# Constructor options a JSONL line may repeat (with the run's value) but never change.
PER_RUN = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name != "model") + ("no_alter",)


@dataclass
class Job:
    line: int  # 0-based line of the prompt file
    params: dict = field(default_factory=dict)  # generate keyword arguments (inheritance as its spec string)
    id: str = ""
    error: str | None = None  # set when the line's parameters are invalid: the job fails without running

    def record(self) -> dict:
        return {"line": self.line, **self.params}


def file_sha256(path: str | os.PathLike, progress=None) -> str:
    """SHA-256 of a file, read in 16 MB pieces; `progress(done_bytes, total_bytes)`."""
    h = hashlib.sha256()
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return h.hexdigest()


def read_prompt_file(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line, fields) per job. A .jsonl file: one JSON object a line; any other file: one prompt a line. Blank lines
    (and, in a text file, lines starting with #) are no jobs but still count as lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path} is not UTF-8 text: {e}") from None
    out = []
    jsonl = path.suffix.lower() == ".jsonl"
    for i, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        if not jsonl:
            out.append((i, {"prompt": line}))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((i, {"__error__": f"line {i + 1} is not JSON: {e.msg}"}))
            continue
        out.append((i, obj if isinstance(obj, dict) else {"__error__": f"line {i + 1} is not a JSON object"}))
    if not out:
        raise ValueError(f"prompt file {path} has no prompts")
    return out


# GenerationParams fields added after batch's first release: left out of a job's parameters (and so of its id) while
# unset, so the ids of earlier runs still hold.
_LATER_FIELDS = ("vae_tiling", "loras", "eta", "sigmas", "hires_fix", "image_guidance_scale")


def make_jobs(entries: list[tuple[int, dict]], defaults: dict, run: RunConfig, model_file: ModelFile,
              model_hash: str) -> list[Job]:
    """Checked jobs from the prompt file's entries: each line's fields over `defaults` (the command line's), the
    seed `defaults['seed'] + line` where the line gives none. A job whose parameters are invalid carries its error."""
    from ..inheritance import parse_inheritance

    run_settings = run.image_settings()
    jobs = []
    for line, fields in entries:
        job = Job(line)
        try:
            if "__error__" in fields:
                raise ValueError(fields["__error__"])
            params = _job_params(fields, defaults, run, line)
            policy = parse_inheritance(params["inheritance"]) if params.get("inheritance") else None
            kwargs = {k: v for k, v in params.items() if k not in ("prompt", "negative_prompt", "inheritance")}
            unsupported = sorted(set(kwargs) & {"image", "mask_image", "strength", "control_image", "ref_images",
                                                "controlnet_conditioning_scale"})
            if unsupported:
                raise ValueError(f"{', '.join(unsupported)}: batch runs text-to-image only")
            p = checked_generation(model_file, run.backend, params["prompt"], params.get("negative_prompt", ""),
                                   inheritance=policy, **kwargs).params
            job.params = {k: v for k, v in dataclasses.asdict(p).items()
                          if k != "batch_size" and not (k in _LATER_FIELDS and v is None)}
            if policy is not None:
                job.params["inheritance"] = policy.spec()
        except (ValueError, TypeError, KeyError) as e:
            job.params = {k: v for k, v in fields.items() if k != "__error__"}
            job.error = f"line {line + 1}: {e}"
        job.id = job_id(model_hash, run_settings, job.params if job.error is None else {"line": line, **job.params})
        jobs.append(job)
    return jobs


def _job_params(fields: dict, defaults: dict, run: RunConfig, line: int) -> dict:
    named = {}
    for key, value in fields.items():
        name = ALIASES.get(key, key)
        if name in named:
            raise ValueError(f"{key!r} is given twice")
        named[name] = value
    for key in list(named):
        if key in PER_RUN:
            value = named.pop(key)
            run_value = (run.alter is False) if key == "no_alter" else getattr(run, key)
            if value != run_value:
                raise ValueError(f"{key}={value!r} is a model option, set once per run (this run: {run_value!r}); "
                                 "run a separate batch for it")
        elif key == "batch_size":
            if named.pop(key) != 1:
                raise ValueError("a job makes one image; give each image its own line (and seed)")
        elif key not in PER_JOB:
            raise ValueError(f"unknown parameter {key!r}; a line takes {', '.join(PER_JOB)}")
    if not isinstance(named.get("prompt"), str):
        raise ValueError("every line needs a \"prompt\" string")
    params = {k: v for k, v in defaults.items() if v is not None and k != "seed"}
    params.update(named)
    if "seed" not in named:
        params["seed"] = int(defaults.get("seed", 42)) + line
    return params


def job_id(model_hash: str, run_settings: dict, params: dict) -> str:
    blob = json.dumps({"model": model_hash, "run": run_settings, "job": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
