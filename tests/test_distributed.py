"""Scale-out on a real local Ray instance (2 CPUs, tiny model): many rasters in one job, byte-identical to the
one-machine run; a SIGKILLed driver resumed by the same command; a killed worker's group run again; the
service's ``ray`` jobs; the one-line error without Ray."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from engine.batch import INDEX_NAME, annotate_batch, expand_rasters, output_paths
from engine.cli import main
from engine.errors import MissingExtraError, RastersFailedError
from engine.job_manager import JobManager
from engine.jobs import AnnotateParams, JobProgress
from engine.journal import journal_path
from engine.pipeline import Pipeline
from engine.runtime import ModelSpec
from tests.engine_helpers import (DATA, REPO, RSMOE, S2, cli_env, one_thread,  # noqa: F401 - fixtures
                                  sigkill_after_tiles, tiny_dir)

ray = pytest.importorskip("ray", reason="Ray is the distributed extra: bash scripts/setup.sh --test installs it")
from engine.distributed import RayCaptioner, RayOptions  # noqa: E402

NODATA = DATA / "rgb_byte_nodata.tif"
BROKEN = DATA / "not_a_raster.tif"
#: small tiles in small fixed groups: many groups, so a kill lands mid-job
TILING = {"tile_size": 128, "batch_size": 3}


# ------------------------------------------------------------------------------------------- inputs, errors
# (first in the file: before the module's Ray instance starts, so a --ray command connects on its own)
def test_folders_and_list_files_name_the_rasters(tmp_path: Path) -> None:
    listing = tmp_path / "rasters.txt"
    listing.write_text(f"# two rasters\n{S2}\n\nsub/s2_crop512.tif\n")
    rasters = expand_rasters([listing, DATA / "s2_gray.tif"])
    assert rasters == [S2, tmp_path / "sub" / "s2_crop512.tif", DATA / "s2_gray.tif"]
    assert [p.name for p in output_paths(rasters, tmp_path)] == ["s2_crop512.geojson", "s2_crop512-2.geojson",
                                                                  "s2_gray.geojson"]
    in_folder = expand_rasters([DATA])
    assert S2 in in_folder and BROKEN in in_folder and all(p.suffix in (".tif", ".png", ".jpg") for p in in_folder)


def test_cli_errors_are_one_line(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [
        (["annotate", str(S2), str(NODATA), "--out", str(tmp_path / "x.geojson")], 2, "--out-dir"),
        (["annotate", str(DATA), "--out", str(tmp_path / "x.geojson")], 2, "--out-dir"),
        (["annotate", str(S2), "--out-dir", str(tmp_path / "d"), "--gpkg", str(tmp_path / "x.gpkg")], 2, "--gpkg"),
        (["annotate", str(tmp_path / "none.txt"), "--out-dir", str(tmp_path / "d")], 2, "not found"),
        (["annotate", str(BROKEN), str(DATA / "missing.tif"), "--out-dir", str(tmp_path / "d")], 7, "none of the 2"),
        (["annotate", str(S2), "--out", str(tmp_path / "x.geojson"), "--ray", "127.0.0.1:1"], 6, "cannot reach"),
        (["annotate", str(S2), "--out", str(tmp_path / "x.geojson"), "--ray", "--ray-workers", "0"], 2, "at least 1"),
    ]
    for argv, code, needle in cases:
        got = main(["-q", *argv, "--model", str(tiny_dir)])
        err = capsys.readouterr().err
        assert got == code and err.startswith("rsmoe: error:") and err.count("\n") == 1 and needle in err, (argv, err)
    index = json.loads((tmp_path / "d" / INDEX_NAME).read_text())
    assert [e["state"] for e in index["rasters"]] == ["error", "error"] and "not found" in index["rasters"][1]["error"]

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the distributed extra were not installed
    got = main(["-q", "annotate", str(S2), "--out", str(tmp_path / "x.geojson"), "--ray", "--model", str(tiny_dir)])
    err = capsys.readouterr().err
    assert got == 2 and err.count("\n") == 1 and "pip install 'rsmoe[distributed]'" in err
    manager = JobManager(Pipeline.load(tiny_dir, device="cpu"))
    try:
        with pytest.raises(MissingExtraError, match="rsmoe\\[distributed\\]"):
            manager.submit(AnnotateParams(raster=str(S2), out=str(tmp_path / "y.geojson")), RayOptions())
    finally:
        manager.shutdown()
    assert not (tmp_path / "x.geojson").exists() and not (tmp_path / "y.geojson").exists()


# ------------------------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One real local Ray instance for the module (2 CPUs, a small object store); the workers import this
    checkout's engine."""
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def captioner(ray_local: None, tiny_dir: Path) -> Iterator[RayCaptioner]:  # noqa: F811
    # half a CPU each: the service job of this module finds a free CPU for its own worker
    with RayCaptioner(ModelSpec(str(tiny_dir), device="cpu"), RayOptions("local", workers=2, cpus_per_worker=0.5)) as cap:
        yield cap


