"""The one secret-masking helper of fusedist: every message, log line, MLflow param/tag and
manifest that could carry a credential passes through :func:`mask_text` (strings) or
:func:`redact` (nested data).

What is masked: the values of secret environment variables (``AWS_SECRET_ACCESS_KEY``,
``HF_TOKEN``, ... and any variable whose name looks secret), secret values the caller knows
(``extra``: storage passes the credentials boto resolved), credential-shaped tokens (AWS key
ids, Hugging Face / GitHub / Slack tokens, PEM private keys), passwords inside URLs and
secret-named query parameters; in nested data, the whole value of any secret-named key.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable

from pydantic import BaseModel

MASK = "***"

SECRET_KEY_RE = re.compile(
    r"(secret|password|passwd|token|credential|api[_-]?key|access[_-]?key|private[_-]?key|session)",
    re.IGNORECASE)
# Credentials of known formats, masked wherever they appear inside a value.
_CREDENTIAL_RES = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),                 # AWS access key id
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),                       # Hugging Face token
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),                # GitHub token
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),              # Slack token
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
]
_URL_PASSWORD_RE = re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@/\s]+(?=@)")
_QUERY_PARAM_RE = re.compile(r"(?P<pre>[?&](?P<name>[^=&#\s]+)=)(?P<val>[^&#\s]+)")
# Always treated as secret when set, whatever SECRET_KEY_RE says about their names.
_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN")
# Shorter env values ("1", "true", "wayland") are settings, not secrets; masking them would
# mangle unrelated params.
_MIN_ENV_SECRET_LEN = 8
# Secret values handed in by a caller are masked from 4 characters: they are known secrets,
# not guesses from a variable's name.
_MIN_EXTRA_LEN = 4


def env_snapshot() -> dict[str, str]:
    """A copy of ``os.environ`` that is safe while other threads change it.

    Walking ``os.environ`` (``items()``, ``dict(os.environ)``, ``copy()``) reads each key's
    value after listing the keys, so a variable another thread removes in between raises
    ``KeyError`` (MLflow's telemetry thread removes ``_MLFLOW_TELEMETRY_SESSION_ID``). Listing
    the keys is one atomic copy; each value is then read with ``get``, and a key gone by then
    is left out, as if it had been removed just before the snapshot."""
    for _ in range(100):
        try:
            keys = list(os.environ)
            break
        except RuntimeError:  # "changed size during iteration" (free-threaded builds)
            continue
    else:
        keys = []
    out = {}
    for k in keys:
        v = os.environ.get(k)
        if v is not None:
            out[k] = v
    return out


def _env_secret_values() -> list[str]:
    """Values of secret-looking env vars, longest first so overlapping secrets mask whole."""
    values = {v for k, v in env_snapshot().items()
              if (k in _SECRET_ENV_VARS or SECRET_KEY_RE.search(k))
              and len(v) >= _MIN_ENV_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def mask_text(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with env secrets, ``extra`` secret values (e.g. resolved S3 credentials),
    credential-shaped tokens and URL passwords replaced by ***."""
    values = {v for v in extra if isinstance(v, str) and len(v) >= _MIN_EXTRA_LEN}
    for secret in sorted(values | set(_env_secret_values()), key=len, reverse=True):
        text = text.replace(secret, MASK)
    for pattern in _CREDENTIAL_RES:
        text = pattern.sub(MASK, text)
    text = _URL_PASSWORD_RE.sub(lambda m: m["pre"] + MASK, text)
    return _QUERY_PARAM_RE.sub(
        lambda m: m["pre"] + MASK if SECRET_KEY_RE.search(m["name"]) else m[0], text)


def _plain(obj: Any) -> Any:
    """Pydantic models -> JSON-like data; everything else unchanged."""
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj


def redact(obj: Any, key: str = "") -> Any:
    """A copy of ``obj`` safe to log: secret-named keys masked whole, strings masked inside."""
    obj = _plain(obj)
    if key and SECRET_KEY_RE.search(key) and obj is not None and not isinstance(obj, bool):
        return MASK  # whatever shape it has (a dict of keys, a list of tokens), hide all of it
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return mask_text(obj)
    return obj
