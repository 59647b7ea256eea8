"""A small HTTP client for the engine service (``rsmoe serve``), on the standard library only.

Every request carries the engine's token (``Authorization: Bearer``); proxies are bypassed (the
engine listens on this machine). Failures become :mod:`rsmoe_plugin.errors` exceptions whose
messages say what to do.
"""
from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from rsmoe_plugin.errors import (
    EngineConnectionLost,
    EngineError,
    EngineRequestError,
    EngineTimeoutError,
    EngineUnreachableError,
    TokenRefusedError,
)

USER_AGENT = "rsmoe-qgis-plugin"


@dataclass(frozen=True)
class EngineHealth:
    """What ``GET /health`` says: the model, the backend and whether a GPU is used."""

    model_id: str
    variant: str
    trained: bool
    backend: str
    device: str
    gpu: bool
    gpu_name: str | None
    providers: list[str]
    version: str
    pid: int | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineHealth:
        return cls(model_id=str(data.get("model_id", "?")), variant=str(data.get("variant", "?")),
                   trained=bool(data.get("trained", False)), backend=str(data.get("backend", "?")),
                   device=str(data.get("device", "?")), gpu=bool(data.get("gpu", False)),
                   gpu_name=data.get("gpu_name"), providers=[str(p) for p in data.get("providers") or []],
                   version=str(data.get("version", "?")), pid=data.get("pid"), raw=dict(data))

    def summary(self) -> str:
        """One line for the panels: model, backend, device, GPU or not."""
        gpu = f"GPU ({self.gpu_name})" if self.gpu and self.gpu_name else ("GPU" if self.gpu else "no GPU (CPU)")
        trained = "" if self.trained else ", untrained"
        return f"{self.model_id} ({self.variant}{trained}) on {self.backend} / {self.device}: {gpu}"


@dataclass(frozen=True)
class Segment:
    """One expert's part of a caption or answer."""

    expert: str
    text: str


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class ModelAnswer:
    """A caption or an answer from ``POST /caption`` or ``POST /ask``.

    ``uncertain`` / ``uncertainty`` (why the model may be wrong) and the ground resolutions come from engines
    that send them; an older engine's answer reads as not uncertain, resolutions unknown."""

    text: str
    task: str
    segments: list[Segment]
    experts: list[str]
    router: str | None
    scene: str | None
    scene_confidence: float | None
    window: list[int] | None
    cached: bool
    seconds: float
    uncertain: bool = False
    uncertainty: list[str] = field(default_factory=list)
    ground_resolution_m: float | None = None
    model_resolution_m: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelAnswer:
        segments = [Segment(str(s.get("expert", "")), str(s.get("text", ""))) for s in data.get("segments") or []]
        reasons = data.get("uncertainty")
        reasons = [str(r) for r in reasons] if isinstance(reasons, list) else []
        return cls(text=str(data.get("text", "")), task=str(data.get("task", "")), segments=segments,
                   experts=[str(e) for e in data.get("experts") or []], router=data.get("router"),
                   scene=data.get("scene"), scene_confidence=data.get("scene_confidence"),
                   window=data.get("window"), cached=bool(data.get("cached", False)),
                   seconds=float(data.get("seconds") or 0.0), uncertain=data.get("uncertain") is True,
                   uncertainty=reasons, ground_resolution_m=_number(data.get("ground_resolution_m")),
                   model_resolution_m=_number(data.get("model_resolution_m")), raw=dict(data))

    def uncertainty_note(self) -> str | None:
        """``Unsure: scene unsure (0.41); the caption may be wrong.`` when the engine said so, else None."""
        if not self.uncertain:
            return None
        what = "answer" if self.task == "ask" else "caption"
        reasons = "; ".join(self.uncertainty) or "the model is not sure"
        return f"Unsure: {reasons}; the {what} may be wrong."


def _error_message(body: bytes, status: int) -> str:
    try:
        data = json.loads(body.decode("utf-8"))
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])
    except (ValueError, UnicodeDecodeError):
        pass
    text = body.decode("utf-8", "replace").strip()
    return text[:500] or f"HTTP {status}"


