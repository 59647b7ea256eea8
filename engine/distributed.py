"""Scale-out on Ray: the tile groups of any number of rasters captioned by Ray workers, one model each.

Ray (``pip install 'rsmoe[distributed]'``) is optional: :func:`import_ray` says how to install it.

Who does what
    The driver (``rsmoe annotate --ray``, or a service job with ``ray``) plans every raster, keeps the journals
    and writes the outputs (:func:`engine.jobs.annotate_rasters`); :class:`RayCaptioner` only replaces the
    local captioner: each Ray worker (an actor, :class:`TileWorker`) loads the model once and captions the
    groups it is sent with :func:`engine.jobs.annotate_group`, the very function a one-process run calls, on the
    same fixed groups of ``batch_size`` consecutive tiles, with the same pipeline batch size. So every GeoJSON
    is byte-identical to the one-machine run's. Workers read the tiles themselves: on a cluster every node needs
    the rasters, the model directory and the engine at the same paths (a shared file system).

Nothing lost
    The driver journals each group's records as they arrive (any order); a killed driver is resumed by the same
    command from the journals. A worker process that dies is restarted by Ray (``max_restarts``), loads the
    model again, and its unfinished groups are run again (``max_task_retries``).

Where
    ``local`` starts a Ray instance on this machine for the job (and stops it after); any other address
    (``auto``, ``HOST:6379``, ``ray://HOST:10001``) joins an existing cluster. A process that has already
    connected to Ray (``ray.init``) uses that connection.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from engine.errors import JobError, MissingExtraError, RSMoEError, UserInputError
from engine.inputs import open_input
from engine.jobs import AnnotateParams, RasterRun, Work, annotate_group
from engine.model.config import RSMoEConfig
from engine.outputs import TileRecord
from engine.pipeline import DEFAULT_BATCH_SIZE, ModelInfo, Pipeline
from engine.runtime import ModelSpec
from engine.tiling import Tile

log = logging.getLogger(__name__)

#: The object store of a local instance: only tile lists and records travel through it (workers read pixels).
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
#: Groups queued per worker: one running, one waiting, so a worker never idles while the driver journals.
GROUPS_PER_WORKER = 2
#: How long to try reaching a cluster's address before ``ray.init`` (which waits minutes for a wrong one).
CONNECT_TIMEOUT_S = 5.0
#: A dead worker process is restarted this often, and its groups retried as often, before the job fails.
MAX_RESTARTS = 3


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError("Ray is not installed: pip install 'rsmoe[distributed]' (or run without --ray)") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a job runs on Ray.

    Parameters
    ----------
    address
        ``local`` (a Ray instance on this machine for this job) or a cluster address (``auto``, ``HOST:6379``,
        ``ray://HOST:10001``).
    workers
        Ray workers, each holding one model (default: as many as the cluster's CPUs, or GPUs, allow).
    cpus_per_worker
        CPUs each worker reserves (its intra-op threads).
    gpus_per_worker
        GPUs each worker reserves (fractions share a GPU); the model runs on it (``--device auto``).
    start_timeout_s
        How long to wait for every worker to load its model.
    """

    address: str = "local"
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    start_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not self.address.strip():
            raise UserInputError("the Ray address is empty; use local or a cluster address such as HOST:6379")
        if self.workers is not None and int(self.workers) < 1:
            raise UserInputError(f"Ray workers must be at least 1, got {self.workers}")
        if not (self.cpus_per_worker > 0 and math.isfinite(self.cpus_per_worker)):
            raise UserInputError(f"CPUs per Ray worker must be positive, got {self.cpus_per_worker}")
        if not (self.gpus_per_worker >= 0 and math.isfinite(self.gpus_per_worker)):
            raise UserInputError(f"GPUs per Ray worker must be 0 or more, got {self.gpus_per_worker}")

    @property
    def threads(self) -> int:
        """Intra-op threads of a worker's model: its reserved CPUs (at least one)."""
        return max(1, int(self.cpus_per_worker))


