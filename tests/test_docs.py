"""The docs are checked like code.

- The config reference (docs/reference/) is what ``fusedist.docsgen`` writes from the models,
  and every config field has a docstring.
- Every shell block in README.md and docs/ carries a marker; ``<!-- run -->`` blocks run, in
  order, in a fresh folder per file (against a moto S3 and a SQLite MLflow); every ``fusedist``
  and ``make`` command in any block names a real subcommand, flag and target.
- The site builds with ``mkdocs build --strict`` and without touching the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusedist import docsgen
from tests import docblocks
from tests.docblocks import Block, BlockFailed, check_block, run_blocks, scan
from tests.s3util import _UNSET, FAKE_ENV, moto_server  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([REPO / "README.md"] + [p for p in (REPO / "docs").rglob("*.md")
                                           if "reference" not in p.relative_to(REPO / "docs").parts])
DOC_IDS = [str(p.relative_to(REPO)) for p in DOC_FILES]
DEMO_BUCKET = "demo-bucket"


def _scan(path: Path) -> tuple[list[Block], list[str]]:
    return scan(path.read_text(), str(path.relative_to(REPO)))


# ----------------------------------------------------------------------------- reference

def test_reference_is_up_to_date():
    stale = docsgen.stale()
    assert not stale, (f"docs/reference/ is stale ({', '.join(stale)} differ from what the "
                       f"config models give): run `{docsgen.REGENERATE}` and commit the result")


def test_every_config_field_has_a_docstring():
    missing = docsgen.undocumented()
    assert not missing, ("config fields without a docstring (write one on the line under each "
                         "field; it is the field's documentation):\n  " + "\n  ".join(missing))


def test_reference_covers_every_recipe_stage_and_nested_key(tmp_path):
    from fusedist.recipes import RECIPE_MODELS

    assert set(RECIPE_MODELS) <= {p.slug for p in docsgen.PAGES}
    docsgen.write(tmp_path)
    tile = (tmp_path / "tile.md").read_text()
    # A nested section's keys appear with their full path, type and default.
    assert "| `tissue.thumbnail_mpp` | `float` | `8.0` |" in tile
    assert "| `mode` | `\"pairs\"` \\| `\"grid\"` | `pairs` |" in tile
    assert "| `input` | `str` | **required** |" in tile
    cache = (tmp_path / "cache.md").read_text()
    assert "`teachers[].weights`" in cache and "`engine.batch_size` | `int`, > 0 | `256`" in cache
    # A stage config nested in another links to its page instead of repeating it.
    retrain = (tmp_path / "retrain.md").read_text()
    assert "[tile](tile.md)" in retrain and "`tile.<name>.mode`" not in retrain


def test_writing_removes_pages_of_stages_that_are_gone(tmp_path):
    (tmp_path / "oldstage.md").write_text("# gone\n")
    assert "oldstage.md" in docsgen.stale(tmp_path)
    docsgen.write(tmp_path)
    assert not (tmp_path / "oldstage.md").exists() and docsgen.stale(tmp_path) == []


@pytest.mark.parametrize("tp, text", [
    (int, "int"), (float | None, "float | None"), (list[str], "list[str]"),
    (dict[str, float], "dict[str, float]"), (tuple[float, float], "tuple[float, float]"),
])
def test_type_names(tp, text):
    assert docsgen.type_name(tp) == text


def test_literal_types_and_values_read_as_yaml():
    from typing import Literal

    assert docsgen.type_name(Literal["a", "b"]) == '"a" | "b"'
    assert docsgen.type_name(Literal[0, 1]) == "0 | 1"
    assert docsgen.code('"a" | "b"') == '`"a"` \\| `"b"`'
    assert [docsgen.yaml_value(v) for v in (None, True, "x", [1, 2], {"k": 1.5}, "")] == \
        ["null", "true", "x", "[1, 2]", "{k: 1.5}", "''"]


def test_docstrings_become_one_safe_table_cell():
    cell = docsgen.md_text("Writes ``a|b`` to <slide>/x.\n  Next line.\n\nNew para *here*.")
    assert "\n" not in cell
    assert cell == "Writes `a` \\| `b` to &lt;slide>/x. Next line.<br><br>New para \\*here\\*."


# ----------------------------------------------------------------------------- markers (unit)

def _md(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def test_a_block_without_a_marker_fails_with_file_and_line():
    blocks, errors = scan(_md("""
        # Title

        ```bash
        fusedist synth --output x
        ```
        """), "docs/x.md")
    assert blocks == [] and len(errors) == 1
    assert errors[0].startswith("docs/x.md:3: bash block without a marker")
    assert "<!-- run -->" in errors[0]  # says what to write


def test_markers_are_read_and_only_shell_blocks_need_one():
    blocks, errors = scan(_md("""
        <!-- run -->
        ```bash
        echo one
        ```
        <!-- needs: gpu -->
        ```console
        $ fusedist cache \\
            --tiles t
        output line
        ```
        ```python
        print("no marker needed")
        ```
        ````markdown
        ```bash
        inside an example: not a block of this page
        ```
        ````
        """), "f.md")
    assert errors == []
    assert [(b.line, b.lang, b.marker) for b in blocks] == [(2, "bash", "run"),
                                                          (6, "console", "needs: gpu")]
    assert blocks[1].script == "fusedist cache \\\n    --tiles t"


@pytest.mark.parametrize("text, expected", [
    ("<!-- needs: gpus -->\n```sh\nx\n```\n", "f.md:2: unknown marker <!-- needs: gpus -->"),
    ("<!-- run -->\n\n```sh\nx\n```\n", "f.md:1: marker <!-- run --> is not on the line"),
    ("<!-- run -->\n```python\nx\n```\n", "f.md:1: marker <!-- run --> is not on the line"),
])
def test_bad_or_misplaced_markers_fail(text, expected):
    _, errors = scan(text, "f.md")
    assert any(e.startswith(expected) for e in errors), errors


# ----------------------------------------------------------------------------- commands (unit)

def _block(script: str, marker: str = "needs: cluster") -> Block:
    return Block("docs/x.md", 7, "bash", marker, script, script)


def test_an_unknown_flag_in_a_needs_block_fails():
    errors = check_block(_block("fusedist tile -c configs/tile/pairs.yaml --inptu data/slides"))
    assert len(errors) == 1
    assert errors[0].startswith("docs/x.md:7: `fusedist tile` has no option --inptu")
    assert "did you mean --input?" in errors[0]


@pytest.mark.parametrize("script, expected", [
    ("fusedist tiel -i x", "`fusedist tiel`: no such command"),
    ("fusedist launch validat k8s/", "`fusedist launch validat`: no stage named"),
    ("fusedist launch render distill -c a.yaml --aply", "`fusedist launch render` has no "
                                                         "option --aply"),
    ("fusedist launch tile -c x.yaml -- --workrs 2", "`fusedist tile` has no option --workrs"),
    ("cd x && FOO=1 timeout 9 fusedist synth --nope", "`fusedist synth` has no option --nope"),
    ("make demo && make tests", "`make tests`: the Makefile has no target 'tests'"),
    ("fusedist tile -c configs/tile/pairz.yaml", "configs/tile/pairz.yaml: no such file"),
    (".venv/bin/python benchmarks/tilling.py", "benchmarks/tilling.py: no such file"),
])
def test_commands_are_checked_against_the_cli_and_makefile(script, expected):
    errors = check_block(_block(script))
    assert len(errors) == 1 and expected in errors[0], errors


def test_valid_commands_pass():
    script = _md("""
        fusedist tile --config configs/tile/pairs.yaml --input data/slides --output data/tiles \\
            --set min_tissue=0.4 --set tissue.thumbnail_mpp=4   # a comment --nope
        fusedist cache --tiles data/tiles/pairs -t test-vit -t test-vit-reg -q --debug
        fusedist launch tile -c configs/tile/s3.yaml --address http://127.0.0.1:8265
        fusedist launch validate k8s/ && fusedist export data/runs/xmag -o out
        .venv/bin/fusedist predict -m model --bags b | tee log.txt
        make docs reference VENV=.venv
        """)
    assert check_block(_block(script)) == []


# ----------------------------------------------------------------------------- running (unit)

def test_run_blocks_run_in_order_in_one_folder(tmp_path):
    blocks = [_block("echo hi > a.txt", "run"), _block("echo never > b.txt", "needs: gpu"),
              _block("test -f a.txt && ! test -e b.txt && echo ok > c.txt", "run")]
    run_blocks(blocks, tmp_path, dict(os.environ))
    assert (tmp_path / "c.txt").read_text() == "ok\n"


def test_a_failing_run_block_is_reported_with_file_line_block_and_output(tmp_path):
    block = Block("docs/x.md", 12, "bash", "run", "", "echo before\nfalse | cat\necho after")
    with pytest.raises(BlockFailed) as err:
        run_blocks([block], tmp_path, dict(os.environ))
    msg = str(err.value)
    assert msg.startswith("docs/x.md:12: a <!-- run --> block failed (exit status 1)")
    assert "false | cat" in msg and "before" in msg  # the block and the output tail
    assert "after" not in msg.split("--- output")[1]  # pipefail and -e stopped it


def test_a_hanging_run_block_times_out(tmp_path):
    with pytest.raises(BlockFailed, match=r"docs/x.md:7: .*timed out after 1 s"):
        run_blocks([_block("echo started; sleep 30", "run")], tmp_path, dict(os.environ),
                   timeout_s=1)


# ----------------------------------------------------------------------------- the real docs

@pytest.mark.parametrize("path", DOC_FILES, ids=DOC_IDS)
def test_shell_blocks_are_marked_and_their_commands_exist(path):
    blocks, errors = _scan(path)
    for block in blocks:
        errors += check_block(block)
    assert not errors, "\n".join(errors)


def _block_env(work: Path, endpoint: str) -> dict[str, str]:
    """What a reader has after `make venv`: the venv first on PATH, a local MLflow, an S3."""
    env = {k: v for k, v in os.environ.items()
           if k not in _UNSET and k != "RAY_ADDRESS" and not k.startswith("PYTEST_")}
    env.update(FAKE_ENV)
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
        "FUSEDIST_LOG_DIR": str(work / ".logs"),
        "FUSEDIST_CACHE": str(work / ".cache"),
    })
    return env


def _fresh_bucket(endpoint: str):
    import boto3

    bucket = boto3.resource("s3", endpoint_url=endpoint).Bucket(DEMO_BUCKET)
    if bucket.creation_date is not None:  # left by an earlier file's blocks
        bucket.objects.all().delete()
    else:
        bucket.create()
    return bucket


@pytest.mark.parametrize("path", DOC_FILES, ids=DOC_IDS)
def test_run_blocks_work(path, tmp_path, request):
    blocks, _ = _scan(path)  # marker errors are the test above's
    runnable = [b for b in blocks if b.marker == "run"]
    if not runnable:
        return
    endpoint = request.getfixturevalue("moto_server")  # started only for files that run
    _fresh_bucket(endpoint)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    try:
        run_blocks(runnable, tmp_path, _block_env(tmp_path, endpoint))
    except BlockFailed as e:
        pytest.fail(str(e), pytrace=False)  # the message is the report; no env in a traceback


# ----------------------------------------------------------------------------- the site

# Every way out to the network fails, so a plugin or theme that fetches anything at build time
# (fonts, icons, a social card) fails this test instead of hanging CI without a network.
_OFFLINE_MKDOCS = """
import socket, sys
def _no_network(*a, **k):
    raise OSError("the docs build tried to reach the network: %r" % (a,))
socket.socket.connect = socket.socket.connect_ex = _no_network
socket.create_connection = socket.getaddrinfo = _no_network
from mkdocs.__main__ import cli
sys.argv = ["mkdocs", "build", "--strict", "--site-dir", sys.argv[1]]
cli()
"""


def test_site_builds_strict_and_offline(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_MKDOCS, str(site)], cwd=REPO,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, (f"`make docs` (mkdocs build --strict) fails:\n"
                                  f"{proc.stdout[-6000:]}")
    # Pages in the nav are built, the generated reference included; no web fonts.
    assert (site / "reference" / "tile" / "index.html").is_file()
    html = (site / "index.html").read_text()
    assert "fonts.googleapis" not in html and "fonts.gstatic" not in html