@pytest.fixture(scope="module")
def references(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:  # noqa: F811
    """Each raster annotated alone by the one-process command (``rsmoe annotate RASTER --out``)."""
    folder = tmp_path_factory.mktemp("one-machine")
    found = {}
    for raster in (S2, NODATA):
        out = folder / f"{raster.stem}.geojson"
        assert main(["-q", "annotate", str(raster), "--out", str(out), "--tile-size", str(TILING["tile_size"]),
                     "--batch-size", str(TILING["batch_size"]), "--model", str(tiny_dir), "--device", "cpu"]) == 0
        found[raster.stem] = out.read_bytes()
    return found


def _jobs(rasters: list[Path], out_dir: Path) -> list[AnnotateParams]:
    return [AnnotateParams(raster=str(r), out=str(o), **TILING) for r, o in zip(rasters, output_paths(rasters, out_dir))]


def test_many_rasters_on_ray_workers_are_byte_identical_and_a_bad_one_is_reported(
        captioner: RayCaptioner, references: dict[str, bytes], tmp_path: Path) -> None:
    rasters = [S2, BROKEN, NODATA]
    seen: list[JobProgress] = []
    with pytest.raises(RastersFailedError, match="1 of 3 rasters failed") as failed:
        annotate_batch(_jobs(rasters, tmp_path), captioner, tmp_path / INDEX_NAME, seen.append)
    assert "\n" not in str(failed.value) and "not_a_raster.tif" in str(failed.value)
    assert (tmp_path / "s2_crop512.geojson").read_bytes() == references["s2_crop512"]
    assert (tmp_path / "rgb_byte_nodata.geojson").read_bytes() == references["rgb_byte_nodata"]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["finished"] and index["ok"] == 2 and index["failed"] == 1
    by_name = {Path(e["raster"]).name: e for e in index["rasters"]}
    assert by_name["not_a_raster.tif"]["state"] == "error" and "cannot open" in by_name["not_a_raster.tif"]["error"]
    assert by_name["s2_crop512.tif"]["state"] == "ok" and by_name["s2_crop512.tif"]["tiles"] == 16
    assert by_name["rgb_byte_nodata.tif"]["skipped"] > 0
    assert seen[-1].done == seen[-1].total == 16 + by_name["rgb_byte_nodata.tif"]["tiles"]  # one bar, whole job
    assert not list(tmp_path.glob("*.journal")) and not (tmp_path / "not_a_raster.geojson").exists()


def test_a_killed_worker_has_its_group_run_again(captioner: RayCaptioner, references: dict[str, bytes],
                                                 tmp_path: Path) -> None:
    victim = captioner.pids[0]
    killed: list[int] = []

    def kill_once(p: JobProgress) -> None:
        if not killed and p.done >= 6:
            os.kill(victim, signal.SIGKILL)
            killed.append(p.done)

    outcomes = annotate_batch(_jobs([S2, NODATA], tmp_path), captioner, tmp_path / INDEX_NAME, kill_once)
    assert killed and killed[0] < outcomes[0].result.total + outcomes[1].result.total, "killed mid-job"
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    assert (tmp_path / "s2_crop512.geojson").read_bytes() == references["s2_crop512"]
    assert (tmp_path / "rgb_byte_nodata.geojson").read_bytes() == references["rgb_byte_nodata"]


def test_service_job_on_ray_matches_the_engine_job(ray_local: None, tiny_dir: Path,  # noqa: F811
                                                   references: dict[str, bytes], tmp_path: Path) -> None:
    from engine.api_models import JobRequest

    request = JobRequest(path=str(S2), out=str(tmp_path / "ray.geojson"), ray={"address": "local", "workers": 1},
                         **TILING)
    manager = JobManager(Pipeline.load(tiny_dir, device="cpu"))
    try:
        job = manager.wait(manager.submit(request.params(), request.ray_options()).id, timeout=240)
    finally:
        manager.shutdown()
    assert job.state == "done", job.message
    assert job.status()["ray"]["address"] == "local" and job.status()["ray"]["workers"] == 1
    assert (tmp_path / "ray.geojson").read_bytes() == references["s2_crop512"]


def _cli(out_dir: Path, tiny_dir: Path) -> list[str]:  # noqa: F811
    return ["-q", "annotate", str(S2), str(NODATA), "--out-dir", str(out_dir), "--tile-size", "128",
            "--batch-size", "3", "--model", str(tiny_dir), "--device", "cpu", "--ray", "local", "--ray-workers", "2"]


def test_sigkilled_driver_then_the_same_command_is_byte_identical(tiny_dir: Path, references: dict[str, bytes],  # noqa: F811
                                                                  tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    journals = [journal_path(out_dir / "s2_crop512.geojson"), journal_path(out_dir / "rgb_byte_nodata.geojson")]
    sigkill_after_tiles(_cli(out_dir, tiny_dir), journals[0], 6, timeout=180)
    assert not (out_dir / "rgb_byte_nodata.geojson").exists(), "killed before the last raster was written"
    journalled = sum(j.read_bytes().count(b"\n") - 1 for j in journals if j.exists())
    assert 6 <= journalled < 16 + 42

    again = subprocess.run([RSMOE, *_cli(out_dir, tiny_dir)], capture_output=True, text=True, env=cli_env(), cwd=REPO,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed from the journals" in again.stdout and str(out_dir / INDEX_NAME) in again.stdout
    assert (out_dir / "s2_crop512.geojson").read_bytes() == references["s2_crop512"]
    assert (out_dir / "rgb_byte_nodata.geojson").read_bytes() == references["rgb_byte_nodata"]
    assert not any(j.exists() for j in journals)