class TileWorker:
    """A Ray actor (wrapped by ``ray.remote`` in :class:`RayCaptioner`): one model, captioning tile groups.

    Errors a person can fix (an unreadable tile, a model directory missing on this node) come back as values, so
    the driver reports them with their one-line message."""

    def __init__(self, spec: ModelSpec, batch_size: int, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.error: RSMoEError | None = None
        self.pipeline: Pipeline | None = None
        self._open: tuple[tuple[Any, ...], Any, Any, str] | None = None  # (key, context, source, identity)
        try:
            self.pipeline = Pipeline.load(spec.model_dir, spec.backend, spec.device, spec.dtype, threads=threads,
                                          batch_size=batch_size)
        except RSMoEError as exc:
            self.error = exc

    def describe(self) -> tuple[ModelInfo, RSMoEConfig, int] | RSMoEError:
        """The model's facts and config, and this worker's process id; or why the model did not load."""
        if self.pipeline is None:
            assert self.error is not None
            return self.error
        return self.pipeline.info, self.pipeline.model.config, os.getpid()

    def caption(self, params: AnnotateParams, group: list[Tile]) -> list[TileRecord] | RSMoEError:
        """One group's records (as :func:`engine.jobs.annotate_group`), or the error a person can fix."""
        assert self.pipeline is not None
        try:
            source, identity = self._source(params)
            return annotate_group(self.pipeline, source, identity, group, params.style)
        except RSMoEError as exc:
            return exc

    def _source(self, params: AnnotateParams) -> tuple[Any, str]:
        """The raster open for ``params`` (kept open while groups of the same raster follow)."""
        inp = params.image_input()
        key = (inp.path, inp.bands, params.min_valid_fraction)
        if self._open is not None and self._open[0] == key:
            return self._open[2], self._open[3]
        self._close()
        context = open_input(inp, params.min_valid_fraction)
        source, identity = context.__enter__()
        self._open = (key, context, source, identity)
        return source, identity

    def _close(self) -> None:
        if self._open is not None:
            context, self._open = self._open[1], None
            context.__exit__(None, None, None)


def _connect(ray: Any, address: str) -> bool:
    """Connect to Ray (see the module docstring); True when this call started the connection."""
    if ray.is_initialized():
        if address not in ("local", "auto"):
            raise JobError(f"this process is already connected to Ray, not to {address!r}; use --ray local")
        log.info("using this process's Ray connection")
        return False
    common: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address == "local":
            ray.init(address="local", num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     runtime_env={"env_vars": {"PYTHONPATH": _code_path()}}, **common)
            log.info("started a local Ray instance (%s CPUs)", os.cpu_count())
        else:
            _check_reachable(address)
            ray.init(address=address, **common)
            log.info("joined the Ray cluster at %s", address)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobError(f"cannot connect to Ray at {address!r}: {first}") from None
    return True


class RayCaptioner:
    """Captions tile groups on Ray workers (an :class:`engine.jobs.TileCaptioner`); use as a context manager.

    Parameters
    ----------
    spec
        The model every worker loads (same directory path on every node).
    options
        Where and how many workers (:class:`RayOptions`).
    batch_size
        The workers' pipeline batch size: the one-process run's (default :data:`DEFAULT_BATCH_SIZE`), so the
        model sees the same batches.
    """

    def __init__(self, spec: ModelSpec, options: RayOptions, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.ray = import_ray()
        self.options = options
        self.batch_size = int(batch_size)
        self.owns_ray = _connect(self.ray, options.address)
        self.workers: list[Any] = []
        try:
            self._start(spec)
        except BaseException:
            self.close()
            raise

    def _worker_count(self) -> int:
        """The workers asked for, or as many as fit; a local instance refuses more than it has room for (a
        cluster may grow, so it is given the benefit of the doubt)."""
        opts = self.options
        local = opts.address == "local"
        resources = self.ray.available_resources() if local else self.ray.cluster_resources()
        if opts.gpus_per_worker > 0:
            fit = int(resources.get("GPU", 0) // opts.gpus_per_worker)
        else:
            fit = int(resources.get("CPU", 0) // opts.cpus_per_worker)
        count = int(opts.workers) if opts.workers is not None else max(1, fit)
        if local and count > fit:
            what = (f"{resources.get('GPU', 0):g} GPUs" if opts.gpus_per_worker > 0
                    else f"{resources.get('CPU', 0):g} CPUs")
            raise UserInputError(f"the local Ray instance has {what} free: room for {fit} worker(s) of "
                                 f"{opts.gpus_per_worker if opts.gpus_per_worker > 0 else opts.cpus_per_worker:g} "
                                 f"{'GPU' if opts.gpus_per_worker > 0 else 'CPU'} each, not {count}")
        return count

    def _start(self, spec: ModelSpec) -> None:
        ray, opts = self.ray, self.options
        count = self._worker_count()
        actor = ray.remote(TileWorker).options(num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker,
                                               max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
        log.info("starting %d Ray worker(s) (%g CPU, %g GPU each), each loading the model", count,
                 opts.cpus_per_worker, opts.gpus_per_worker)
        self.workers = [actor.remote(spec, self.batch_size, opts.threads) for _ in range(count)]
        try:
            described = ray.get([w.describe.remote() for w in self.workers], timeout=opts.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise JobError(f"the Ray workers did not all start within {opts.start_timeout_s:g} s (does the "
                           f"cluster have room for {count} worker(s)?)") from None
        except ray.exceptions.RayError as exc:
            raise JobError(f"a Ray worker failed to start: {_first_line(exc)}") from None
        for item in described:
            if isinstance(item, RSMoEError):
                raise item
        infos = [item[0] for item in described]
        self.info: ModelInfo = infos[0]
        self.config: RSMoEConfig | None = described[0][1]
        self.pids: list[int] = [item[2] for item in described]
        facts = {(i.model_id, i.variant, i.trained, i.backend, i.dtype, i.fingerprint) for i in infos}
        if len(facts) > 1:
            raise JobError("the Ray workers loaded different models or backends "
                           f"({'; '.join(sorted(map(str, facts)))}): give every node the same model directory, "
                           "its ONNX export and --backend")
        log.info("%d Ray worker(s) ready: %s via %s on %s", count, self.info.model_id, self.info.backend,
                 self.info.device)

    def caption_groups(self, work: Work) -> Iterator[tuple[RasterRun, list[TileRecord] | RSMoEError]]:
        """Keep every worker :data:`GROUPS_PER_WORKER` groups busy; yield each group's result as it arrives."""
        ray = self.ray
        pending: dict[Any, tuple[int, RasterRun, AnnotateParams]] = {}
        load = [0] * len(self.workers)
        source = iter(work)
        exhausted = False
        try:
            while True:
                while not exhausted and min(load) < GROUPS_PER_WORKER:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        break
                    run, group = item
                    index = load.index(min(load))
                    pending[self.workers[index].caption.remote(run.params, group)] = (index, run, run.params)
                    load[index] += 1
                if not pending:
                    return
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                index, run, params = pending.pop(ref)
                load[index] -= 1
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # a bug on the worker, not the input: say what
                    result = JobError(f"a Ray worker failed on {params.raster}: {_first_line(exc)}")
                except ray.exceptions.RayError as exc:  # the worker died more often than it may restart
                    raise JobError(f"a Ray worker died and could not be restarted ({_first_line(exc)}); the "
                                   "journals keep the finished tiles: run the same command again to resume") from None
                yield run, result
        finally:
            for ref in pending:  # abandoned (cancel, or a raster failed): drop what has not started
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - already finished or gone
                    pass

    def close(self) -> None:
        """Stop the workers, and the Ray instance if this captioner started it."""
        for worker in self.workers:
            try:
                self.ray.kill(worker)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers = []
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()

    def __enter__(self) -> RayCaptioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse at once a ``HOST:PORT`` / ``ray://HOST:PORT`` nothing listens on (``ray.init`` would wait minutes)."""
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep:
        if address == "auto":
            return
        raise UserInputError(f"Ray address {address!r} is not local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot reach the Ray cluster at {address!r}: {getattr(exc, 'strerror', None) or exc}") from None


def _code_path() -> str:
    """PYTHONPATH for local workers: this engine's folder first, so they run the driver's code."""
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def _first_line(exc: BaseException) -> str:
    """The last meaningful line of a Ray error (its cause's message), never a traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "~"))]
    return (causes[-1] if causes else type(exc).__name__)[:300]
