"""Weights files: read (shapes only, or tensors), match against an architecture, save, digest,
and fetch from the Hugging Face hub with errors that say how to fix the problem.

Files are never unpickled beyond ``torch.load(weights_only=True)``: a checkpoint is data, not
code.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
"""Files tried, in order, in a hub repo or a downloaded snapshot directory."""

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")  # DDP/DeepSpeed and torch.compile wrappers
_SHOW = 5  # keys listed per category in an error message


class WeightsError(ValueError):
    """Weights cannot be obtained or do not fit the architecture; the message names the source,
    the encoder and a fix."""


# -- reading ------------------------------------------------------------------------------------
def find_weights_file(path: str | os.PathLike) -> Path:
    """A weights file, or the standard file inside a directory (e.g. a hub snapshot)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in HUB_FILES:
            if (p / name).is_file():
                return p / name
        raise WeightsError(f"directory {p} holds none of {', '.join(HUB_FILES)}; pass the "
                           "weights file itself as weights=/path/file.safetensors")
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist. Fix: check the path, or download "
                           "the weights there first")
    if not p.name.endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES):
        raise WeightsError(f"weights file {p}: unknown format; expected "
                           f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")
    return p


def read_shapes(path: Path) -> dict[str, torch.Size]:
    """Tensor names and shapes without reading tensor data (safetensors header / mmap)."""
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise WeightsError(f"cannot read safetensors file {path}: {e}") from e
    return {k: v.shape for k, v in _torch_load(path, mmap=True).items()}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file on CPU, with common wrappers removed."""
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        from safetensors.torch import load_file

        try:
            return unwrap(load_file(str(path), device="cpu"), path)
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(f"cannot read safetensors file {path}: {e}") from e
    return _torch_load(path, mmap=True)


def _torch_load(path: Path, mmap: bool) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        # mmap needs the zip format (torch >= 1.6 default); older files load without it.
        if mmap and "mmap" in str(e):
            return _torch_load(path, mmap=False)
        raise WeightsError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e
    except Exception as e:  # pickle errors: a whole pickled model, or not a torch file
        raise WeightsError(
            f"cannot read {path} with torch.load(weights_only=True): {e}. Fix: save a plain "
            "state dict (torch.save(model.state_dict(), path)) or a safetensors file") from e
    return unwrap(obj, path)


def unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept ``{"state_dict"|"model"|...: sd}`` wrappers and ``module.``/``_orig_mod.``
    prefixes; anything else that is not ``{name: tensor}`` is an error."""
    while isinstance(obj, Mapping) and not _all_tensors(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not _all_tensors(obj) or not obj:
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(f"{path} is not a state dict of tensors (top level: {keys}); "
                           f"expected {{name: tensor}}, optionally under one of {_WRAPPER_KEYS}")
    return {_strip(k): v for k, v in obj.items()}


def _all_tensors(d: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in d.values())


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


# -- matching -----------------------------------------------------------------------------------
def adapt_to_model(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resample a ViT's absolute position embedding to the model's patch grid.

    This is the one adaptation allowed: DINOv2 weights are published at 518 px and used at
    224 px. Everything else (patch size, widths, depths) must match exactly; timm's own filter
    would also resample patch embeddings, silently accepting the wrong architecture.
    """
    pos = sd.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or not isinstance(target, torch.Tensor) or pos.shape == target.shape:
        return sd
    if pos.ndim != 3 or pos.shape[-1] != target.shape[-1]:
        return sd  # a real mismatch: reported by compare()
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    if not _is_square(pos.shape[1] - prefix):
        return sd
    from timm.layers import resample_abs_pos_embed

    out = dict(sd)
    out["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                              num_prefix_tokens=prefix)
    return out


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


@dataclass
class Mismatch:
    missing: list[str]
    unexpected: list[str]
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, file, model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)


def compare(model_shapes: Mapping[str, torch.Size], file_shapes: Mapping[str, torch.Size]
            ) -> Mismatch:
    """Strict key and shape comparison, as ``load_state_dict(strict=True)`` would judge."""
    missing = sorted(k for k in model_shapes if k not in file_shapes)
    unexpected = sorted(k for k in file_shapes if k not in model_shapes)
    shapes = [(k, tuple(file_shapes[k]), tuple(model_shapes[k]))
              for k in model_shapes if k in file_shapes and file_shapes[k] != model_shapes[k]]
    return Mismatch(missing, unexpected, shapes)


def mismatch_message(m: Mismatch, source: str, name: str, arch: str, hub_id: str | None) -> str:
    lines = [f"weights {source} do not match encoder '{name}' (architecture {arch}):"]
    for label, items in (("missing from the file", m.missing),
                         ("unexpected in the file", m.unexpected)):
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            lines.append(f"  {len(items)} key(s) {label}: {', '.join(items[:_SHOW])}{more}")
    if m.shapes:
        shown = "; ".join(f"{k}: file {list(f)} vs model {list(e)}" for k, f, e in m.shapes[:_SHOW])
        more = f" (+{len(m.shapes) - _SHOW} more)" if len(m.shapes) > _SHOW else ""
        lines.append(f"  {len(m.shapes)} shape mismatch(es): {shown}{more}")
    origin = f" (its published weights: {hub_id})" if hub_id else ""
    lines.append(
        f"Fix: pass a weights file saved from '{name}'{origin}, or use the registry entry whose "
        "architecture produced this file (fusedist.models.list_encoders()), or register one "
        "with matching arch/kwargs (fusedist.models.register_from_dict).")
    return "\n".join(lines)


def meta_tensors(shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Stand-ins with the file's shapes, so the load-time adaptation runs without the data."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def shapes_of(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in sd.items()}


# -- writing and identity -------------------------------------------------------------------
def save_weights(encoder: nn.Module, path: str | os.PathLike) -> Path:
    """Save the backbone state dict: ``.safetensors``, else ``torch.save`` (.pt/.pth/.bin)."""
    model = getattr(encoder, "model", encoder)
    # clone(): safetensors refuses tensors sharing storage; contiguous() for its layout rule.
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.name.endswith(SAFETENSORS_SUFFIXES):
        from safetensors.torch import save_file

        save_file(sd, str(p))
    else:
        torch.save(sd, p)
    return p


def state_dict_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted keys, dtype, shape and raw bytes: equal iff the weights are equal."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach()
        if t.device.type == "meta":
            raise ValueError("meta tensors have no data to digest (architecture-only build)")
        t = t.cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# -- the hub ------------------------------------------------------------------------------------
def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def download_hub_weights(hub_id: str, name: str) -> Path:
    """Fetch (or find in the local HF cache) the weights file of ``hf-hub:org/repo``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hub_errors

    repo = hub_id.removeprefix("hf-hub:")
    offline = hub_offline()
    reason = "the repo holds none of " + ", ".join(HUB_FILES)
    for filename in HUB_FILES:
        try:
            # local_files_only when offline: answer from the cache, never attempt a download.
            return Path(hf_hub_download(repo, filename, local_files_only=offline))
        except hub_errors.LocalEntryNotFoundError:
            reason = ("HF_HUB_OFFLINE is set and the file is not in the local Hugging Face cache"
                      if offline else "the hub is unreachable and the file is not cached")
        except hub_errors.GatedRepoError as e:
            raise hub_error(hub_id, name, "gated repo: access not granted to this token "
                            f"({type(e).__name__})") from e
        except hub_errors.RepositoryNotFoundError as e:
            raise hub_error(hub_id, name, "repo not found, or gated and HF_TOKEN not set") from e
        except hub_errors.EntryNotFoundError:
            continue  # this file name is not in the repo: try the next one
        except Exception as e:  # network/HTTP failures of many types
            raise hub_error(hub_id, name, f"{type(e).__name__}: {e}") from e
    raise hub_error(hub_id, name, reason)


def hub_error(hub_id: str, name: str, reason: str) -> WeightsError:
    repo = hub_id.removeprefix("hf-hub:")
    return WeightsError(
        f"cannot get weights for encoder '{name}' from {hub_id}: {reason}. Fix: on a machine "
        f"with network access, accept the model's terms at https://huggingface.co/{repo}, "
        f"download it (e.g. HF_TOKEN=... hf download {repo}) and pass "
        f"weights=/path/model.safetensors (or the download directory); or set HF_TOKEN and "
        "allow network access (unset HF_HUB_OFFLINE).")
