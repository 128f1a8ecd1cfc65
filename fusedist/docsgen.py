"""Write the config reference (``docs/reference/``) from the stage config models themselves.

``python -m fusedist.docsgen`` (or ``make reference``) writes one page per stage: every YAML
key with its full path (``engine.batch_size``), type, default and docstring, nested sections
included. The pages are committed; ``tests/test_docs.py`` fails when they differ from what this
writes, or when a field has no docstring, so the reference can never drift from the code.

Nothing here depends on the machine (no paths, no environment, no dict order beyond the
models' own field order), so two runs anywhere write the same bytes.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import json
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import annotated_types as at
import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from fusedist.recipes import RECIPE_MODELS

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "docs" / "reference"
REGENERATE = "make reference"  # = python -m fusedist.docsgen


@dataclass(frozen=True)
class Page:
    slug: str       # docs/reference/<slug>.md
    command: str    # how a user runs the stage
    target: str     # "module:ConfigClass"
    recipes: str | None  # configs/<folder>/ holding its YAML recipes, if any

    @property
    def model(self) -> type[BaseModel]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


def _pages() -> list[Page]:
    """Every stage's top-level config, in pipeline order. The recipe stages come from
    ``RECIPE_MODELS`` (so a new stage registered there gets a page, or this fails loudly);
    ``export`` and ``demo`` are configured by flags and ``--set`` only."""
    order = ["synth", "tile", "cache", "embed", "distill", "export", "fuse", "predict",
             "retrain", "launch", "demo"]
    commands = {"launch": "fusedist launch render <stage> -l <launch.yaml>",
                "export": "fusedist export <checkpoint>"}
    targets = {**RECIPE_MODELS, "export": "fusedist.distill.config:ExportConfig",
               "demo": "fusedist.demo:DemoConfig"}
    missing = sorted(set(targets) - set(order))
    if missing:
        raise RuntimeError(f"fusedist.docsgen: no reference page order for {missing}; add them "
                           "to the order in fusedist/docsgen.py:_pages")
    return [Page(s, commands.get(s, f"fusedist {s} -c <recipe.yaml>"), targets[s],
                 f"configs/{s}/" if s in RECIPE_MODELS else None) for s in order]


PAGES = _pages()


# ----------------------------------------------------------------------------- types

def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def type_name(tp: Any) -> str:
    """A readable type: ``int``, ``float | None``, ``list[str]``, ``"a" | "b"``."""
    if tp is type(None) or tp is None:
        return "None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if tp is typing.Any:
        return "any"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


_BOUNDS = [(at.Gt, "gt", ">"), (at.Ge, "ge", ">="), (at.Lt, "lt", "<"), (at.Le, "le", "<=")]


def constraints(info: FieldInfo) -> list[str]:
    """Bounds from ``Field(gt=..., le=...)``: shown beside the type, since a user sets them."""
    out = []
    for meta in info.metadata:
        for cls, attr, sym in _BOUNDS:
            if isinstance(meta, cls):
                out.append(f"{sym} {getattr(meta, attr)}")
        if isinstance(meta, at.MinLen):
            out.append(f"at least {meta.min_length} long")
        if isinstance(meta, at.MaxLen):
            out.append(f"at most {meta.max_length} long")
    return out


def models_in(tp: Any) -> list[tuple[str, type[BaseModel]]]:
    """The config models a field holds, with how its YAML path continues into them:
    ``""`` (a section), ``"[]"`` (a list of them) or ``".<name>"`` (a mapping of them)."""
    if _is_model(tp):
        return [("", tp)]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return [m for a in args for m in models_in(a)]
    if origin in (list, tuple, set, frozenset):
        return [("[]", m) for _, m in (x for a in args for x in models_in(a))]
    if origin is dict and len(args) == 2:
        return [(".<name>", m) for _, m in models_in(args[1])]
    return []


# ----------------------------------------------------------------------------- values

def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, enum.Enum):
        return value.value
    return TypeAdapter(Any).dump_python(value, mode="json")


def yaml_value(value: Any) -> str:
    """A default as one line of YAML (``null``, ``true``, ``[a, b]``, ``{k: 1}``)."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6,
                          sort_keys=False, allow_unicode=True).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def default_of(info: FieldInfo) -> tuple[bool, Any]:
    """(required, default) with ``default_factory`` evaluated."""
    if info.default_factory is not None:
        return False, info.default_factory()
    if info.default is PydanticUndefined:
        return True, None
    return False, info.default


