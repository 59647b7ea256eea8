"""The service's batch jobs: they queue and run one at a time in a worker thread (:class:`JobManager`).

One worker thread runs the queued jobs in order (:func:`engine.jobs.run_annotation`) over the service's one
pipeline; interactive caption / ask requests interleave with a job between its batches (the pipeline's
lock). A job with Ray options has its tiles captioned by Ray workers instead
(:class:`engine.distributed.RayCaptioner`, each loading the service's model with its backend), the engine's
thread only journalling and writing. A job's :meth:`Job.status` is what ``GET /jobs/{id}`` reports; a cancel stops it after its current
batch, its journal keeping the finished tiles.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.errors import CancelledError, JobError, JobNotFoundError, RSMoEError
from engine.distributed import RayCaptioner, RayOptions, import_ray
from engine.jobs import (AnnotateParams, AnnotateResult, JobProgress, ProgressCallback, annotate_rasters,
                         check_annotation, run_annotation)
from engine.pipeline import Pipeline
from engine.runtime import ModelSpec

log = logging.getLogger(__name__)

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")


@dataclass
class Job:
    """One annotation job of the service, as its status reports it."""

    id: str
    params: AnnotateParams
    total: int
    state: str = "queued"
    done: int = 0
    skipped: int = 0
    resumed: int = 0
    message: str = "queued"
    error: str | None = None
    result: AnnotateResult | None = None
    tile_size: str | None = None
    warnings: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    ray: RayOptions | None = None

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def status(self) -> dict[str, Any]:
        p = self.params
        return {
            "id": self.id, "state": self.state, "done": self.done, "total": self.total, "skipped": self.skipped,
            "resumed": self.resumed, "message": self.message, "error": self.error,
            "cancel_requested": self.cancel_event.is_set(),
            "out": p.out, "gpkg": p.gpkg, "raster": p.raster, "tile_size": self.tile_size,
            "warnings": list(self.warnings),
            "created": self.created, "started": self.started, "finished": self.finished,
            "result": self.result.to_dict() if self.result else None,
            "ray": asdict(self.ray) if self.ray else None,
        }


class JobManager:
    """Create, watch, cancel and collect annotation jobs; one worker thread runs them in order."""

    def __init__(self, pipeline: Pipeline, max_kept: int = 200) -> None:
        self.pipeline = pipeline
        self.max_kept = max_kept
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._counter = itertools.count(1)
        self._worker = threading.Thread(target=self._work, name="rsmoe-jobs", daemon=True)
        self._worker.start()

    def submit(self, params: AnnotateParams, ray: RayOptions | None = None) -> Job:
        """Validate and queue a job (on Ray workers with ``ray``); bad parameters, or Ray asked for but not
        installed, raise at once (nothing is queued)."""
        if ray is not None:
            import_ray()
        plan = check_annotation(params, self.pipeline.info, self.pipeline.model.config)
        out = Path(params.out).resolve()
        with self._lock:
            for other in self._jobs.values():
                if other.active and Path(other.params.out).resolve() == out:
                    raise JobError(f"job {other.id} is already writing '{params.out}'; wait for it or cancel it")
            job = Job(id=f"{next(self._counter)}-{uuid.uuid4().hex[:8]}", params=params, total=len(plan.tiles),
                      tile_size=str(plan.tile_size), warnings=list(plan.warnings), ray=ray)
            self._jobs[job.id] = job
            self._prune()
        self._queue.put(job)
        log.info("job %s queued: %s -> %s (%d tiles)", job.id, params.raster, params.out, job.total)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job with id {job_id!r} (the service keeps jobs of this session only)")
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job:
        """Ask a job to stop after its current batch (a queued job never starts)."""
        job = self.get(job_id)
        with self._lock:
            if job.active:
                job.cancel_event.set()
                job.message = "cancelling after the current batch" if job.state == "running" else "cancelled"
                if job.state == "queued":
                    job.state, job.finished = "cancelled", time.time()
        return job

    def result(self, job_id: str) -> AnnotateResult:
        job = self.get(job_id)
        if job.state == "done" and job.result is not None:
            return job.result
        if job.state == "failed":
            raise JobError(f"job {job_id} failed: {job.error}")
        if job.state == "cancelled":
            raise JobError(f"job {job_id} was cancelled after {job.done} of {job.total} tiles; no output was "
                           f"written (submit it again to resume from its journal)")
        raise JobError(f"job {job_id} is {job.state} ({job.done} of {job.total} tiles); poll GET /jobs/{job_id}")

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until a job leaves the queued / running states (for tests and scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        while job.active:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state}")
            time.sleep(0.05)
        return job

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel every job and stop the worker (after its current batch)."""
        for job in self.list():
            if job.active:
                self.cancel(job.id)
        self._queue.put(None)
        self._worker.join(timeout)

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if not j.active]
        for job in finished[: max(0, len(self._jobs) - self.max_kept)]:
            del self._jobs[job.id]

    def _annotate(self, job: Job, progress: ProgressCallback) -> AnnotateResult:
        if job.ray is None:
            return run_annotation(self.pipeline, job.params, progress, job.cancel_event)
        info = self.pipeline.info
        spec = replace(self.pipeline.spec or ModelSpec(info.model_dir), backend=info.backend)
        with RayCaptioner(spec, job.ray, self.pipeline.batch_size) as captioner:
            (outcome,) = annotate_rasters([job.params], captioner, progress, job.cancel_event, fail_fast=True)
        assert outcome.result is not None
        return outcome.result

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.state != "queued":
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        with self._lock:
            job.state, job.started, job.message = "running", time.time(), "running"

        def progress(p: JobProgress) -> None:
            with self._lock:
                job.done, job.total, job.skipped, job.resumed = p.done, p.total, p.skipped, p.resumed
                job.message = f"{p.done} of {p.total} tiles" + (f" ({p.skipped} skipped)" if p.skipped else "")

        try:
            result = self._annotate(job, progress)
        except CancelledError as exc:
            state, message, error, result = "cancelled", str(exc), None, None
        except RSMoEError as exc:
            state, message, error, result = "failed", str(exc), str(exc), None
        except Exception as exc:  # a bug: keep the service alive, report it
            log.exception("job %s crashed", job.id)
            state, message, error, result = "failed", f"internal error: {type(exc).__name__}: {exc}", str(exc), None
        else:
            state, message, error = "done", f"wrote {result.out}", None
        with self._lock:
            job.state, job.message, job.error, job.result, job.finished = state, message, error, result, time.time()
        log.info("job %s %s: %s", job.id, state, message)
