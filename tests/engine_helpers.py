"""Shared fixtures of the engine tests (pipeline, jobs, server, CLI): models written once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SHARED = REPO.parent / "shared" / "data"
S2 = DATA / "s2_crop512.tif"
RSMOE = str(Path(sys.executable).with_name("rsmoe"))


def lite_ready() -> bool:
    """Whether the real lite model can load (its base weights are provisioned)."""
    try:
        from engine.base_models import resolve_model_ref

        for name in ("efficientnet-lite0", "minilm-l6", "smollm2-135m-instruct"):
            resolve_model_ref(f"base:{name}")
        return True
    except Exception:  # noqa: BLE001 - any failure means the base weights are not there
        return False


def tiny_trained_dir(basetemp: Path) -> Path:
    """A tiny random model with randomised ("trained") adapters, so captions are non-empty text and
    the generative router runs; written once per test session (shared by every module)."""
    root = basetemp / "rsmoe-tiny-engine"
    trained = root / "trained"
    if not (trained / "config.json").exists():
        from engine.model import RSMoEModel
        from tests.tiny_models import randomize_adapters, write_tiny_model_dir

        model = RSMoEModel.from_pretrained(write_tiny_model_dir(root))
        randomize_adapters(model)
        model.save_pretrained(trained)
    return trained


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_trained_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for ``rsmoe`` subprocesses: one thread, the repo importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def sigkill_after_tiles(argv: list[str], journal: Path, tiles: int, timeout: float = 240) -> None:
    """Run ``rsmoe ARGV`` in its own process group, SIGKILL it once ``journal`` holds ``tiles`` finished tiles
    (and whatever it started: a local Ray instance), and check it was killed mid-run."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([RSMOE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=REPO,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_bytes().count(b"\n") >= 1 + tiles:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        try:  # whatever it started and outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL
