"""The engine service's OpenAPI contract, fuzzed by schemathesis against a real ``rsmoe serve`` (tiny model).

Every operation of ``GET /openapi.json`` gets valid and invalid requests (odd strings, NUL bytes, huge
numbers, wrong types); every answer must be documented there (status code, content type, body schema),
invalid data must be refused with a 4xx, nothing may answer 5xx, and the service's log must hold no
traceback afterwards. Bounded: a few dozen examples per operation (about a minute on a 2-core machine).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.engine_helpers import REPO, RSMOE, S2, cli_env, one_thread, tiny_dir  # noqa: F401 - fixtures

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test tool: bash scripts/setup.sh --test")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.modes import GenerationMode  # noqa: E402

#: Examples per operation and mode (9 operations, valid and invalid data; reproducible: derandomized).
MAX_EXAMPLES = int(os.environ.get("RSMOE_CONTRACT_EXAMPLES", "100"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def engine(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:  # noqa: F811
    """``rsmoe serve`` in its own process on 127.0.0.1; yields its engine.json (url, token) and its log."""
    home = tmp_path_factory.mktemp("contract")
    token_file, log_path = home / "engine.json", home / "engine.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([RSMOE, "serve", "--model", str(tiny_dir), "--device", "cpu", "--token-file",
                                 str(token_file), "--max-body-mb", "4"],
                                stdout=log_file, stderr=subprocess.STDOUT, env=cli_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while not token_file.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)
        info = json.loads(token_file.read_text())
        yield {**info, "log": log_path, "process": proc}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def api_schema(engine: dict[str, Any]) -> Any:
    """The service's own OpenAPI document, fetched with its token."""
    return schemathesis.openapi.from_url(f"{engine['url']}/openapi.json",
                                         headers={"Authorization": f"Bearer {engine['token']}"}, timeout=30)


def _operations(api_schema: Any) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]


def _ground(body: Any, sandbox: Path) -> None:
    """Point a generated body at real files, keeping its odd characters, so the fuzzing gets past "not found":
    a printable ``path`` becomes a real raster; ``out`` / ``gpkg`` land in ``sandbox`` (``/`` made ``_``, so
    nothing is written elsewhere); a job without a region gets a small window (few tiles)."""
    if isinstance(body, dict):
        items = body.get("items")
        for item in items if isinstance(items, list) else []:
            _ground(item, sandbox)
        path = body.get("path")
        if isinstance(path, str) and path.isprintable() and 0 < len(path) <= 1000:
            body["path"] = str(S2)
        for key in ("out", "gpkg"):
            value = body.get(key)
            if isinstance(value, str) and 0 < len(value) <= 1000:
                body[key] = str(sandbox / ("f" + value.replace("/", "_")))
        if "out" in body and "window" not in body and "extent" not in body:
            body["window"] = [0, 0, 64, 64]


def test_every_answer_is_documented_and_no_input_gives_a_server_error(api_schema: Any, engine: dict[str, Any]) -> None:
    """Valid and invalid requests for every operation (schemathesis's strategies driven by Hypothesis here: its
    pytest plugin's lazy loader does not run under this pytest); the first failing case fails the test."""
    headers = {"Authorization": f"Bearer {engine['token']}"}
    sandbox = Path(engine["log"]).parent / "outputs"
    sandbox.mkdir()
    operations = _operations(api_schema)
    assert {op.label for op in operations} >= {"POST /caption", "POST /jobs"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None, derandomize=True)
            def check(case: Any) -> None:
                _ground(case.body, sandbox)
                response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)
                if case.operation.label == "POST /jobs" and response.status_code == 202:  # keep the CPU free
                    httpx.post(f"{engine['url']}/jobs/{response.json()['id']}/cancel", headers=headers, timeout=120)

            try:
                check()
            except Unsatisfiable:  # nothing of this operation can be invalid (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, operation.label


def test_the_service_survived_the_fuzzing_with_a_clean_log(engine: dict[str, Any]) -> None:
    """Runs after the fuzzing (file order): still serving, and nothing it logged is a traceback."""
    with httpx.Client(base_url=engine["url"], headers={"X-RSMoE-Token": engine["token"]}, timeout=60) as c:
        assert c.get("/health").status_code == 200
    logged = Path(engine["log"]).read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in logged and "internal error" not in logged, logged[-5000:]
