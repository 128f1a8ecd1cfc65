"""fusedist.state: the one resumable-state helper (done-entries, digest guard, error text)."""

from __future__ import annotations

import pytest

from fusedist.config import ConfigError
from fusedist.state import StageState
from tests.s3util import moto_server, s3_bucket  # noqa: F401


@pytest.mark.parametrize("where", ["local", "s3"])
def test_entries_round_trip_and_guard(where, tmp_path, request):
    root = (str(tmp_path / "out") if where == "local"
            else f"{request.getfixturevalue('s3_bucket')}/state")
    st = StageState(root, "shards")
    assert st.read("a") is None and st.read_many(["a", "b"]) == {}
    st.write("a", {"n": 1})
    st.write("b", {"n": 2})
    assert st.read_many(["b", "a", "c"]) == {"a": {"n": 1}, "b": {"n": 2}}
    assert sorted(st.names()) == ["a", "b"]

    st.guard("d1", overwrite=False, what="shards")
    st.guard("d1", overwrite=False, what="shards")  # same config: entries kept
    assert sorted(st.names()) == ["a", "b", "digest"]
    with pytest.raises(ConfigError, match=r"already holds shards made with a different "
                                          r"config; .*--set overwrite=true"):
        st.guard("d2", overwrite=False, what="shards")
    assert st.read("a") == {"n": 1}  # a refused re-run loses nothing
    st.guard("d2", overwrite=True, what="shards")  # overwrite: the old entries go
    assert st.names() == ["digest"] and st.read("digest") == {"digest": "d2"}


def test_distill_refuses_to_resume_a_run_of_another_teacher_or_data(tmp_path):
    from fusedist.distill.config import DistillConfig
    from fusedist.distill.train import _guard_run

    cfg = DistillConfig(tiles=str(tmp_path / "t"), features=str(tmp_path / "f"),
                        teacher="test-vit", storage_path=str(tmp_path / "runs"), run_name="r")
    meta = {"student": "test-vit", "teacher": "test-vit", "data_digest": "x",
            "teacher_weights_digest": "w", "epochs_are_not_identity": 1}
    _guard_run(cfg, meta)
    _guard_run(cfg, dict(meta, epochs_are_not_identity=2))  # more epochs: resumes
    with pytest.raises(ConfigError, match="distill run 'r' made with a different student, "
                                          "teacher, data.*; choose another run_name"):
        _guard_run(cfg, dict(meta, data_digest="y"))
