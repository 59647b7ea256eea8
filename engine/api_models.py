"""The service's HTTP schema: request bodies with their limits and the answers, as pydantic models (``GET
/openapi.json`` is made from them; :mod:`engine.server` serves them)."""
from __future__ import annotations

import base64
import binascii
from dataclasses import fields
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from engine.bands import BandSelection
from engine.distributed import RayOptions
from engine.errors import RSMoEError, UserInputError
from engine.georef import Window
from engine.inputs import ImageInput
from engine.jobs import AnnotateParams
from engine.model.routing import MAX_QUESTION_CHARS
from engine.pipeline import ModelInfo

#: Longest file path or CRS text a request may hold.
MAX_PATH_CHARS = 4096
MAX_CRS_CHARS = 10_000
#: Largest pixel offset or size (GDAL's raster size limit).
MAX_PIXELS = 2**31 - 1
#: Most images in one ``POST /caption/batch`` (its bytes are bounded by the body limit).
MAX_BATCH_ITEMS = 64


# --------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every failure: one line saying what went wrong and what to do."""

    error: str = Field(..., description="a message a person can act on (one line, no traceback)")


def _plain_text(value: str) -> str:
    """Text that reaches file systems, GDAL and the tokenizer: no NUL character, valid Unicode."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return value


#: A file path on the engine's machine.
LocalPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS),
                      AfterValidator(_plain_text)]
CrsText = Annotated[str, Field(min_length=1, max_length=MAX_CRS_CHARS),
                    AfterValidator(_plain_text)]
BandName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_plain_text)]
BandChoice = (Annotated[str, Field(max_length=200), AfterValidator(_plain_text)]
              | Annotated[list[Annotated[int, Field(ge=1, le=65535)] | BandName], Field(min_length=1, max_length=3)])
PixelWindow = Annotated[list[Annotated[int, Field(ge=0, le=MAX_PIXELS)]], Field(min_length=4, max_length=4)]
Coordinate = Annotated[float, Field(allow_inf_nan=False)]
Extent = Annotated[list[Coordinate], Field(min_length=4, max_length=4)]
Style = Literal["concise", "detailed"]


class RegionRequest(_Strict):
    """An image: ``image_base64`` (PNG / JPEG / GeoTIFF bytes) or a local raster ``path``, and a part of it."""

    image_base64: str | None = Field(None, min_length=1,
                                     description="base64 of PNG, JPEG or GeoTIFF bytes (instead of path)")
    path: LocalPath | None = Field(None, description="a raster file on the engine's machine (instead of "
                                                     "image_base64)")
    window: PixelWindow | None = Field(None, description="pixel window [col_off, row_off, width, height] (width and "
                                                         "height at least 1; instead of extent)")
    extent: Extent | None = Field(None, description="[minx, miny, maxx, maxy] in the raster CRS or extent_crs "
                                                    "(instead of window)")
    extent_crs: CrsText | None = Field(None, description="CRS of extent, e.g. EPSG:4326")
    bands: BandChoice | None = Field(None, description='1 or 3 bands, e.g. "4,3,2", [4, 3, 2] or ["B04","B03","B02"]')
    ground_resolution_m: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="metres per pixel of the image as sent (e.g. a rendered map image without georeferencing); "
                    "default: from the raster's georeferencing, else unknown")

    def image_input(self) -> ImageInput:
        data = None
        if self.image_base64 is not None:
            try:
                data = base64.b64decode(self.image_base64, validate=True)
            except (binascii.Error, ValueError):
                raise UserInputError("image_base64 is not valid base64") from None
        return ImageInput(path=self.path, data=data, window=Window.from_list(self.window) if self.window else None,
                          extent=tuple(self.extent) if self.extent else None,  # type: ignore[arg-type]
                          extent_crs=self.extent_crs, bands=BandSelection.parse(self.bands),
                          ground_resolution_m=self.ground_resolution_m)


class CaptionRequest(RegionRequest):
    style: Style = Field("concise", description="concise: one sentence; detailed: every expert")


class AskRequest(RegionRequest):
    question: Annotated[str, AfterValidator(_plain_text)] = Field(
        ..., min_length=1, max_length=MAX_QUESTION_CHARS,
        description=f"the question (at most {MAX_QUESTION_CHARS} characters)")


class CaptionBatchRequest(_Strict):
    """Several images or raster regions captioned in one request, through the model in batches."""

    items: list[RegionRequest] = Field(..., min_length=1, max_length=MAX_BATCH_ITEMS,
                                       description=f"1 to {MAX_BATCH_ITEMS} regions, as for POST /caption (without "
                                                   f"style); all together within the request body limit")
    style: Style = Field("concise", description="for every item: concise (one sentence) or detailed (every expert)")

    def image_inputs(self) -> list[ImageInput]:
        """The items as engine inputs; a bad item fails the whole request, naming it (``items[2]: ...``)."""
        inputs = []
        for i, item in enumerate(self.items):
            try:
                inputs.append(item.image_input())
            except RSMoEError as exc:
                raise type(exc)(f"items[{i}]: {exc}") from None
        return inputs


RAY_ADDRESS_PATTERN = r"^(local|auto|(ray://)?[A-Za-z0-9._\-]+:[0-9]{1,5})$"


class RayRequest(_Strict):
    """Run a job's tiles on Ray workers, each loading the model once (as ``rsmoe annotate --ray``; needs the
    ``rsmoe[distributed]`` extra): the GeoJSON is byte-identical to the same job without Ray."""

    address: Annotated[str, Field(min_length=1, max_length=256, pattern=RAY_ADDRESS_PATTERN),
                       AfterValidator(_plain_text)] = Field(
        "local", description='"local" (Ray on the engine\'s machine, for this job), "auto" or a cluster address '
                             "HOST:PORT / ray://HOST:PORT")
    workers: int | None = Field(None, ge=1, le=1024,
                                description="Ray workers (default: as many as the CPUs / GPUs allow)")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="CPUs each worker reserves (its threads)")
    gpus_per_worker: float = Field(0.0, ge=0, le=64, description="GPUs each worker reserves and runs the model on")

    def options(self) -> RayOptions:
        return RayOptions(address=self.address, workers=self.workers, cpus_per_worker=self.cpus_per_worker,
                          gpus_per_worker=self.gpus_per_worker)


class JobRequest(_Strict):
    """A batch annotation job (see ``rsmoe annotate``)."""

    path: LocalPath = Field(..., description="the raster to annotate (on the engine's machine)")
    out: LocalPath = Field(..., description="the GeoJSON file to write")
    tile_size: (Annotated[str, Field(min_length=1, max_length=32),
                          AfterValidator(_plain_text)]
                | Annotated[int, Field(ge=1, le=MAX_PIXELS)] | None) = Field(
        None, description='pixels (512, "512px") or ground size ("500m", "2km"); default: a ground footprint the '
                          "model knows where the raster is georeferenced and its pixels allow (resolution.tile_m, "
                          "or the coarsest trained footprint for Sentinel-2-like pixels), else 512 pixels")
    overlap: int = Field(0, ge=0, le=MAX_PIXELS, description="pixels shared by neighbouring tiles (less than a tile)")
    window: PixelWindow | None = Field(None, description="pixel window [col_off, row_off, width, height]")
    extent: Extent | None = Field(None, description="[minx, miny, maxx, maxy] in the raster CRS or extent_crs")
    extent_crs: CrsText | None = None
    bands: BandChoice | None = None
    style: Style = "concise"
    batch_size: int | None = Field(None, ge=1, le=256)
    gpkg: LocalPath | None = Field(None, description="also write a GeoPackage here")
    restart: bool = Field(False, description="ignore an existing journal instead of resuming it")
    min_valid_fraction: float = Field(0.5, ge=0.0, le=1.0)
    timing: bool = False
    ray: RayRequest | None = Field(None, description="run the tiles on Ray workers (see RayRequest)")

    def ray_options(self) -> RayOptions | None:
        return self.ray.options() if self.ray is not None else None

    def params(self) -> AnnotateParams:
        if self.window is not None and self.extent is not None:
            raise UserInputError("give either a window or an extent, not both")
        if self.extent_crs is not None and self.extent is None:
            raise UserInputError("extent_crs was given without an extent")
        return AnnotateParams(
            raster=self.path, out=self.out, tile_size=self.tile_size, overlap=self.overlap,
            window=Window.from_list(self.window) if self.window else None,
            extent=tuple(self.extent) if self.extent else None,  # type: ignore[arg-type]
            extent_crs=self.extent_crs, bands=BandSelection.parse(self.bands), style=self.style,
            batch_size=self.batch_size, gpkg=self.gpkg, restart=self.restart,
            min_valid_fraction=self.min_valid_fraction, timing=self.timing)


# --------------------------------------------------------------------------------------------
# Answers (documented in the OpenAPI document; further fields may be added, so they allow extras)
# --------------------------------------------------------------------------------------------
class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class SegmentAnswer(_Answer):
    expert: str = Field(..., description="theme, objects or relations")
    prompt: str = Field(..., description="what the router asked the expert")
    text: str


class RegionAnswer(_Answer):
    """A caption or an answer about one region (see the README for every field)."""

    text: str
    task: Literal["caption", "ask"]
    style: Style | None
    router: str = Field(..., description="generative or template (the router that planned the experts), or "
                                         "answer_head (a closed question answered by the answer head, no experts)")
    scene: str | None = Field(..., description="the scene head's class; null where it was unsure or absent")
    scene_confidence: float | None
    experts: list[str]
    segments: list[SegmentAnswer]
    ground_resolution_m: float | None = Field(..., description="native metres per pixel of the region")
    model_resolution_m: float | None = Field(..., description="metres per pixel of the model input")
    uncertain: bool
    uncertainty: list[str] = Field(..., description="why the result may be wrong")
    window: list[int] = Field(..., description="the pixel window read [col_off, row_off, width, height]")
    source: dict[str, Any] = Field(..., description="the raster: path (null for bytes), size, bands, CRS, ...")
    cached: bool = Field(..., description="the visual features came from the cache")
    seconds: float


class CaptionBatchAnswer(_Answer):
    results: list[RegionAnswer] = Field(..., description="one per item, in the items' order")
    seconds: float


class JobStatus(_Answer):
    id: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    done: int
    total: int
    skipped: int
    resumed: int
    message: str | None
    error: str | None
    cancel_requested: bool
    out: str
    gpkg: str | None
    raster: str
    tile_size: str | None
    warnings: list[str]
    created: float
    started: float | None
    finished: float | None
    result: dict[str, Any] | None
    ray: dict[str, Any] | None = Field(None, description="the job's Ray options, null when it runs in the engine")


class JobList(_Answer):
    jobs: list[JobStatus]


class JobResult(_Answer):
    """Where a finished job wrote; with ``geojson`` (its content) unless ``content=false``."""

    id: str
    out: str
    gpkg: str | None
    total: int
    captioned: int
    skipped: int
    resumed: int
    seconds: float
    journal: str | None


def _model_facts() -> dict[str, Any]:
    """:class:`ModelInfo`'s fields as pydantic field definitions: the health answer carries them all."""
    hints = get_type_hints(ModelInfo)
    return {f.name: (hints[f.name], ...) for f in fields(ModelInfo)}


HealthAnswer = create_model(
    "HealthAnswer", __base__=_Answer, status=(Literal["ok"], ...), **_model_facts(),
    batch_size=(int, Field(..., description="images per model call")),
    image_size=(int, Field(..., description="the model's input size in pixels")),
    resolution=(dict[str, Any], Field(..., description="conditioned, min_m, max_m, tile_m")),
    cache=(dict[str, Any], ...), jobs=(dict[str, int], ...), uptime_s=(float, ...), pid=(int, ...))