# ----------------------------------------------------------------------------- markdown

_CODE = re.compile(r"(`+)(.+?)\1", re.S)
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def _escape_prose(text: str) -> str:
    """Prose outside code spans: ``<slide>`` must not become an HTML tag, ``*`` no emphasis."""
    text = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text.replace("\\", "\\\\"))
    return text.replace("*", "\\*").replace("|", "\\|")


def md_text(doc: str) -> str:
    """A docstring (reStructuredText-ish) as one line of Markdown for a table cell."""
    doc = _ROLE.sub(r"``\1``", doc)
    doc = re.sub(r"\s*\n\s*\n\s*", "\0", doc.strip())  # paragraph breaks, kept below
    doc = re.sub(r"\s+", " ", doc)
    out, pos = [], 0
    for m in _CODE.finditer(doc):
        out.append(_escape_prose(doc[pos:m.start()]))
        out.append(code(m.group(2)))
        pos = m.end()
    out.append(_escape_prose(doc[pos:]))
    return "".join(out).replace("\0", "<br><br>")


def code(text: str) -> str:
    """An inline code span safe inside a table cell. A ``|`` splits it into spans joined by an
    escaped ``\\|``: inside a code span the escape would show literally in MkDocs, and an
    unescaped one ends the cell on GitHub."""
    if "|" in text:
        return " \\| ".join(code(part.strip()) for part in text.split("|"))
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def anchor(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


@dataclass
class Section:
    path: str                 # YAML path of the section ("" for the top level)
    model: type[BaseModel]
    rows: list[str] = field(default_factory=list)


def _linked_page(model: type[BaseModel], top: type[BaseModel]) -> Page | None:
    """A nested stage config (``retrain``'s ``tile`` ...) links to its own page, not repeated."""
    return next((p for p in PAGES if p.model is model and model is not top), None)


def _row(key: str, type_text: str, default: str, doc: str) -> str:
    return f"| {code(key)} | {type_text} | {default} | {doc} |"


def collect(top: type[BaseModel]) -> list[Section]:
    """The top level and every nested section, depth first in field order."""
    sections: list[Section] = []

    def visit(path: str, model: type[BaseModel]) -> None:
        sec = Section(path, model)
        sections.append(sec)
        nested: list[tuple[str, type[BaseModel]]] = []
        for name, info in model.model_fields.items():
            key = f"{path}.{name}" if path else name
            doc = md_text(info.description or "")
            required, default = default_of(info)
            held = models_in(info.annotation)
            links = []
            for suffix, sub in held:
                page = _linked_page(sub, top)
                if page is not None:
                    links.append(f"{'Each value' if suffix else 'It'} takes the keys of "
                                 f"[{page.slug}]({page.slug}.md).")
                else:
                    nested.append((key + suffix, sub))
                    links.append(f"Keys: [below](#{anchor(key + suffix)}).")
            kind = type_name(info.annotation)
            shown = [code(kind)] + constraints(info)
            if required:
                default_text = "**required**"
            elif held and _is_model(info.annotation):
                default_text = "(section)"
            else:
                default_text = code(yaml_value(default))
            sec.rows.append(_row(key, ", ".join(shown), default_text,
                                 " ".join(x for x in [doc, *links] if x)))
        for sub_path, sub in nested:
            visit(sub_path, sub)

    visit("", top)
    return sections


def _doc(model: type[BaseModel]) -> str:
    import inspect

    return md_text(inspect.cleandoc(model.__doc__ or ""))


def _example(model: type[BaseModel]) -> str:
    """`` (e.g. `--set tissue.thumbnail_mpp=8.0`)``: the first key of a nested section (the
    dotted form is the one people get wrong), with its default."""
    for sec in collect(model)[1:]:
        if "[" in sec.path or "<" in sec.path:
            continue  # list items and named entries have no --set form
        for name, info in sec.model.model_fields.items():
            required, default = default_of(info)
            if not required and default is not None and not models_in(info.annotation):
                return f" (e.g. `--set {sec.path}.{name}={yaml_value(default)}`)"
    return ""


def render_page(page: Page) -> str:
    model = page.model
    lines = [f"# {page.slug}", "",
             f"<!-- Generated by `{REGENERATE}` (python -m fusedist.docsgen) from "
             f"{model.__module__}.{model.__name__}. Do not edit: change the field docstrings "
             "and regenerate. -->", "",
             f"`{page.command}` builds a `{model.__name__}`. {_doc(model)}", ""]
    if page.recipes:
        lines += [f"Recipes: `{page.recipes}`. Any key can also be set on the command line "
                  f"with `--set key=value`{_example(model)}.", ""]
    else:
        lines += [f"Set keys with `--set key=value`{_example(model)}.", ""]
    header = ["| key | type | default | description |", "|---|---|---|---|"]
    for sec in collect(model):
        if sec.path:
            lines += [f"## {code(sec.path)} {{ #{anchor(sec.path)} }}", "", _doc(sec.model), ""]
        else:
            lines += ["## Top-level keys", ""]
        lines += header + sec.rows + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def render_index() -> str:
    lines = ["# Config reference", "",
             f"<!-- Generated by `{REGENERATE}` (python -m fusedist.docsgen). Do not edit. -->",
             "",
             "Every stage reads one typed config: defaults, then a YAML recipe (`-c`), then "
             "`--set key=value` overrides and the stage's flags. Unknown keys and bad values "
             "fail before any work starts. These pages are generated from the config models "
             "(each field's docstring is its documentation); `fusedist <stage> --print-config` "
             "prints the resolved config of a run.", "",
             "Nested keys are written with dots in `--set` (`--set tissue.thumbnail_mpp=4`) "
             "and as nested mappings in YAML. `[]` in a key path is a list of such mappings, "
             "`<name>` a mapping keyed by your own names.", "",
             "| stage | command | config | recipes |", "|---|---|---|---|"]
    for p in PAGES:
        lines.append(f"| [{p.slug}]({p.slug}.md) | {code(p.command)} | "
                     f"{code(p.model.__name__)} | {code(p.recipes) if p.recipes else '-'} |")
    return "\n".join(lines) + "\n"


def render_all() -> dict[str, str]:
    """File name under ``docs/reference/`` -> its content."""
    return {"index.md": render_index(), **{f"{p.slug}.md": render_page(p) for p in PAGES}}


def undocumented() -> list[str]:
    """``Model.field`` (and where it is used) for every field without a docstring."""
    out: set[str] = set()
    for p in PAGES:
        for sec in collect(p.model):
            for name, info in sec.model.model_fields.items():
                if not (info.description or "").strip():
                    out.add(f"{sec.model.__module__}.{sec.model.__name__}.{name}")
    return sorted(out)


def stale(out_dir: Path = OUT_DIR) -> list[str]:
    """Files under ``out_dir`` that differ from, lack or are not in what ``render_all`` writes."""
    want = render_all()
    have = {p.name for p in out_dir.glob("*.md")} if out_dir.is_dir() else set()
    diff = [n for n in sorted(want) if n not in have or (out_dir / n).read_text() != want[n]]
    return diff + sorted(have - set(want))


def write(out_dir: Path = OUT_DIR) -> list[str]:
    """Write the reference; remove pages of stages that no longer exist. Returns changed names."""
    changed = stale(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    want = render_all()
    for name in changed:
        if name in want:
            (out_dir / name).write_text(want[name])
        else:
            (out_dir / name).unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusedist.docsgen", description=__doc__)
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the committed reference is stale")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="default: docs/reference/")
    args = ap.parse_args(argv)
    missing = undocumented()
    if missing:
        print("fields without a docstring (add one under each field):\n  "
              + "\n  ".join(missing), file=sys.stderr)
    if args.check:
        bad = stale(args.out)
        if bad:
            print(f"stale in {args.out}: {', '.join(bad)}; run {REGENERATE}", file=sys.stderr)
        return 1 if bad or missing else 0
    changed = write(args.out)
    print(f"{len(changed)} file(s) changed in {args.out}" + (f": {', '.join(changed)}"
                                                             if changed else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
