"""Typed, strict configuration shared by every stage.

Each stage owns a pydantic model (fields documented by their docstrings) that is built from a
YAML recipe in ``configs/`` plus ``key=value`` overrides from the command line. Unknown keys and
bad values fail *before* any work starts, with a message that names the file, the key and a fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound="StrictModel")


class ConfigError(ValueError):
    """A configuration problem; the message says which file/key and how to fix it."""


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, field docstrings are the documentation."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        frozen=False,
    )


class StorageConfig(StrictModel):
    """Where and how URLs are read and written (local paths, ``file://``, ``s3://``)."""

    endpoint_url: str | None = None
    """S3 endpoint (e.g. ``http://minio:9000``). Default: ``AWS_ENDPOINT_URL`` or AWS itself.
    Credentials never go here: they come from the standard AWS chain (env, profile, IRSA)."""

    region: str | None = None
    """S3 region; default from the AWS chain (``AWS_DEFAULT_REGION``), else us-east-1."""

    max_attempts: int = 8
    """Attempts per S3 request (botocore retry mode below) before a clear error naming the URL."""

    retry_mode: Literal["standard", "adaptive"] = "standard"
    """botocore retry mode. ``adaptive`` adds client-side rate limiting, but one burst of 503
    SlowDown replies then throttles the whole client for a long while; ``standard`` recovers
    faster."""

    connect_timeout: float = 10.0
    """Seconds to wait for a TCP connection to the S3 endpoint."""

    read_timeout: float = 60.0
    """Seconds to wait for data on an open S3 connection."""

    multipart_threshold_mb: int = 64
    """Objects larger than this are uploaded in parts (S3 minimum part size is 5 MiB)."""

    multipart_chunk_mb: int = 64
    """Part size for multipart uploads (>= 5)."""

    cache_dir: str | None = None
    """Local directory for files that must be local to be read (e.g. slides on S3 for OpenSlide).
    Default: ``$FUSEDIST_CACHE`` or ``~/.cache/fusedist``."""


class RayConfig(StrictModel):
    """How to reach Ray. The default starts a private local Ray; ``auto`` joins a running one."""

    address: str | None = None
    """``None``: start a local Ray (or use ``RAY_ADDRESS`` if set); ``auto`` or ``host:port``:
    join an existing cluster."""

    num_cpus: int | None = None
    """CPUs for a local Ray (default: all cores). Ignored when joining a cluster."""

    object_store_memory_mb: int | None = None
    """Object store size for a local Ray (default: 2048 MB, see ``fusedist.execution.rayrun``)."""


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if close:
        return f" Did you mean '{close[0]}'?"
    return f" Valid keys here: {', '.join(sorted(options))}." if options else ""


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The nested model class that owns the key at ``loc[:-1]``, if any."""
    cur: Any = model
    for part in loc[:-1]:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        field = cur.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        # Unwrap Optional[Model] / Model | None.
        args = getattr(ann, "__args__", None)
        if args:
            ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        cur = ann
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """Turn a pydantic error into lines that name the key and say how to fix it."""
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            opts = list(owner.model_fields) if owner else []
            lines.append(f"  - unknown key '{key}'.{_suggest(str(loc[-1]), opts)} "
                         "Remove it or fix its spelling.")
        elif e["type"] == "missing":
            lines.append(f"  - missing required key '{key}': set it in the YAML or with "
                         f"--set {key}=...")
        else:
            owner = _model_at(model, loc) if loc else None
            doc = ""
            if owner is not None and str(loc[-1]) in owner.model_fields:
                d = owner.model_fields[str(loc[-1])].description
                if d:
                    doc = f" ({d.splitlines()[0]})"
            got = f" (got {e.get('input')!r})" if loc else ""
            lines.append(f"  - '{key}': {e['msg']}{got}{doc}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value (e.g. --set tile.min_tissue=0.3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides or []:
        path, value = parse_override(item)
        cur = out
        for p in path[:-1]:
            nxt = cur.get(p)
            if nxt is None:
                nxt = cur[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
            cur = nxt
        cur[path[-1]] = value
    return out


def load_config(model: type[T], path: str | Path | None = None,
                overrides: list[str] | None = None, **fields: Any) -> T:
    """Build ``model`` from a YAML file, then ``--set`` overrides, then keyword fields.

    Raises :class:`ConfigError` with a message naming the file, key and fix.
    """
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (pass an existing YAML, e.g. "
                              f"configs/tile/pairs.yaml)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of keys, not {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides)
    for k, v in fields.items():
        if v is not None:
            data[k] = v
    if overrides:
        source += " + overrides"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model, source)) from None


def config_digest(cfg: BaseModel, exclude: set[str] | None = None) -> str:
    """A stable sha256 of the config (minus run-only knobs) to tell whether outputs match it."""
    payload = cfg.model_dump(mode="json", exclude=exclude or set())
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
