"""One batch worker, wherever it runs (a local process or a Ray actor): it checks that its model file has the
run's hash, loads the model once, and turns jobs into PNG bytes for the driver to write."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ..bench.machine import peak_rss
from .jobs import RunConfig, file_sha256
from .outputs import job_png


class WorkerSetupError(RuntimeError):
    """This worker cannot take jobs (another model file, a load error): it is dropped, not the run."""


class WorkerCore:
    def __init__(self, run: RunConfig, model_hash: str):
        self.machine = socket.gethostname()
        self.name = f"{self.machine}:{os.getpid()}"
        if not Path(run.model).is_file():
            raise WorkerSetupError(f"{self.name}: model {run.model} not found on this machine")
        own = file_sha256(run.model)
        if own != model_hash:
            raise WorkerSetupError(f"{self.name}: {run.model} has SHA-256 {own[:16]}..., the run's model "
                                   f"{model_hash[:16]}...: not the same model")
        from .. import StableDiffusion, __version__
        from ..errors import PySDCppError

        try:
            self.sd = StableDiffusion(run.model, **run.constructor_kwargs())
        except (PySDCppError, ValueError, OSError) as e:
            raise WorkerSetupError(f"{self.name}: {e}") from None
        self.run_config = run
        self.version = __version__

    def info(self) -> dict:
        return {"worker": self.name, "machine": self.machine, "threads": self.sd.threads, "peak_rss": peak_rss() or None}

    def run(self, job_id: str, params: dict) -> dict:
        """Generate one job: {"id", "png" (bytes), "seconds", worker info, MAC info} or {"id", "error"}."""
        from ..api import png_parameters
        from ..errors import PySDCppError
        from ..inheritance import parse_inheritance

        params = dict(params)
        spec = params.pop("inheritance", None)
        t0 = time.perf_counter()
        try:
            policy = parse_inheritance(spec) if spec else None
            result = self.sd.generate_with_info(inheritance=policy, **params)
            text = png_parameters(result.params, Path(self.run_config.model).stem, self.sd.backend, self.version,
                                  policy.spec() if policy is not None else None)
            png = job_png(result.images[0], text, job_id)
        except (PySDCppError, ValueError, TypeError, MemoryError) as e:
            return {"id": job_id, "error": f"{type(e).__name__}: {e}", **self.info()}
        out = {"id": job_id, "png": png, "seconds": round(time.perf_counter() - t0, 3), "parameters": text,
               **self.info()}
        if result.alter_steps:
            out["alter_experts"] = [s.expert for s in result.alter_steps]
            out["fraction_of_dense_macs"] = (sum(s.macs for s in result.alter_steps)
                                             / sum(s.dense_macs for s in result.alter_steps))
        if result.inherited:
            out["fraction_of_dense_macs"] = (sum(e.macs for e in result.inherited)
                                             / sum(e.dense_macs for e in result.inherited))
        if result.step_cache_skipped is not None:
            out["step_cache_skipped_steps"] = result.step_cache_skipped
        return out

    def close(self) -> None:
        self.sd.close()
