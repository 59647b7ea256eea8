"""The ``rsmoe`` command line: caption / ask / annotate / serve, errors, and kill-and-resume of a real process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.cli import main
from engine.journal import journal_path
from tests.engine_helpers import (DATA, REPO, RSMOE, S2, cli_env, lite_ready, one_thread,  # noqa: F401
                                  sigkill_after_tiles, tiny_dir)


def _run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([RSMOE, *argv], capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=timeout)


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------------- caption / ask
def test_caption_and_ask_go_through_the_pipeline(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    code, out, _ = _main(capsys, "caption", "--model", str(tiny_dir), "--json", str(S2), str(DATA / "s2_plain.png"),
                         str(DATA / "s2_uint16_b02b03b04.tif"))
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["input"]).name for r in rows] == ["s2_crop512.tif", "s2_plain.png", "s2_uint16_b02b03b04.tif"]
    assert rows[0]["window"] == [0, 0, 512, 512] and isinstance(rows[0]["text"], str) and rows[0]["segments"]
    code, out, _ = _main(capsys, "caption", "--model", str(tiny_dir), "--json", "--window", "0,0,256,128",
                         "--bands", "3,2,1", str(S2))
    assert code == 0 and json.loads(out)["window"] == [0, 0, 256, 128] and json.loads(out)["source"]["bands"] == [3, 2, 1]
    code, out, _ = _main(capsys, "ask", "--model", str(tiny_dir), "--json", "--extent=439230,4175000,441000,4176960",
                         str(S2), "How many fields are there?")
    answer = json.loads(out)
    assert code == 0 and answer["task"] == "ask" and answer["window"] == [0, 0, 177, 196]
    code, out, _ = _main(capsys, "caption", "--model", str(tiny_dir), "--extent=-75.69,37.70,-75.66,37.72",
                         "--extent-crs", "EPSG:4326", str(S2))
    assert code == 0 and out.count("\n") == 1


def test_ground_resolution_option_and_json_fields(tiny_dir: Path, tmp_path: Path,  # noqa: F811
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _main(capsys, "caption", "--model", str(tiny_dir), "--json", "--ground-resolution", "0.5",
                         str(DATA / "s2_plain.png"), str(S2))
    plain, s2 = (json.loads(line) for line in out.splitlines())
    assert code == 0 and plain["ground_resolution_m"] == 0.5 and plain["model_resolution_m"] == 4.0  # 256 px -> 32
    assert s2["ground_resolution_m"] == 0.5 and s2["model_resolution_m"] == 8.0  # given: it wins over the raster's
    assert plain["uncertain"] is False and plain["uncertainty"] == []
    code, out, _ = _main(capsys, "ask", "--model", str(tiny_dir), "--json", str(DATA / "s2_plain.png"), "Is it?")
    answer = json.loads(out)
    assert code == 0 and answer["ground_resolution_m"] is None and answer["model_resolution_m"] is None
    code, _, err = _main(capsys, "caption", "--model", str(tiny_dir), "--ground-resolution", "-2", str(S2))
    assert code == 2 and "ground resolution" in err
    geojson = tmp_path / "default.geojson"  # no --tile-size: the tiny model names no footprint, so 512 px
    code, out, _ = _main(capsys, "annotate", str(S2), "--out", str(geojson), "--model", str(tiny_dir))
    fc = json.loads(geojson.read_text())
    assert code == 0 and fc["rsmoe"]["tiling"]["tile_size"] == "512px" and len(fc["features"]) == 1
    p = fc["features"][0]["properties"]
    assert p["model_resolution_m"] == float(f"{p['ground_resolution_m'] * 512 / 32:.3g}") and p["uncertain"] is False


def test_bad_input_one_line_error_exit_code_and_no_model_load(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("bad input must be refused before the model loads")

    monkeypatch.setattr(engine.pipeline.Pipeline, "load", classmethod(no_model))
    out = tmp_path / "keep.geojson"
    out.write_text("PREVIOUS")
    cases = [
        (("caption", str(DATA / "missing.tif")), "not found"),
        (("caption", str(DATA / "not_a_raster.tif")), "cannot open"),
        (("caption", str(DATA / "truncated_header.tif")), "cannot open"),
        (("caption", "--extent", "439300,4172000,439300,4173000", str(S2)), "zero"),
        (("caption", "--extent=-10,40,-9,41", "--extent-crs", "EPSG:4326", str(S2)), "does not overlap"),
        (("caption", "--window", "1,2,3", str(S2)), "--window"),
        (("caption", "--window", "0,0,600,10", str(S2)), "outside"),
        (("caption", "--bands", "7", str(S2)), "band"),
        (("ask", str(S2), "x" * 10_000), "10000 characters"),
        (("ask", str(S2), " "), "empty"),
        (("annotate", str(DATA / "missing.tif"), "--out", str(out)), "not found"),
        (("annotate", str(DATA / "not_a_raster.tif"), "--out", str(out)), "cannot open"),
        (("annotate", str(S2), "--out", str(out), "--tile-size", "12 furlongs"), "tile size"),
        (("annotate", str(S2), "--out", str(out), "--tile-size", "64", "--overlap", "64"), "overlap"),
        (("annotate", str(S2), "--out", str(out), "--extent", "0,0,1,1"), "does not overlap"),
        (("annotate", str(S2), "--out", str(tmp_path)), "folder"),
        (("annotate", str(S2), "--out", str(out), "--tile-size", "500m", "--extent-crs", "EPSG:4326"), "extent"),
    ]
    for argv, needle in cases:
        code, _, err = _main(capsys, *argv)
        assert code == 2, (argv, code, err)
        assert err.startswith("rsmoe: error:") and err.count("\n") == 1 and needle in err, (argv, err)
        assert "Traceback" not in err
    assert out.read_text() == "PREVIOUS"


def test_failed_annotate_keeps_the_previous_output(tiny_dir: Path, tmp_path: Path,  # noqa: F811
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keep.geojson"
    out.write_text("PREVIOUS")
    code, _, err = _main(capsys, "annotate", str(DATA / "truncated_data.tif"), "--out", str(out), "--tile-size", "128",
                         "--model", str(tiny_dir))
    assert code == 2 and "truncated_data.tif" in err and err.count("\n") == 1 and "Traceback" not in err
    assert out.read_text() == "PREVIOUS"


# ------------------------------------------------------------------------------------------- annotate, kill, resume
def _annotate_argv(tiny_dir: Path, out: Path) -> list[str]:  # noqa: F811
    return ["annotate", str(S2), "--out", str(out), "--tile-size", "64", "--batch-size", "2",
            "--model", str(tiny_dir)]


def test_sigkill_then_same_command_is_byte_identical(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    reference = tmp_path / "reference.geojson"
    done = _run(*_annotate_argv(tiny_dir, reference))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {reference}: 64 tiles (64 captioned, 0 skipped)")
    assert "annotating" in done.stderr and "64/64" in done.stderr  # the tqdm progress bar
    assert not journal_path(reference).exists()

    out = tmp_path / "killed.geojson"
    journal = journal_path(out)
    sigkill_after_tiles(_annotate_argv(tiny_dir, out), journal, 5)
    assert not out.exists(), "a killed run leaves no output"
    journalled = journal.read_bytes().count(b"\n") - 1
    assert 5 <= journalled < 64

    again = _run(*_annotate_argv(tiny_dir, out))
    assert again.returncode == 0, again.stderr
    assert "resumed from the journal" in again.stdout
    assert out.read_bytes() == reference.read_bytes()
    assert not journal.exists()


def test_annotate_gpkg_nodata_and_restart(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    out, gpkg = tmp_path / "collar.geojson", tmp_path / "collar.gpkg"
    code, stdout, _ = _main(capsys, "annotate", str(DATA / "rgb_byte_nodata.tif"), "--out", str(out), "--gpkg",
                            str(gpkg), "--tile-size", "256", "--style", "detailed", "--keep-journal",
                            "--model", str(tiny_dir))
    assert code == 0 and f"wrote {out} and {gpkg}" in stdout and gpkg.exists() and journal_path(out).exists()
    features = json.loads(out.read_text())["features"]
    assert any(f["properties"]["caption"] is None and f["properties"]["skipped"] for f in features)
    assert all(len(f["properties"]["segments"]) == 3 for f in features if f["properties"]["caption"] is not None)
    code, _, err = _main(capsys, "annotate", str(DATA / "rgb_byte_nodata.tif"), "--out", str(out), "--tile-size",
                         "128", "--model", str(tiny_dir))
    assert code == 6 and "--restart" in err  # the kept journal belongs to another tiling
    code, stdout, _ = _main(capsys, "annotate", str(DATA / "rgb_byte_nodata.tif"), "--out", str(out),
                            "--tile-size", "400", "--restart", "--model", str(tiny_dir))
    assert code == 0 and "4 tiles" in stdout


# ------------------------------------------------------------------------------------------- serve
def test_serve_binds_loopback_writes_the_token_file_and_cleans_up(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    token_file = tmp_path / "home" / "engine.json"
    proc = subprocess.Popen([RSMOE, "serve", "--model", str(tiny_dir), "--token-file", str(token_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not token_file.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)
        info = json.loads(token_file.read_text())
        assert info["url"].startswith("http://127.0.0.1:") and info["pid"] == proc.pid
        assert (token_file.stat().st_mode & 0o777) == 0o600
        port = int(info["url"].rsplit(":", 1)[1])
        try:
            import psutil

            listening = [c.laddr for c in psutil.Process(proc.pid).net_connections(kind="inet")
                         if c.status == psutil.CONN_LISTEN]
            assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
        except ImportError:  # pragma: no cover - psutil is optional
            pass
        with httpx.Client(base_url=info["url"], timeout=60) as c:
            assert c.get("/health").status_code == 401
            h = c.get("/health", headers={"Authorization": f"Bearer {info['token']}"})
            assert h.status_code == 200 and h.json()["model_id"] == "rsmoe-tiny"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert f"serving on {info['url']}" in stdout and info["token"] not in stdout + stderr
    assert proc.returncode == 0 and not token_file.exists()


def test_serve_stops_when_the_program_that_started_it_is_killed(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """As the QGIS plugin does: a parent starts the engine with a stdin pipe, then dies without a word (kill -9).
    The OS closes the pipe and the engine shuts down cleanly (its token file goes)."""
    token_file = tmp_path / "engine.json"
    parent_code = ("import subprocess, sys, time\n"
                   "subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE)\n"
                   "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code, RSMOE, "serve", "--model", str(tiny_dir),
                               "--token-file", str(token_file), "--stop-on-stdin-eof"],
                              env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not token_file.exists():
            assert parent.poll() is None and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)
        engine_pid = json.loads(token_file.read_text())["pid"]
        assert engine_pid != parent.pid
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 60
        while token_file.exists():
            assert time.monotonic() < deadline, "the engine kept running after its parent was killed"
            time.sleep(0.1)
        stderr = parent.stderr.read().decode() if parent.stderr else ""
        assert "standard input closed" in stderr
    finally:
        if parent.poll() is None:
            parent.kill()
        if token_file.exists():
            os.kill(json.loads(token_file.read_text())["pid"], signal.SIGKILL)


# ------------------------------------------------------------------------------------------- README's main job
@pytest.mark.slow
def test_readme_main_job_with_the_real_lite_model(tmp_path: Path) -> None:
    if not lite_ready():
        pytest.skip("base weights not provisioned (rsmoe base-models)")
    out = tmp_path / "out" / "sentinel2_virginia.geojson"
    done = _run("annotate", "examples/sentinel2_virginia_512.tif", "--out", str(out), "--tile-size", "256",
                timeout=900)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(f"wrote {out}: 4 tiles (4 captioned, 0 skipped)")
    assert "4/4" in done.stderr
    fc = json.loads(out.read_text())
    assert fc["rsmoe"]["model_id"] == "rsmoe-lite" and len(fc["features"]) == 4
    assert all(len(f["properties"]["caption"].split()) >= 2 for f in fc["features"])
