"""What an encoder *is*: a frozen, plain-data description (no torch objects inside).

Specs hold only JSON-able values so they can be written to logs/MLflow params and defined in
YAML. Layer classes that timm wants as objects (``mlp_layer``, ``act_layer``...) are written as
dotted import paths and resolved only when the model is built (:func:`resolve_kwargs`).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Literal, Mapping

Output = Literal["cls", "cls+mean", "pooled"]
Precision = Literal["bf16", "fp16", "fp32"]
Loader = Literal["timm", "transformers"]

OUTPUTS: tuple[str, ...] = ("cls", "cls+mean", "pooled")
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")
LOADERS: tuple[str, ...] = ("timm", "transformers")
TEST_PREFIX = "test-"

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Only these kwargs may name a class by dotted path: resolving arbitrary strings would turn any
# string-valued timm option (e.g. global_pool="token") into an import attempt.
_CALLABLE_KWARGS = frozenset({"mlp_layer", "act_layer", "norm_layer", "block_fn", "embed_layer"})


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build and run one named encoder."""

    name: str
    """Registry name, e.g. ``uni2-h``. Names starting with ``test-`` are seeded random models."""

    arch: str
    """timm architecture (``loader="timm"``) or transformers model family (``"transformers"``)."""

    dim: int
    """Output embedding size after the output rule (e.g. 2 x embed_dim for ``cls+mean``)."""

    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Constructor kwargs: ``timm.create_model`` kwargs, or a transformers config (with
    ``model_type``). Layer classes are dotted paths, e.g. ``"timm.layers.SwiGLUPacked"``."""

    hub_id: str | None = None
    """Default weights source, ``hf-hub:org/repo``; ``None``: seeded random (test-*) or the
    caller must pass ``weights=``."""

    weights: str | None = None
    """Default local weights file (e.g. an exported XMAG student); wins over ``hub_id``."""

    input_size: int = 224
    """Square tile size in pixels the encoder was trained on."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean (RGB, on 0..1 pixel values) subtracted by ``Encoder.normalize``."""

    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel std (RGB, on 0..1 pixel values) divided by ``Encoder.normalize``."""

    output: Output = "cls"
    """``cls``: class token; ``cls+mean``: class token concatenated with the mean of the patch
    tokens (register tokens excluded); ``pooled``: the model's own pooled features (CNNs)."""

    precision: Precision = "bf16"
    """Autocast dtype on CUDA (weights stay fp32); CPU always runs fp32."""

    mpp: float = 0.5
    """Microns per pixel the encoder expects (0.5 = 20x)."""

    loader: Loader = "timm"
    """Which library builds the architecture."""

    seed: int | None = None
    """Seed of the random weights; only for ``test-*`` entries."""

    description: str = ""
    """One line: what this model is."""

    license: str = ""
    """License / access note for the weights (gated repos need an accepted licence + HF_TOKEN)."""

    def __post_init__(self) -> None:
        # Freeze the mutable parts so a spec cannot change after registration.
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problems = _problems(self)
        if problems:
            raise ValueError(f"encoder spec '{self.name}': " + "; ".join(problems))

    def __hash__(self) -> int:  # kwargs is a dict: hash by name, which is unique in a registry
        return hash(self.name)

    @property
    def is_test(self) -> bool:
        """A ``test-*`` entry: seeded random weights by design."""
        return self.name.startswith(TEST_PREFIX)

    @property
    def random_weights(self) -> bool:
        """True when this entry, built without ``weights=``, has random weights."""
        return self.hub_id is None and self.weights is None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (for logs, MLflow params, YAML)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def _problems(spec: EncoderSpec) -> list[str]:
    p: list[str] = []
    if not spec.name or spec.name != spec.name.strip():
        p.append("name must be a non-empty string without surrounding spaces")
    if spec.output not in OUTPUTS:
        p.append(f"output '{spec.output}' must be one of {OUTPUTS}")
    if spec.precision not in PRECISIONS:
        p.append(f"precision '{spec.precision}' must be one of {PRECISIONS}")
    if spec.loader not in LOADERS:
        p.append(f"loader '{spec.loader}' must be one of {LOADERS}")
    if spec.dim <= 0 or spec.input_size <= 0 or spec.mpp <= 0:
        p.append("dim, input_size and mpp must be positive")
    if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
        p.append("mean and std need 3 values (RGB), std > 0")
    if spec.hub_id is not None and not spec.hub_id.startswith("hf-hub:"):
        p.append(f"hub_id '{spec.hub_id}' must look like 'hf-hub:org/repo'")
    # Random weights are a test device only: a real entry never silently falls back to them.
    if spec.is_test and (spec.seed is None or spec.hub_id is not None or spec.weights):
        p.append("test-* entries need a seed and no hub_id (they are seeded random models)")
    if not spec.is_test and spec.seed is not None:
        p.append("only test-* entries may have a seed; real entries load published weights")
    return p


def resolve_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Turn dotted class paths (for layer kwargs only) into the classes timm expects."""
    out = dict(kwargs)
    for key in _CALLABLE_KWARGS & out.keys():
        value = out[key]
        if isinstance(value, str) and "." in value:
            out[key] = _import_object(value, key)
    return out


def _import_object(path: str, key: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"kwarg {key}='{path}' does not name an importable object: {e}") from e


def spec_from_dict(data: Mapping[str, Any]) -> EncoderSpec:
    """Build a spec from plain data (YAML/JSON); unknown keys fail with a suggestion."""
    known = [f.name for f in fields(EncoderSpec)]
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ValueError(f"unknown encoder spec key(s): {', '.join(hints)}. "
                         f"Valid keys: {', '.join(known)}")
    missing = [k for k in ("name", "arch", "dim") if k not in data]
    if missing:
        raise ValueError(f"encoder spec is missing required key(s): {', '.join(missing)}")
    values = dict(data)
    for key in ("mean", "std"):
        if key in values:
            values[key] = tuple(values[key])
    return EncoderSpec(**values)


def unknown_encoder_message(name: str, registered: Iterable[str]) -> str:
    """What an unknown encoder name fails with: close names, then every registered one."""
    names = sorted(registered)
    lowered = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(lowered[c]) for c in close)}?" if close else ""
    return f"unknown encoder '{name}'.{hint} Registered: {', '.join(names)}"
