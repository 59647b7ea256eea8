"""engine.server over real HTTP (uvicorn in a thread, tiny random model): token, limits, errors, jobs."""
from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from engine.pipeline import Pipeline
from engine.server import EngineService, ServeOptions
from tests.engine_helpers import DATA, S2, lite_ready, one_thread, tiny_dir  # noqa: F401 - fixtures

MAX_BODY = 2 * 2**20


@pytest.fixture(scope="module")
def service(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineService]:  # noqa: F811
    token_file = tmp_path_factory.mktemp("home") / "engine.json"
    pipeline = Pipeline.load(tiny_dir, device="cpu", batch_size=4)
    svc = EngineService(pipeline, ServeOptions(token_file=token_file, max_body_bytes=MAX_BODY)).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(service: EngineService) -> Iterator[httpx.Client]:
    info = json.loads(service.token_file.read_text())
    with httpx.Client(base_url=info["url"], headers={"Authorization": f"Bearer {info['token']}"}, timeout=120) as c:
        yield c


def _error(response: httpx.Response, status: int | tuple[int, ...], *needles: str) -> str:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert "Traceback" not in body["error"] and "\n" not in body["error"]
    for needle in needles:
        assert needle in body["error"], (needle, body["error"])
    return body["error"]


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# ------------------------------------------------------------------------------------------- start-up, auth
def test_token_file_and_loopback_bind(service: EngineService) -> None:
    info = json.loads(service.token_file.read_text())
    assert set(info) >= {"url", "token", "pid"} and info["token"] == service.token and len(info["token"]) >= 32
    assert stat.S_IMODE(service.token_file.stat().st_mode) == 0o600
    host, port = service.socket.getsockname()[:2]
    assert host == "127.0.0.1" and info["url"] == f"http://127.0.0.1:{port}" and port > 0


def test_requests_without_the_right_token_are_refused(service: EngineService, client: httpx.Client) -> None:
    url = client.base_url
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        for method, path in (("GET", "/health"), ("GET", "/openapi.json"), ("POST", "/caption"), ("GET", "/jobs")):
            _error(anonymous.request(method, path), 401, "token")
        _error(anonymous.get("/health", headers={"Authorization": "Bearer wrong"}), 403, "wrong token")
        _error(anonymous.get("/health", headers={"X-RSMoE-Token": "wrong"}), 403)
        _error(anonymous.get("/health", headers={"Authorization": f"Basic {service.token}"}), 401)
        assert anonymous.get("/health", headers={"X-RSMoE-Token": service.token}).status_code == 200
    assert client.get("/openapi.json").json()["info"]["title"] == "RS-MoE engine"


def test_health_reports_model_backend_and_device(client: httpx.Client) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model_id"] == "rsmoe-tiny" and h["variant"] == "tiny"
    assert h["trained"] is True and h["backend"] == "torch" and h["device"] == "cpu"
    assert h["providers"] == ["cpu"] and h["gpu"] is False and h["version"]
    assert {"entries", "bytes", "hits"} <= set(h["cache"]) and "jobs" in h
    assert h["image_size"] == 32  # the tiny model's input; an old-style model: no trained resolution range
    assert h["resolution"] == {"conditioned": False, "min_m": None, "max_m": None, "tile_m": None}


