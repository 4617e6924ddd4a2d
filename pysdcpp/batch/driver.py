"""The batch driver: reads the prompt file, skips what the output folder already holds, hands the rest to a pool
of workers, writes every PNG and manifest line itself, retries a job whose worker died once, and summarises."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import RunConfig, file_sha256, make_jobs, read_prompt_file
from .outputs import OutputFolder
from .pools import LocalPool, RayPool

MAX_ATTEMPTS = 2  # a job whose worker died this many times fails (it may be what kills them)


class BatchError(RuntimeError):
    """The run cannot go on (no worker could set up); what is done stays done."""


@dataclass
class BatchSummary:
    jobs: int = 0
    already_done: int = 0
    recovered: int = 0
    generated: int = 0
    failed: list = field(default_factory=list)  # {"id", "line", "error"}
    repeated_lines: int = 0
    seconds: float = 0.0
    latencies: list = field(default_factory=list)
    workers: list = field(default_factory=list)  # per worker: name, machine, threads, peak RSS (its latest)
    pool: str = ""
    interrupted: bool = False

    def as_dict(self) -> dict:
        lat = sorted(self.latencies)
        d = {k: v for k, v in self.__dict__.items() if k != "latencies"}
        d["images_per_second"] = self.generated / self.seconds if self.seconds > 0 else 0.0
        d["latency_median"] = statistics.median(lat) if lat else None
        d["latency_p95"] = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else None
        return d

    def text(self) -> str:
        d = self.as_dict()
        lines = [f"{self.jobs} jobs: {self.already_done} done before, {self.recovered} recovered, "
                 f"{self.generated} generated, {len(self.failed)} failed"
                 + (" (interrupted: rerun the same command to finish)" if self.interrupted else "")]
        if self.generated:
            lines.append(f"{self.pool}: {d['images_per_second'] * 60:.2f} images/min over {self.seconds:.1f} s; "
                         f"per image median {d['latency_median']:.2f} s, p95 {d['latency_p95']:.2f} s")
        for f in self.failed[:10]:
            lines.append(f"  failed {f['id']} (line {f['line'] + 1}): {f['error']}")
        if len(self.failed) > 10:
            lines.append(f"  ... and {len(self.failed) - 10} more (see the manifest)")
        return "\n".join(lines)


def run_batch(model: str, prompts: str, outdir: str, *, defaults: dict | None = None, run: dict | None = None,
              workers: int | None = None, threads_per_worker: int | None = None, ray_address: str | None = None,
              use_ray: bool = False, progress=None, log=None) -> BatchSummary:
    """Generate every job of `prompts` into `outdir` (see `pysdcpp batch --help`). `defaults`: generation
    parameters for what a line leaves out; `run`: RunConfig fields (backend, conv, ...). `progress(done, failed,
    total)` after each job; `log(text)` for notes. Ctrl-C stops the run: what is done is recorded."""
    from ..modelfile import read_model_file

    log = log or (lambda _text: None)
    model = str(Path(model).resolve())
    header = read_model_file(model)  # a missing or foreign file fails here, before anything else
    entries = read_prompt_file(prompts)
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if threads_per_worker is not None and threads_per_worker < 1:
        raise ValueError(f"--threads-per-worker must be at least 1, got {threads_per_worker}")
    run = dict(run or {})
    threads, workers = choose_workers(workers, threads_per_worker, use_ray, run.get("backend", "accelerated"))
    cfg = RunConfig(model=model, threads=threads, **run)
    out = OutputFolder(outdir)
    stale = out.prepare()
    if stale:
        log(f"removed {stale} temporary file(s) a stopped run left in {outdir}")
    model_hash = file_sha256(model)
    jobs = make_jobs(entries, defaults or {}, cfg, header, model_hash)

    summary = BatchSummary()
    seen: dict[str, object] = {}
    for j in jobs:
        if j.id in seen:
            summary.repeated_lines += 1
        else:
            seen[j.id] = j
    jobs = list(seen.values())
    summary.jobs = len(jobs)
    records = out.records()
    done = out.done(records)
    failed_before = {(r["id"], r.get("error")) for r in records if r.get("status") == "failed"}
    todo = []
    for j in jobs:
        if j.id in done:
            summary.already_done += 1
        elif j.error is not None:
            if (j.id, j.error) not in failed_before:
                out.append({"id": j.id, "status": "failed", "line": j.line, "parameters": j.params,
                            "error": j.error, "finished": _now()})
            summary.failed.append({"id": j.id, "line": j.line, "error": j.error})
        elif out.unrecorded_png(j.id):
            out.append({"id": j.id, "status": "ok", "file": f"{j.id}.png", "line": j.line, "parameters": j.params,
                        "recovered": True, "finished": _now()})
            summary.recovered += 1
        else:
            todo.append(j)
    if progress:
        progress(summary.already_done + summary.recovered, len(summary.failed), summary.jobs)
    if not todo:
        return summary

    pool = RayPool(cfg, model_hash, workers, ray_address) if use_ray else LocalPool(cfg, model_hash, workers)
    summary.pool = pool.describe()
    log(f"{len(todo)} job(s) to run on {summary.pool}")
    t0 = time.perf_counter()
    try:
        _drive(pool, todo, out, summary, progress, log)
    except KeyboardInterrupt:
        summary.interrupted = True
        pool.close(kill=True)
    else:
        pool.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def choose_workers(workers: int | None, threads: int | None, use_ray: bool, backend: str) -> tuple[int, int | None]:
    """(threads per worker, workers): one worker with every physical core unless told otherwise (docs: the
    measured choice); given workers only, the cores are split between them. With Ray, workers None means as many
    as the cluster holds."""
    from .. import _native

    cores = max(1, int(_native.load(backend).lib.sd_get_num_physical_cores()))
    if threads is None:
        threads = max(1, cores // (workers or 1)) if not use_ray else cores
    if workers is None and not use_ray:
        workers = max(1, cores // threads)
    return threads, workers


def _drive(pool, todo: list, out: OutputFolder, summary: BatchSummary, progress, log) -> None:
    queue = list(reversed(todo))  # pop() from the end: prompt-file order
    by_id = {j.id: j for j in todo}
    attempts: dict[str, int] = {}
    setup_errors: list[str] = []
    replacements = 2 * max(1, pool.size)  # workers that may be started after a loss
    inflight = 0
    pool.start()

    def finished() -> None:
        if progress:
            progress(summary.already_done + summary.recovered + summary.generated, len(summary.failed), summary.jobs)

    while queue or inflight:
        for w in pool.idle():
            if not queue:
                break
            j = queue.pop()
            attempts[j.id] = attempts.get(j.id, 0) + 1
            pool.submit(w, j.id, j.params)
            inflight += 1
        if pool.alive() == 0:
            raise BatchError("no worker could take jobs: " + "; ".join(dict.fromkeys(setup_errors)))
        for ev in pool.poll(1.0):
            if ev.kind == "ready":
                summary.workers.append(ev.payload)
                log(f"worker {ev.payload['worker']} ready ({ev.payload['threads']} threads)")
            elif ev.kind == "setup_failed":
                setup_errors.append(ev.payload["error"])
                log(f"a worker could not start: {ev.payload['error']}")
            elif ev.kind == "lost":
                log(f"lost a worker: {ev.payload['error']}")
                if ev.job_id is not None:
                    inflight -= 1
                    j = by_id[ev.job_id]
                    if attempts[j.id] < MAX_ATTEMPTS:
                        queue.append(j)
                    else:
                        _fail(out, summary, j, f"{ev.payload['error']} (on each of {attempts[j.id]} attempts)",
                              attempts[j.id])
                        finished()
                if replacements > 0 and (queue or inflight):
                    replacements -= 1
                    pool.start_worker()
            elif ev.kind == "result":
                inflight -= 1
                _record(out, summary, by_id[ev.job_id], ev.payload, attempts[ev.job_id])
                for info in summary.workers:
                    if info["worker"] == ev.payload.get("worker"):
                        info["peak_rss"] = ev.payload.get("peak_rss")
                finished()


def _record(out: OutputFolder, summary: BatchSummary, job, r: dict, attempts: int) -> None:
    if "error" in r:
        _fail(out, summary, job, r["error"], attempts, r)
        return
    try:
        name = out.write_png(job.id, r["png"])
    except OSError as e:  # a full disk fails this job, not the run
        _fail(out, summary, job, f"could not write its PNG: {e}", attempts, r)
        return
    rec = {"id": job.id, "status": "ok", "file": name, "line": job.line, "parameters": job.params,
           "seconds": r["seconds"], "worker": r["worker"], "machine": r["machine"], "attempts": attempts,
           "finished": _now()}
    for key in ("alter_experts", "fraction_of_dense_macs", "step_cache_skipped_steps"):
        if key in r:
            rec[key] = r[key]
    try:
        out.append(rec)
    except OSError as e:  # the PNG is complete and carries its id: the next run records it
        summary.failed.append({"id": job.id, "line": job.line, "error": f"could not append to the manifest: {e}"})
        return
    summary.generated += 1
    summary.latencies.append(r["seconds"])


def _fail(out: OutputFolder, summary: BatchSummary, job, error: str, attempts: int, r: dict | None = None) -> None:
    rec = {"id": job.id, "status": "failed", "line": job.line, "parameters": job.params, "error": error,
           "attempts": attempts, "finished": _now()}
    if r:
        rec.update({k: r[k] for k in ("worker", "machine") if k in r})
    try:
        out.append(rec)
    except OSError:
        pass
    summary.failed.append({"id": job.id, "line": job.line, "error": error})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
