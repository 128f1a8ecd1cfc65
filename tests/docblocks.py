"""Shell blocks in the docs: find them, check their markers and commands, run them.

The convention (docs/contributing.md): every fenced block whose info string is ``bash``,
``sh``, ``shell`` or ``console`` has, on the line right above its opening fence, exactly one of

    <!-- run -->                 executed by tests/test_docs.py, in order, one temp folder per file
    <!-- needs: gpu -->          not executed (needs a GPU) ...
    <!-- needs: cluster -->      ... a Ray or Kubernetes cluster
    <!-- needs: credentials -->  ... real credentials (a registry, S3, a hub token)
    <!-- needs: long -->         ... more time than the test suite has (the demo, benchmarks)

Every ``fusedist ...`` and ``make ...`` command in any marked block is checked against the
real CLI (subcommands and flags, from its click tree) and the Makefile's targets, so a renamed
flag fails the suite rather than a reader.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHELL_LANGS = {"bash", "sh", "shell", "console"}
NEEDS = ("gpu", "cluster", "credentials", "long")
MARKERS = ("run", *(f"needs: {n}" for n in NEEDS))
CONVENTION = ("put one of " + ", ".join(f"<!-- {m} -->" for m in MARKERS)
              + " on the line right above the opening fence (docs/contributing.md)")

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")
_COMMENT = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")
# A comment that looks meant as a marker (so a typo is reported, not silently ignored).
_MARKERISH = re.compile(r"^(run|needs?\b)", re.I)


@dataclass(frozen=True)
class Block:
    file: str     # path as reported (relative to the repository)
    line: int     # 1-based line of the opening fence
    lang: str
    marker: str   # one of MARKERS
    body: str     # the block's text, fence indentation removed
    script: str   # what runs: the body, or a console block's `$ ` commands

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _lang(info: str) -> str:
    """``bash``, ``{.bash}``, ``bash title="x"`` -> ``bash``."""
    first = info.split()[0] if info.split() else ""
    return first.strip("{}.").lower()


def console_commands(body: str) -> str:
    """The commands of a ``console`` block: ``$ `` lines and their ``\\`` continuations."""
    out, continuing = [], False
    for line in body.splitlines():
        if continuing or line.startswith("$ "):
            out.append(line if continuing else line[2:])
            continuing = line.rstrip().endswith("\\")
    return "\n".join(out)


def scan(text: str, file: str) -> tuple[list[Block], list[str]]:
    """The marked shell blocks of one Markdown file, and every convention error in it."""
    lines = text.splitlines()
    blocks, errors = [], []
    used_markers: set[int] = set()  # line indexes of markers that sit above a shell block
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], _lang(m["info"])
        end = i + 1
        while end < len(lines):
            close = lines[end].strip()
            if close and set(close) == {fence[0]} and len(close) >= len(fence):
                break
            end += 1
        body = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln.lstrip()
                         for ln in lines[i + 1:end])
        if lang in SHELL_LANGS:
            where = f"{file}:{i + 1}"
            prev = _COMMENT.match(lines[i - 1]) if i > 0 else None
            marker = prev["body"] if prev else None
            if marker is not None and re.sub(r"\s+", " ", marker) in MARKERS:
                marker = re.sub(r"\s+", " ", marker)
                used_markers.add(i - 1)
                script = console_commands(body) if lang == "console" else body
                blocks.append(Block(file, i + 1, lang, marker, body, script))
            elif marker is not None and _MARKERISH.match(marker):
                used_markers.add(i - 1)
                errors.append(f"{where}: unknown marker <!-- {marker} --> above a {lang} block; "
                              f"{CONVENTION}")
            else:
                errors.append(f"{where}: {lang} block without a marker; {CONVENTION}")
        i = end + 1
    errors += _stray_markers(lines, used_markers, file)
    return blocks, errors


def _stray_markers(lines: list[str], used: set[int], file: str) -> list[str]:
    """Markers that are not directly above a shell block (a blank line between, two markers,
    a marker above a ``python`` block) would silently mark nothing."""
    out, in_fence = [], None
    for i, line in enumerate(lines):
        m = _FENCE.match(line)
        if m and in_fence is None:
            in_fence = m["fence"]
            continue
        if in_fence is not None:
            close = line.strip()
            if close and set(close) == {in_fence[0]} and len(close) >= len(in_fence):
                in_fence = None
            continue
        c = _COMMENT.match(line)
        if c and _MARKERISH.match(c["body"]) and i not in used:
            out.append(f"{file}:{i + 1}: marker <!-- {c['body']} --> is not on the line right "
                       "above a bash/sh/shell/console fence; move it there or remove it")
    return out


# ----------------------------------------------------------------------------- static checks

_SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", "|&", ";;", "\n"}
_WRAPPERS = {"time", "env", "nice", "exec", "command", "nohup"}
_ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def simple_commands(script: str) -> list[list[str]]:
    """The script's simple commands as token lists (comments dropped, ``\\``-continued and
    quoted multi-line arguments joined, split at ``&&``, ``|``, ``;``...)."""
    out: list[list[str]] = []
    pending, heredoc = "", None
    for line in script.replace("\\\n", " ").splitlines():
        if heredoc is not None:  # a here-document's text is data, not commands
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        pending = f"{pending}\n{line}" if pending else line
        lexer = shlex.shlex(pending, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError:  # an open quote: the argument goes on on the next line
            continue
        pending = ""
        if "<<" in tokens[:-1]:
            heredoc = tokens[tokens.index("<<") + 1].lstrip("-")
        cur: list[str] = []
        for tok in tokens:
            if tok in _SEPARATORS:
                if cur:
                    out.append(cur)
                cur = []
            else:
                cur.append(tok)
        if cur:
            out.append(cur)
    return out


def command_word(tokens: list[str]) -> int | None:
    """Index of the program a simple command runs, past ``VAR=x`` and ``time``/``timeout N``."""
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if _ENV_ASSIGN.match(tok) or tok in _WRAPPERS:
            i += 1
        elif tok == "timeout":
            i += 2
        else:
            return i
    return None


@lru_cache(maxsize=1)
def cli_root():
    import typer.main

    from fusedist.cli import app

    return typer.main.get_command(app)


def _is_group(cmd) -> bool:
    # Duck-typed: typer ships its own copy of click (typer._click), so isinstance checks
    # against the `click` package would be false.
    return isinstance(getattr(cmd, "commands", None), dict)


def _option_table(cmd) -> dict[str, bool]:
    """``--flag`` / ``-f`` -> whether it takes a value, for one click command."""
    table = {"--help": False, "--debug": False}  # --debug: fusedist.cli.main takes it anywhere
    for p in cmd.params:
        if p.param_type_name == "option":
            takes = not (p.is_flag or p.count)
            for o in (*p.opts, *p.secondary_opts):
                table[o] = takes
    return table


def _check_options(cmd, args: list[str], name: str) -> tuple[list[str], list[str]]:
    """(errors, positional args) for options of ``cmd`` used in ``args``."""
    table = _option_table(cmd)
    errors, positional, i = [], [], 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            positional += args[i + 1:]
            break
        opt = tok.split("=", 1)[0] if tok.startswith("--") else tok[:2]
        if tok.startswith("-") and len(tok) > 1 and not re.match(r"^-\d", tok):
            if opt not in table:
                known = ", ".join(sorted(o for o in table if o.startswith("--")))
                errors.append(f"`{name}` has no option {opt}{_did_you_mean(opt, table)} "
                              f"(its options: {known})")
            elif table[opt] and "=" not in tok and len(tok) == len(opt):
                i += 1  # the option's value, which may itself start with '-'
        else:
            positional.append(tok)
        i += 1
    return errors, positional


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def check_fusedist(args: list[str]) -> list[str]:
    """Errors for ``fusedist <args>``: unknown (sub)commands and unknown options."""
    from fusedist.launch.commands import _LaunchGroup

    cmd, name, rest = cli_root(), "fusedist", list(args)
    while _is_group(cmd):
        at = next((k for k, a in enumerate(rest) if not a.startswith("-")), len(rest))
        errors, _ = _check_options(cmd, rest[:at], name)  # the group's own options
        if errors or at == len(rest):
            return errors  # `fusedist`, `fusedist launch --help`
        sub, rest = rest[at], rest[at + 1:]
        if sub not in cmd.commands and isinstance(cmd, _LaunchGroup):
            sub, rest = "submit", [sub, *rest]  # `fusedist launch tile` = `launch submit tile`
        if sub not in cmd.commands:
            return [f"`{name} {sub}`: no such command{_did_you_mean(sub, cmd.commands)} "
                    f"(there are: {', '.join(sorted(cmd.commands))})"]
        cmd, name = cmd.commands[sub], f"{name} {sub}"
    if name == "fusedist launch submit":
        return _check_submit(cmd, rest)
    return _check_options(cmd, rest, name)[0]


def _check_submit(cmd, args: list[str]) -> list[str]:
    """``launch submit <stage> [opts] [-- stage args]``: the stage must exist; the options
    ``submit`` does not know are handed to ``fusedist <stage>``, so they are checked there."""
    root = cli_root()
    mine, theirs = [], []
    table = _option_table(cmd)
    stage_args = args[args.index("--") + 1:] if "--" in args else []
    args = args[:args.index("--")] if "--" in args else args
    i = 0
    while i < len(args):
        tok = args[i]
        opt = tok.split("=", 1)[0] if tok.startswith("--") else tok[:2]
        target = mine if not tok.startswith("-") or opt in table else theirs
        target.append(tok)
        if tok.startswith("-") and table.get(opt) and "=" not in tok and i + 1 < len(args):
            target.append(args[i + 1])
            i += 1
        i += 1
    errors, positional = _check_options(cmd, mine, "fusedist launch submit")
    if not positional:
        return errors + ["`fusedist launch` needs a stage (e.g. `fusedist launch tile ...`)"]
    stage = positional[0]
    if stage not in root.commands or _is_group(root.commands[stage]):
        return errors + [f"`fusedist launch {stage}`: no stage named {stage!r}"]
    return errors + check_fusedist([stage, *theirs, *stage_args])


@lru_cache(maxsize=1)
def make_targets() -> frozenset[str]:
    rule = re.compile(r"^([A-Za-z0-9_./-][A-Za-z0-9_./ -]*?)\s*::?(?!=)")
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        m = rule.match(line)
        if m and not line.startswith(("\t", ".")) and "=" not in line.split(":")[0]:
            targets.update(m.group(1).split())
    return frozenset(t for t in targets if "$" not in t and "/" not in t)


def check_make(args: list[str]) -> list[str]:
    if any(a in ("-C", "-f", "--directory", "--file") for a in args):
        return []  # another Makefile: not ours to check
    targets = [a for a in args if not a.startswith("-") and "=" not in a]
    return [f"`make {t}`: the Makefile has no target {t!r} (targets: "
            f"{', '.join(sorted(make_targets()))})" for t in targets if t not in make_targets()]


# Arguments under these folders name files of the repository (a recipe, a benchmark script, a
# manifest folder); a renamed or deleted one is a broken command in the docs.
REPO_DIRS = ("configs/", "benchmarks/", "k8s/", "launch/")


def check_paths(tokens: list[str]) -> list[str]:
    out = []
    for tok in tokens:
        value = tok.split("=", 1)[1] if tok.startswith("-") and "=" in tok else tok
        if value.startswith(REPO_DIRS) and not any(c in value for c in "*?$<"):
            if not (REPO / value).exists():
                out.append(f"{value}: no such file in the repository")
    return out


def check_block(block: Block) -> list[str]:
    """Every ``fusedist`` and ``make`` command of a block, and every repository path it names,
    checked; errors name file:line."""
    errors = []
    for tokens in simple_commands(block.script):
        i = command_word(tokens)
        if i is None:
            continue
        errors += [f"{block.where}: {e}\n    in: {' '.join(tokens)}" for e in check_paths(tokens)]
        prog = os.path.basename(tokens[i])
        found = (check_fusedist(tokens[i + 1:]) if prog == "fusedist"
                 else check_make(tokens[i + 1:]) if prog == "make" else [])
        errors += [f"{block.where}: {e}\n    in: {' '.join(tokens)}" for e in found]
    return errors


# ----------------------------------------------------------------------------- running

BLOCK_TIMEOUT_S = 300
TAIL_CHARS = 4000


class BlockFailed(AssertionError):
    pass


def run_blocks(blocks: list[Block], cwd: Path, env: dict[str, str],
               timeout_s: float = BLOCK_TIMEOUT_S) -> None:
    """Run ``run`` blocks in order in ``cwd`` with ``bash -euo pipefail``; the first failure
    raises :class:`BlockFailed` with file:line, the block and the output's tail."""
    for block in blocks:
        if block.marker != "run":
            continue
        try:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.script], cwd=cwd,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, text=True)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
            raise BlockFailed(_report(block, f"timed out after {timeout_s:.0f} s", out or ""))
        if proc.returncode != 0:
            raise BlockFailed(_report(block, f"exit status {proc.returncode}", proc.stdout))


def _report(block: Block, what: str, output: str) -> str:
    tail = output[-TAIL_CHARS:]
    return (f"{block.where}: a <!-- run --> block failed ({what}). Fix the command or the "
            f"docs, or mark it <!-- needs: ... --> if it cannot run here.\n"
            f"--- block ---\n{block.script}\n--- output (last {TAIL_CHARS} chars) ---\n{tail}")
