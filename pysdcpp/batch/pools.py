"""Where a batch's workers run: local processes (one pipe each) or Ray actors across a cluster. Both give the
driver the same events: a worker ready or failed to set up, a job's result, a job lost with its worker."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from .jobs import RunConfig


@dataclass
class Event:
    kind: str  # "ready", "setup_failed", "result", "lost"
    worker: object  # the pool's handle of the worker
    job_id: str | None = None
    payload: dict = field(default_factory=dict)


def _die_with_parent() -> None:
    """Linux: this process is killed when the driver that spawned it dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _local_main(conn, run: RunConfig, model_hash: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the driver decides
    _die_with_parent()
    from .worker import WorkerCore, WorkerSetupError

    try:
        core = WorkerCore(run, model_hash)
    except WorkerSetupError as e:
        conn.send(("setup_failed", {"error": str(e)}))
        return
    except BaseException as e:  # noqa: BLE001 - reported to the driver, never raised here
        conn.send(("setup_failed", {"error": f"{type(e).__name__}: {e}"}))
        return
    conn.send(("ready", core.info()))
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            job_id, params = msg
            conn.send(("result", core.run(job_id, params)))
    except (EOFError, BrokenPipeError):
        pass
    finally:
        core.close()


class _Pool:
    """What both pools keep: `slots`, worker handle -> {"job": the job it runs or None, "ready": set up}."""

    size: int
    slots: dict

    def start_worker(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        for _ in range(self.size):
            self.start_worker()

    def idle(self) -> list:
        return [w for w, s in self.slots.items() if s["ready"] and s["job"] is None]

    def alive(self) -> int:
        return len(self.slots)


class LocalPool(_Pool):
    """`workers` processes on this machine, each with `run.threads` threads and its own model load."""

    def __init__(self, run: RunConfig, model_hash: str, workers: int):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.run, self.model_hash, self.size = run, model_hash, workers
        self.slots: dict[object, dict] = {}  # Process -> {"conn", "job", "ready"}

    def describe(self) -> str:
        return f"{self.size} local worker(s) x {self.run.threads} thread(s)"

    def start_worker(self) -> None:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_local_main, args=(child, self.run, self.model_hash), daemon=True)
        p.start()
        child.close()
        self.slots[p] = {"conn": parent, "job": None, "ready": False}

    def submit(self, worker, job_id: str, params: dict) -> None:
        s = self.slots[worker]
        s["job"] = job_id
        s["conn"].send((job_id, params))

    def poll(self, timeout: float) -> list[Event]:
        from multiprocessing.connection import wait

        conns = {s["conn"]: w for w, s in self.slots.items()}
        sentinels = {w.sentinel: w for w in self.slots}
        events = []
        for obj in wait(list(conns) + list(sentinels), timeout):
            if obj in conns:
                w = conns[obj]
                try:
                    kind, payload = obj.recv()
                except (EOFError, OSError):
                    continue  # the sentinel reports it
                s = self.slots[w]
                if kind == "ready":
                    s["ready"] = True
                    events.append(Event("ready", w, payload=payload))
                elif kind == "setup_failed":
                    events.append(Event("setup_failed", w, payload=payload))
                    self._drop(w)
                else:
                    events.append(Event("result", w, s["job"], payload))
                    s["job"] = None
        for obj in list(sentinels):
            w = sentinels[obj]
            if w in self.slots and not w.is_alive():
                job = self.slots[w]["job"]
                code = w.exitcode
                self._drop(w)
                events.append(Event("lost", w, job, {"error": f"worker process exited with code {code}"}))
        return events

    def _drop(self, w) -> None:
        s = self.slots.pop(w, None)
        if s is not None:
            s["conn"].close()
        w.join(timeout=5)
        if w.is_alive():
            w.kill()
            w.join()

    def close(self, kill: bool = False) -> None:
        for w, s in list(self.slots.items()):
            if not kill:
                try:
                    s["conn"].send(None)
                except (OSError, ValueError):
                    pass
            else:
                w.kill()
        for w in list(self.slots):
            w.join(timeout=30 if not kill else 5)
            if w.is_alive():
                w.kill()
                w.join()
            s = self.slots.pop(w)
            s["conn"].close()


class _RayWorker:
    """The Ray actor: a WorkerCore made by `ready()`, so a setup error reaches the driver as that call's error."""

    def __init__(self, run: RunConfig, model_hash: str):
        self.run, self.model_hash, self.core = run, model_hash, None

    def ready(self) -> dict:
        from .worker import WorkerCore

        self.core = WorkerCore(self.run, self.model_hash)
        return self.core.info()

    def job(self, job_id: str, params: dict) -> dict:
        return self.core.run(job_id, params)


class RayPool(_Pool):
    """Ray actors (`ray.init(address)`: an existing cluster's address, "auto", or None for a local instance), each
    reserving `run.threads` CPUs; `workers` None: as many as the cluster's CPUs hold."""

    def __init__(self, run: RunConfig, model_hash: str, workers: int | None, address: str | None):
        try:
            import ray
        except ImportError:
            raise RuntimeError("--ray needs Ray: pip install \"pysdcpp[ray]\"") from None
        self.ray = ray
        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"object_store_memory": 256 << 20}
            ray.init(log_to_driver=False, **kwargs)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.size = workers if workers else max(1, cpus // run.threads)
        self.run, self.model_hash = run, model_hash
        self.actor_class = ray.remote(num_cpus=run.threads, max_restarts=0, max_task_retries=0)(_RayWorker)
        self.pending: dict[object, tuple[object, str | None]] = {}  # future -> (actor, job id or None for ready)
        self.slots: dict[object, dict] = {}  # actor -> {"job", "ready"}

    def describe(self) -> str:
        return f"{self.size} Ray actor(s) x {self.run.threads} CPU(s)"

    def start_worker(self) -> None:
        a = self.actor_class.remote(self.run, self.model_hash)
        self.slots[a] = {"job": None, "ready": False}
        self.pending[a.ready.remote()] = (a, None)

    def submit(self, actor, job_id: str, params: dict) -> None:
        self.slots[actor]["job"] = job_id
        self.pending[actor.job.remote(job_id, params)] = (actor, job_id)

    def poll(self, timeout: float) -> list[Event]:
        if not self.pending:
            return []
        done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        events = []
        for fut in done:
            actor, job_id = self.pending.pop(fut)
            try:
                value = self.ray.get(fut)
            except self.ray.exceptions.RayActorError as e:  # the actor's process or machine is gone
                self._drop(actor)
                events.append(Event("lost", actor, job_id, {"error": f"Ray actor died: {_first_line(e)}"}))
                continue
            except Exception as e:  # noqa: BLE001 - the actor's own error: at setup, or one a job let escape
                self._drop(actor)
                cause = getattr(e, "cause", None) or e
                events.append(Event("setup_failed" if job_id is None else "lost", actor, job_id,
                                    {"error": _first_line(cause)}))
                continue
            if job_id is None:
                self.slots[actor]["ready"] = True
                events.append(Event("ready", actor, payload=value))
            else:
                self.slots[actor]["job"] = None
                events.append(Event("result", actor, job_id, value))
        return events

    def _drop(self, actor) -> None:
        self.slots.pop(actor, None)
        try:
            self.ray.kill(actor)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def close(self, kill: bool = False) -> None:
        for a in list(self.slots):
            self._drop(a)
        self.pending.clear()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__

