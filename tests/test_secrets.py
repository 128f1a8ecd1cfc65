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
