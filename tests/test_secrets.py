"""One masking helper for storage errors, logs and MLflow: fusedist.secrets."""

from __future__ import annotations

import pytest

from fusedist import secrets, storage, tracking


def test_storage_and_tracking_mask_through_the_same_helper(monkeypatch: pytest.MonkeyPatch):
    # tracking re-exports the helper; storage's error text goes through it too.
    assert tracking.mask_text is secrets.mask_text and tracking.redact is secrets.redact
    monkeypatch.setenv("MY_VAULT_TOKEN", "vault-value-123456")
    msg = storage._redact("GET https://bob:pw@minio:9000/b/k with vault-value-123456 "
                          "and AKIAABCDEFGHIJKLMNOP")
    # user info whole (storage's rule), the env secret, the credential-shaped key id
    assert msg == "GET https://***@minio:9000/b/k with *** and ***"


def test_known_secret_values_are_masked_longest_first():
    text = "creds abcd and abcdefgh; not ab"
    assert secrets.mask_text(text, extra=["abcd", "abcdefgh", "ab", None]) == \
        "creds *** and ***; not ab"  # 'ab' is too short to be a known secret


def test_redact_masks_whole_values_of_secret_named_keys():
    data = {"s3": {"secret_key": {"a": 1}, "endpoint": "http://u:p@h"}, "flag": True}
    assert secrets.redact(data) == {"s3": {"secret_key": "***", "endpoint": "http://u:***@h"},
                                    "flag": True}


def _churn(seconds: float, call) -> tuple[int, list[BaseException]]:
    """Call ``call`` for ``seconds`` while a real thread sets and removes env variables (as
    MLflow's telemetry thread does); (calls made, exceptions raised)."""
    import os
    import threading
    import time

    stop, errors, calls = threading.Event(), [], 0

    def flip() -> None:
        i = 0
        while not stop.is_set():
            name = f"_FUSEDIST_CHURN_{i % 50}_TOKEN"  # secret-looking: masking reads it
            os.environ[name] = "churn-value-123456"
            os.environ.pop(name, None)
            i += 1

    t = threading.Thread(target=flip, daemon=True)
    t.start()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                call()
            except (KeyError, RuntimeError) as e:
                errors.append(e)
            calls += 1
    finally:
        stop.set()
        t.join()
    return calls, errors


def test_masking_survives_env_vars_removed_by_another_thread(monkeypatch: pytest.MonkeyPatch):
    # The flaky crash of `fusedist retrain`: KeyError: '_MLFLOW_TELEMETRY_SESSION_ID' from a
    # walk of os.environ while MLflow's telemetry thread removed the variable.
    import sys

    for i in range(200):  # a realistic environment: many keys make the walk take time
        monkeypatch.setenv(f"_FUSEDIST_PAD_{i}", "x" * 20)
    monkeypatch.setenv("MY_VAULT_TOKEN", "vault-value-123456")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so the race shows within a second
    try:
        calls, errors = _churn(1.0, lambda: secrets.mask_text("a vault-value-123456 b"))
        snap_calls, snap_errors = _churn(0.5, secrets.env_snapshot)
    finally:
        sys.setswitchinterval(interval)
    assert calls > 100 and snap_calls > 100
    assert errors == [] and snap_errors == []
    assert secrets.mask_text("a vault-value-123456 b") == "a *** b"  # still masks


def test_every_walk_of_the_environment_uses_the_safe_snapshot():
    # A new `dict(os.environ)` / `os.environ.items()` elsewhere would bring the race back.
    import re
    from pathlib import Path

    walk = re.compile(r"dict\(os\.environ|os\.environ\.(items|copy|keys|values)\(|"
                      r"\*\*os\.environ|in os\.environ\b(?!\s*[:)]?\s*$)")
    pkg = Path(secrets.__file__).parent
    hits = [f"{p.relative_to(pkg)}:{n}" for p in sorted(pkg.rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if walk.search(line) and p.name != "secrets.py"]
    assert hits == []