# ------------------------------------------------------------------------------------------- caption / ask
def test_caption_path_and_follow_up_question_reuses_features(client: httpx.Client) -> None:
    r = client.post("/caption", json={"path": str(S2), "window": [0, 0, 256, 256], "style": "detailed"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["text"], str) and body["window"] == [0, 0, 256, 256] and body["cached"] is False
    assert [s["expert"] for s in body["segments"]] == ["theme", "objects", "relations"]
    assert 9.99 < body["ground_resolution_m"] < 10.02  # native, of the window
    assert body["model_resolution_m"] == float(f"{body['ground_resolution_m'] * 256 / 32:.3g}")  # read to 32 px
    assert body["uncertain"] is False and body["uncertainty"] == []
    a = client.post("/ask", json={"path": str(S2), "window": [0, 0, 256, 256], "question": "how many fields?"})
    assert a.status_code == 200 and a.json()["cached"] is True and a.json()["task"] == "ask"
    assert a.json()["model_resolution_m"] == body["model_resolution_m"] and a.json()["uncertain"] is False


def test_caption_image_bytes_and_extent(client: httpx.Client) -> None:
    for name in ("s2_plain.png", "s2_plain.jpg", "s2_crop512.tif"):
        r = client.post("/caption", json={"image_base64": _b64(DATA / name)})
        assert r.status_code == 200, r.text
        assert r.json()["source"]["path"] is None
    r = client.post("/caption", json={"path": str(S2), "extent": [-75.69, 37.70, -75.66, 37.72],
                                      "extent_crs": "EPSG:4326", "bands": "3,2,1"})
    assert r.status_code == 200, r.text
    assert r.json()["source"]["bands"] == [3, 2, 1]
    plain = client.post("/caption", json={"image_base64": _b64(DATA / "s2_plain.png")}).json()
    assert plain["ground_resolution_m"] is None and plain["model_resolution_m"] is None  # not georeferenced
    told = client.post("/ask", json={"image_base64": _b64(DATA / "s2_plain.png"), "question": "what is this?",
                                     "ground_resolution_m": 0.5}).json()  # a map rendering: 256 px of 0.5 m
    assert told["ground_resolution_m"] == 0.5 and told["model_resolution_m"] == 4.0 and told["cached"] is True


def test_bad_requests_get_4xx_json_and_the_service_keeps_serving(client: httpx.Client) -> None:
    cases = [
        (client.post("/caption", json={"path": str(DATA / "missing.tif")}), 404, "not found"),
        (client.post("/caption", json={"path": str(DATA / "not_a_raster.tif")}), 422, "cannot open"),
        (client.post("/caption", json={"path": str(DATA / "truncated_header.tif")}), 422, "truncated"),
        (client.post("/caption", json={"path": str(DATA / "truncated_data.tif")}), 422, "damaged"),
        (client.post("/caption", json={"image_base64": "not base64!!"}), 400, "base64"),
        (client.post("/caption", json={"image_base64": base64.b64encode(b"hello").decode()}), 422, "image bytes"),
        (client.post("/caption", json={}), 400, "path"),
        (client.post("/caption", json={"path": str(S2), "image_base64": _b64(DATA / "s2_plain.png")}), 400, "one"),
        (client.post("/caption", json={"path": str(S2), "extent": [439300, 4172000, 439300, 4173000]}), 400, "zero"),
        (client.post("/caption", json={"path": str(S2), "extent": [0, 0, 1, 1]}), 400, "does not overlap"),
        (client.post("/caption", json={"path": str(S2), "window": [500, 500, 100, 100]}), 422, "outside"),
        (client.post("/caption", json={"path": str(S2), "window": [0, 0, 10]}), 422, "window"),
        (client.post("/caption", json={"path": str(S2), "style": "poetic"}), 422, "style"),
        (client.post("/caption", json={"path": str(S2), "colour": "red"}), 422, "unknown field 'colour'"),
        (client.post("/caption", json={"path": str(S2), "bands": "9,9,9"}), 422, "band"),
        (client.post("/caption", content=b"{not json", headers={"content-type": "application/json"}), 422, "JSON"),
        (client.post("/caption", json=[1, 2, 3]), 422, "invalid request"),
        (client.post("/ask", json={"path": str(S2), "question": "x" * 10_000}), 422, "at most 1000 characters"),
        (client.post("/ask", json={"path": str(S2), "question": "   "}), 400, "question is empty"),
        (client.post("/ask", json={"path": str(S2)}), 422, "question"),
        (client.post("/caption", json={"path": str(S2), "ground_resolution_m": 0}), 422, "ground_resolution_m"),
        (client.post("/caption", json={"path": str(S2), "ground_resolution_m": "fine"}), 422, "ground_resolution_m"),
        (client.get("/nowhere"), 404, "no such endpoint"),
        (client.get("/caption"), 405, ""),
    ]
    for response, status, needle in cases:
        _error(response, status, needle)
    assert client.get("/health").status_code == 200
    assert client.post("/caption", json={"path": str(S2)}).status_code == 200


def test_odd_input_gets_an_actionable_4xx_never_a_500(client: httpx.Client, tmp_path: Path) -> None:
    """NUL bytes, lone surrogates, huge or non-finite numbers, wrong types and path tricks: each a 4xx naming the
    field (the NUL byte in a job's paths answered 500 'embedded null byte' before)."""
    job = {"path": str(S2), "out": str(tmp_path / "x.geojson")}
    raw = {"content-type": "application/json"}
    cases = [
        (client.post("/jobs", json={**job, "out": "a\x00b.geojson"}), 422, "out: must not contain NUL"),
        (client.post("/jobs", json={**job, "path": str(S2) + "\x00"}), 422, "path: must not contain NUL"),
        (client.post("/jobs", json={**job, "gpkg": "\x00"}), 422, "gpkg: must not contain NUL"),
        (client.post("/caption", json={"path": "\x00"}), 422, "path: must not contain NUL"),
        (client.post("/caption", content=b'{"path": "a\\ud800b"}', headers=raw), 422, "lone surrogate"),
        (client.post("/ask", content=b'{"path": "x", "question": "\\udfff?"}', headers=raw), 422, "question"),
        (client.post("/caption", content=b'{"\\ud800": 1}', headers=raw), 422, "Unicode"),
        (client.post("/caption", json={"path": str(S2), "extent_crs": "EPSG:4326\x00", "extent": [0, 0, 1, 1]}),
         422, "extent_crs"),
        (client.post("/caption", json={"path": str(S2), "window": [0, 0, 2**70, 1]}), 422, "window[2]"),
        (client.post("/caption", json={"path": str(S2), "window": [-1, 0, 10, 10]}), 422, "window[0]"),
        (client.post("/caption", json={"path": str(S2), "window": [0, 0, 0, 10]}), 422, "is empty"),
        (client.post("/caption", content=b'{"path": "x", "extent": [0, 0, NaN, 1]}', headers=raw), 422, "extent[2]"),
        (client.post("/caption", content=b'{"path": "x", "ground_resolution_m": Infinity}', headers=raw), 422,
         "ground_resolution_m"),
        (client.post("/caption", json={"path": str(S2), "bands": [1, 2, 3, 4]}), 422, "bands"),
        (client.post("/caption", json={"path": 42}), 422, "path"),
        (client.post("/caption", json={"path": ""}), 422, "path"),
        (client.post("/caption", json={"path": str(DATA)}), (404, 422), ""),  # a folder
        (client.post("/caption", json={"path": "../../../../etc/passwd"}), (404, 422), ""),
        (client.post("/caption", json={"path": str(S2), "bands": "\u00b2"}), 422, "band"),  # a digit int() refuses
        (client.post("/jobs", json={**job, "out": str(tmp_path / ("n" * 300))}), 400, "not a usable file name"),
        (client.post("/jobs", json={**job, "tile_size": 0}), 422, "tile_size"),
        (client.post("/jobs", json={**job, "overlap": 10**30}), 422, "overlap"),
        (client.post("/jobs", json={**job, "tile_size": 256, "overlap": 256}), 400, "overlap"),
        (client.post("/jobs", json={**job, "out": str(DATA)}), (400, 409, 422), ""),  # a folder as output
        (client.post("/caption", content=b"[" * 100_000 + b"]" * 100_000, headers=raw), 400, "nested too deeply"),
        (client.post("/caption", content=b'{"path": "x"}', headers={"content-type": "text/plain"}), 422,
         "send JSON with 'Content-Type: application/json'"),
        (client.get("/jobs/%00"), 404, "no job"),
        (client.get("/jobs/x/result", params={"content": "maybe"}), 422, "content"),
    ]
    for response, status, needle in cases:
        _error(response, status, needle)
    assert client.get("/health").status_code == 200


def test_openapi_documents_errors_limits_and_the_token(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "the token of the engine's engine.json (new at every start)"}
    assert doc["components"]["securitySchemes"]["token"]["name"] == "X-RSMoE-Token"
    assert doc["security"] == [{"bearer": []}, {"token": []}]
    error = {"$ref": "#/components/schemas/ErrorBody"}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            codes = {c for c in op["responses"] if c[0] in "45"}
            assert {"400", "401", "403", "500"} <= codes, (method, path, codes)
            for code in codes:
                assert op["responses"][code]["content"]["application/json"]["schema"] == error, (method, path, code)
    assert {"404", "413", "422"} <= set(doc["paths"]["/caption/batch"]["post"]["responses"])
    assert {"404", "409", "413", "422"} <= set(doc["paths"]["/jobs"]["post"]["responses"])
    schemas = doc["components"]["schemas"]
    path = schemas["JobRequest"]["properties"]["out"]
    assert path["minLength"] == 1 and path["maxLength"] == 4096
    question = schemas["AskRequest"]["properties"]["question"]
    assert question["maxLength"] == 1000 and question["minLength"] == 1
    items = schemas["CaptionBatchRequest"]["properties"]["items"]
    assert items["minItems"] == 1 and items["maxItems"] == 64
    assert schemas["CaptionRequest"]["properties"]["style"]["enum"] == ["concise", "detailed"]


# ------------------------------------------------------------------------------------------- caption batch
def test_caption_batch_answers_in_order_through_batched_model_calls(service: EngineService,
                                                                    client: httpx.Client) -> None:
    items = [{"image_base64": _b64(DATA / "s2_plain.png"), "ground_resolution_m": 0.5},
             {"path": str(S2), "window": [0, 0, 256, 256]},
             {"path": str(S2), "window": [256, 0, 256, 256]},
             {"path": str(S2), "window": [0, 256, 256, 256]},
             {"path": str(S2), "window": [256, 256, 256, 256], "bands": "3,2,1"}]
    service.pipeline.cache.clear()
    before = service.pipeline.stats.language_calls
    r = client.post("/caption/batch", json={"items": items, "style": "detailed"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    calls = service.pipeline.stats.language_calls - before
    assert calls == 2  # 5 images in batches of 4: two model calls, not five
    assert [x["window"] for x in results] == [[0, 0, 256, 256], *(i["window"] for i in items[1:])]
    assert results[0]["source"]["path"] is None and results[0]["model_resolution_m"] == 4.0
    assert results[4]["source"]["bands"] == [3, 2, 1] and r.json()["seconds"] > 0
    for item, result in zip(items, results):  # the same as one request per item
        one = client.post("/caption", json={**item, "style": "detailed"}).json()
        assert result["text"] == one["text"] and one["cached"] is True
        assert [s["expert"] for s in result["segments"]] == ["theme", "objects", "relations"]


def test_caption_batch_rejects_a_bad_item_naming_it(client: httpx.Client) -> None:
    good = {"path": str(S2), "window": [0, 0, 64, 64]}
    cases = [
        ({"items": [good, {"path": str(DATA / "missing.tif")}]}, 404, "items[1]: "),
        ({"items": [good, good, {"path": str(S2), "window": [500, 500, 100, 100]}]}, 422, "items[2]: window"),
        ({"items": [{"image_base64": "not base64!!"}, good]}, 400, "items[0]: image_base64 is not valid base64"),
        ({"items": [good, {}]}, 400, "items[1]: give either a raster path or image bytes"),
        ({"items": [good, {"path": str(S2), "window": [0, 0, 10]}]}, 422, "items[1].window"),
        ({"items": [good, {"path": str(S2), "style": "detailed"}]}, 422, "unknown field 'items[1].style'"),
        ({"items": []}, 422, "items"),
        ({"items": [good] * 65}, 422, "at most 64"),
        ({"items": [good], "style": "poetic"}, 422, "style"),
        ({}, 422, "items"),
    ]
    for body, status, needle in cases:
        _error(client.post("/caption/batch", json=body), status, needle)
    big = {"items": [{"image_base64": "A" * (MAX_BODY // 2)}] * 3}
    _error(client.post("/caption/batch", json=big), 413, "too large")  # the body limit bounds a batch's bytes
    assert client.post("/caption/batch", json={"items": [good]}).status_code == 200


def test_request_size_limits(client: httpx.Client) -> None:
    big = b'{"image_base64": "' + b"A" * (MAX_BODY + 10) + b'"}'
    _error(client.post("/caption", content=big, headers={"content-type": "application/json"}), 413, "too large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
        yield b'{"image_base64": "'
        for _ in range(5):
            yield b"A" * (MAX_BODY // 4)
        yield b'"}'

    _error(client.post("/caption", content=chunks(), headers={"content-type": "application/json"}), 413, "too large")
    assert client.get("/health").status_code == 200


# ------------------------------------------------------------------------------------------- jobs
def _wait(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/jobs/{job_id}").json()
        if status["state"] not in ("queued", "running") or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_job_round_trip(client: httpx.Client, tmp_path: Path) -> None:
    out = tmp_path / "job.geojson"
    r = client.post("/jobs", json={"path": str(DATA / "rgb_byte_nodata.tif"), "out": str(out), "tile_size": 256,
                                   "gpkg": str(tmp_path / "job.gpkg")})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["total"] == 9 and job["id"]  # 791 x 718: the 23 px strip joins
    status = _wait(client, job["id"])
    assert status["state"] == "done" and status["done"] == 9 and status["skipped"] > 0, status
    assert status["message"].startswith("wrote")
    result = client.get(f"/jobs/{job['id']}/result").json()
    assert result["out"] == str(out) and result["gpkg"] == str(tmp_path / "job.gpkg")
    assert len(result["geojson"]["features"]) == 9 and result["skipped"] == status["skipped"]
    for feature in result["geojson"]["features"]:
        p = feature["properties"]
        assert {"ground_resolution_m", "model_resolution_m", "uncertain", "uncertainty"} <= set(p)
        if p["caption"] is not None:  # 256 px (279 at the right edge) of 300 m read to 32 px
            seen = p["ground_resolution_m"] * max(p["window"][2:]) / 32
            assert p["model_resolution_m"] == float(f"{seen:.3g}") and p["uncertain"] is False
    assert status["tile_size"] == "256px" and status["warnings"] == []
    assert "geojson" not in client.get(f"/jobs/{job['id']}/result", params={"content": "false"}).json()
    assert any(j["id"] == job["id"] for j in client.get("/jobs").json()["jobs"])


def test_job_errors_and_cancel(client: httpx.Client, tmp_path: Path) -> None:
    _error(client.post("/jobs", json={"path": str(DATA / "missing.tif"), "out": str(tmp_path / "x.geojson")}), 404)
    _error(client.post("/jobs", json={"path": str(S2), "out": str(tmp_path / "x.geojson"), "tile_size": "big"}),
           400, "tile size")
    _error(client.post("/jobs", json={"path": str(S2)}), 422, "out")
    _error(client.get("/jobs/nope"), 404, "no job")
    _error(client.post("/jobs/nope/cancel"), 404)
    out = tmp_path / "cancel.geojson"
    out.write_text("PREVIOUS")
    job = client.post("/jobs", json={"path": str(S2), "out": str(out), "tile_size": 32, "batch_size": 1}).json()
    while client.get(f"/jobs/{job['id']}").json()["done"] < 2:
        time.sleep(0.05)
    cancelled = client.post(f"/jobs/{job['id']}/cancel").json()
    assert cancelled["cancel_requested"] is True
    status = _wait(client, job["id"])
    assert status["state"] == "cancelled" and 0 < status["done"] < status["total"] == 256
    assert out.read_text() == "PREVIOUS" and Path(str(out) + ".journal").exists()
    _error(client.get(f"/jobs/{job['id']}/result"), 409, "cancelled")
    assert client.get("/health").status_code == 200


def test_resolution_aware_model_over_http(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """A model conditioned on the ground resolution (trained on 0.3-12 m/px, 20 m footprint): the request's
    resolution reaches its prompts, the answer says when it is outside the range, jobs default to 20 m tiles."""
    from engine.model import RSMoEModel
    from engine.model.config import ResolutionConfig
    from engine.pipeline import ModelInfo

    model = RSMoEModel.from_pretrained(tiny_dir)
    model.config.resolution = ResolutionConfig(prompt="Ground resolution {resolution} per pixel.", min_m=0.3,
                                               max_m=12.0, tile_m=20.0)
    pipeline = Pipeline(model, ModelInfo.of(model, "torch", tiny_dir), batch_size=4)
    svc = EngineService(pipeline, ServeOptions(token_file=tmp_path / "engine.json")).start()
    try:
        with httpx.Client(base_url=svc.url, headers={"X-RSMoE-Token": svc.token}, timeout=120) as c:
            h = c.get("/health").json()
            assert h["resolution"] == {"conditioned": True, "min_m": 0.3, "max_m": 12.0, "tile_m": 20.0}
            png = _b64(DATA / "s2_plain.png")  # 256 px read to 32: seen at 8 x the given resolution
            fine = c.post("/caption", json={"image_base64": png, "ground_resolution_m": 0.005, "style": "detailed"})
            body = fine.json()
            assert fine.status_code == 200 and body["model_resolution_m"] == 0.04 and body["uncertain"] is True
            assert body["uncertainty"] == ["resolution 0.04 m/px is finer than the trained range 0.3-12 m/px"]
            phrase = model.config.resolution.phrase(0.04)
            assert all(s["prompt"].startswith(phrase) for s in body["segments"])
            ok = c.post("/ask", json={"image_base64": png, "ground_resolution_m": 0.5, "question": "is there water?"})
            assert ok.json()["model_resolution_m"] == 4.0 and ok.json()["uncertain"] is False
            assert ok.json()["segments"][0]["prompt"].startswith(model.config.resolution.phrase(4.0))
            job = c.post("/jobs", json={"path": str(DATA / "usgs_3857.tif"), "out": str(tmp_path / "u.geojson"),
                                        "window": [0, 0, 131, 131]}).json()
            assert job["tile_size"] == "20m" and job["total"] == 1 and job["warnings"] == []
            status = _wait(c, job["id"])
            assert status["state"] == "done", status
            (feature,) = json.loads((tmp_path / "u.geojson").read_text())["features"]
            assert 0.6 < feature["properties"]["model_resolution_m"] < 0.65  # ~131 px of 0.1524 m read to 32 px
            small = c.post("/jobs", json={"path": str(DATA / "usgs_3857.tif"), "out": str(tmp_path / "s.geojson"),
                                          "window": [0, 0, 32, 32], "tile_size": 32}).json()
            assert small["tile_size"] == "32px" and "would be in range" in small["warnings"][0]  # kept, with a warning
            assert _wait(c, small["id"])["state"] == "done"
    finally:
        svc.stop()


def test_token_file_removed_at_shutdown(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    token_file = tmp_path / "engine.json"
    pipeline = Pipeline.load(tiny_dir, device="cpu")
    svc = EngineService(pipeline, ServeOptions(token_file=token_file, port=0)).start()
    assert token_file.exists()
    svc.stop()
    assert not token_file.exists()


# ------------------------------------------------------------------------------------------- real lite model
@pytest.mark.slow
def test_real_lite_model_round_trip(tmp_path: Path) -> None:
    if not lite_ready():
        pytest.skip("base weights not provisioned (rsmoe base-models)")
    lite = Pipeline.load(device="cpu")
    lite.model.config.generation.max_new_tokens = 12
    lite.model.config.generation.max_new_tokens_answer = 8
    svc = EngineService(lite, ServeOptions(token_file=tmp_path / "engine.json")).start()
    try:
        headers = {"X-RSMoE-Token": svc.token}
        with httpx.Client(base_url=svc.url, headers=headers, timeout=300) as c:
            h = c.get("/health").json()
            assert h["model_id"] == "rsmoe-lite" and h["variant"] == "lite" and h["trained"] is True
            r = c.post("/caption", json={"image_base64": _b64(DATA / "s2_plain.png")})
            assert r.status_code == 200 and len(r.json()["text"].split()) >= 2
            a = c.post("/ask", json={"image_base64": _b64(DATA / "s2_plain.png"), "question": "Is there water?"})
            assert a.status_code == 200 and a.json()["cached"] is True and a.json()["text"].strip()
    finally:
        svc.stop()