class EngineClient:
    """Talk to one engine: ``url`` like ``http://127.0.0.1:8765`` and its token."""

    def __init__(self, url: str, token: str, timeout: float = 900.0) -> None:
        parsed = urllib.parse.urlparse(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise EngineUnreachableError(f"'{url}' is not an engine URL (expected http://127.0.0.1:PORT)")
        self.url = url.strip().rstrip("/")
        self.token = token.strip()
        self.timeout = float(timeout)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"EngineClient({self.url!r})"

    # -- transport ---------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                timeout: float | None = None) -> dict[str, Any]:
        """One JSON request; returns the decoded answer or raises an :class:`EngineError`."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        req.add_header("User-Agent", USER_AGENT)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=self.timeout if timeout is None else timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            message = _error_message(exc.read() or b"", exc.code)
            if exc.code in (401, 403):
                raise TokenRefusedError(
                    f"the engine at {self.url} refused the token ({message}). If the engine was restarted, "
                    f"its token changed: update it in the RS-MoE settings or RSMOE_ENGINE_TOKEN.") from None
            raise EngineRequestError(exc.code, message) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise EngineTimeoutError(f"the engine at {self.url} did not answer {method} {path} in time") from None
            if isinstance(reason, ConnectionRefusedError):
                raise EngineUnreachableError(f"nothing answers at {self.url} (connection refused)") from None
            if isinstance(reason, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
                raise EngineConnectionLost(f"the connection to the engine at {self.url} broke ({reason})") from None
            raise EngineUnreachableError(f"cannot reach the engine at {self.url}: {reason}") from None
        except TimeoutError:
            raise EngineTimeoutError(f"the engine at {self.url} did not answer {method} {path} in time") from None
        except (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionError) as exc:
            raise EngineConnectionLost(
                f"the engine at {self.url} closed the connection during {method} {path} "
                f"({type(exc).__name__})") from None
        except (http.client.HTTPException, OSError) as exc:
            raise EngineConnectionLost(f"talking to the engine at {self.url} failed: {exc}") from None
        try:
            decoded = json.loads(payload.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise EngineError(f"the engine at {self.url} answered {method} {path} with something that is not "
                              f"JSON; is this really an RS-MoE engine?") from None
        if not isinstance(decoded, dict):
            raise EngineError(f"unexpected answer from the engine to {method} {path}")
        return decoded

    # -- endpoints ---------------------------------------------------------------------------
    def health(self, timeout: float = 10.0) -> EngineHealth:
        return EngineHealth.from_json(self.request("GET", "/health", timeout=timeout))

    def caption(self, region: dict[str, Any], style: str = "concise") -> ModelAnswer:
        return ModelAnswer.from_json(self._region_request("/caption", {**region, "style": style}))

    def caption_batch(self, regions: list[dict[str, Any]], style: str = "concise") -> list[ModelAnswer]:
        """Caption several regions in one ``POST /caption/batch`` (the engine runs them through the model in
        batches; answers in order). An older engine without that endpoint gets one ``POST /caption`` each."""
        try:
            answer = self.request("POST", "/caption/batch", {"items": regions, "style": style})
        except EngineRequestError as exc:
            if exc.status != 404 or "no such endpoint" not in str(exc):
                raise
            return [self.caption(region, style) for region in regions]
        results = answer.get("results")
        if not isinstance(results, list) or len(results) != len(regions):
            raise EngineError(f"the engine at {self.url} answered {len(regions)} regions with something else")
        return [ModelAnswer.from_json(r if isinstance(r, dict) else {}) for r in results]

    def ask(self, region: dict[str, Any], question: str) -> ModelAnswer:
        return ModelAnswer.from_json(self._region_request("/ask", {**region, "question": question}))

    def _region_request(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a region; an older engine that refuses ``ground_resolution_m`` gets the request without it."""
        try:
            return self.request("POST", path, body)
        except EngineRequestError as exc:
            if exc.status != 422 or "ground_resolution_m" not in body or "ground_resolution_m" not in str(exc):
                raise
            return self.request("POST", path, {k: v for k, v in body.items() if k != "ground_resolution_m"})

    def submit_job(self, job: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/jobs", job, timeout=60.0)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{urllib.parse.quote(job_id)}", timeout=30.0)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{urllib.parse.quote(job_id)}/cancel", timeout=30.0)

    def job_result(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{urllib.parse.quote(job_id)}/result?content=false", timeout=60.0)
