"""mkdocs hooks: the pages that are generated at build time, so that they cannot drift from their source.

* ``configuration.md`` from ``scalegen/config.py``'s typed schema: every key, its type, default, range and
  the comments written beside it (``config_reference``);
* ``results/*.md`` from the JSON the benchmarks write (``docs/results/*.json``, ``docs/claims.json``):
  each figure beside the command, date and commit that produced it (``results_page``).

mkdocs loads this file through ``hooks:`` in mkdocs.yml; ``tests/test_docs.py`` imports it directly.
Nothing here imports torch: the schema module needs only the standard library and PyYAML.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import io
import json
import re
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
CLAIMS = ROOT / "docs" / "claims.json"


def _cell(text: Any) -> str:
    """One Markdown table cell: no newlines, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


# ---------------------------------------------------------------------------------------------------
# Configuration reference


def _comments(source: str) -> dict[tuple[str, str], str]:
    """(class, field) -> the comment lines written directly above the field plus its trailing comment."""
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][: tok.start[1]].strip():
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, i = [], stmt.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                text = lines[i].strip().lstrip("#").strip()
                if re.match(r"^-{3}.*-{3,}$", text):  # a section rule ("--- compositional only ---") ends the block
                    break
                above.insert(0, text)
                i -= 1
            after = [trailing[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in trailing]
            out[(node.name, stmt.target.id)] = " ".join(above + after)
    return out


def _sections(source: str) -> dict[tuple[str, str], str]:
    """(class, first field after a '# --- title ---' rule) -> the rule's title."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            lines = source.splitlines()
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    i = stmt.lineno - 2
                    while i >= 0 and lines[i].strip().startswith("#"):
                        m = re.match(r"^#\s*-{3}\s*(.*?)\s*-{3,}$", lines[i].strip())
                        if m:
                            out[(node.name, stmt.target.id)] = m.group(1)
                            break
                        i -= 1
    return out


def _type_name(tp: Any) -> tuple[str, str]:
    """(type as a reader writes it, range) of an annotation."""
    rng = ""
    if typing.get_origin(tp) is typing.Annotated:
        base, *extras = typing.get_args(tp)
        for e in extras:
            bounds = [f"{op} {getattr(e, name):g}" for name, op in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
                      if getattr(e, name, None) is not None]
            rng = ", ".join(bounds)
        return _type_name(base)[0], rng
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args), ""
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        names = [_type_name(a) for a in rest]
        label = " or ".join(n for n, _ in names) + (" or null" if len(rest) < len(args) else "")
        return label, next((r for _, r in names if r), "")
    if origin in (list, dict, tuple):
        inner = ", ".join(_type_name(a)[0] for a in args)
        label = f"{origin.__name__}[{inner}]" if args else origin.__name__
        return label, next((r for r in (_type_name(a)[1] for a in args) if r), "")
    return getattr(tp, "__name__", str(tp)), ""


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return "`" + json.dumps(value, ensure_ascii=False) + "`"


def config_keys() -> list[str]:
    """Every dotted key of the schema, as ``scalegen train --print-config`` would list it."""
    config = _config_module()
    return config._keys(config.Config)


def _config_module():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("scalegen.config")  # the schema module: standard library + PyYAML only


def config_reference() -> str:
    """The configuration reference page, from the schema's types, defaults, ranges and comments."""
    config = _config_module()
    source = Path(config.__file__).read_text()
    comments, rules = _comments(source), _sections(source)
    out = ["# Configuration reference", "",
           "Generated from `scalegen/config.py` when the documentation is built: every key with its type, default,",
           "valid range and the comment written beside it in the schema, so this page cannot drift from the code.",
           "Set keys in a YAML file (`--config FILE`) or as `key=value` overrides on the command line; a mistyped key",
           "is an error naming the closest valid keys, a value out of range an error naming the range.",
           "`scalegen train --print-config` prints every key with its value in a given config.", "",
           "From the schema's module docstring:", ""]
    out += ["> " + ln if ln.strip() else ">" for ln in (config.__doc__ or "").strip().splitlines()]
    out.append("")
    top_hints = typing.get_type_hints(config.Config)
    for top in dataclasses.fields(config.Config):
        cls = top_hints[top.name]
        out += [f"## `{top.name}`", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [" ".join(cls.__doc__.split()), ""]
        out += _class_table(config, cls, top.name, comments, rules)
    return "\n".join(out) + "\n"


def _class_table(config, cls, prefix: str, comments, rules) -> list[str]:
    hints = typing.get_type_hints(cls, include_extras=True)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((f, tp))
            continue
        if (cls.__name__, f.name) in rules:
            rows.append(f"| **{_cell(rules[(cls.__name__, f.name)])}** | | | | |")
        name, rng = _type_name(tp)
        rows.append(f"| `{prefix}.{f.name}` | {_cell(name)} | {_cell(_default(f))} | {_cell(rng)} | "
                    f"{_cell(comments.get((cls.__name__, f.name), ''))} |")
    out = []
    if rows:
        out += ["| key | type | default | range | what it does |", "| --- | --- | --- | --- | --- |", *rows, ""]
    for f, tp in nested:
        out += [f"### `{prefix}.{f.name}`", ""]
        if tp.__doc__ and not tp.__doc__.startswith(tp.__name__ + "("):
            out += [" ".join(tp.__doc__.split()), ""]
        note = comments.get((cls.__name__, f.name))
        if note:
            out += [note, ""]
        out += _class_table(config, tp, f"{prefix}.{f.name}", comments, rules)
    return out


# ---------------------------------------------------------------------------------------------------
# Results pages


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list)) for x in v):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, ensure_ascii=False) + "`"
    return str(v)


def _is_scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list)) or (isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v))


def _generic(data: Any, title: str, depth: int = 3) -> list[str]:
    """Figures a bench wrote, whatever their shape: scalars as a key/value table, a dict of flat dicts or a
    list of flat dicts as one table, anything deeper as a subsection per key."""
    out: list[str] = []
    if isinstance(data, dict) and data and all(_is_scalar(v) for v in data.values()):
        out += ["| figure | value |", "| --- | ---: |"] + [f"| {_cell(k)} | {_cell(_fmt(v))} |" for k, v in data.items()]
        return out + [""]
    rows = list(data.items()) if isinstance(data, dict) else list(enumerate(data)) if isinstance(data, list) else []
    if rows and all(isinstance(v, dict) and all(_is_scalar(x) for x in v.values()) for _, v in rows):
        cols: list[str] = []
        for _, v in rows:
            cols += [c for c in v if c not in cols]
        out += ["| | " + " | ".join(_cell(c) for c in cols) + " |", "| --- |" + " ---: |" * len(cols)]
        out += [f"| {_cell(k)} | " + " | ".join(_cell(_fmt(v.get(c, ""))) for c in cols) + " |" for k, v in rows]
        return out + [""]
    if isinstance(data, dict):
        scalars = {k: v for k, v in data.items() if _is_scalar(v)}
        flat = {k: v for k, v in data.items() if isinstance(v, dict) and v and all(_is_scalar(x) for x in v.values())}
        if scalars:
            out += _generic(scalars, title, depth)
        groups: dict[tuple, dict] = {}  # rows with the same figures form one table: {"sds": {"psnr": ..}, "asd": ..}
        for k, v in flat.items():
            groups.setdefault(tuple(v), {})[k] = v
        for rows in groups.values():
            out += _generic(rows, title, depth)
        for k, v in data.items():
            if k not in scalars and k not in flat:
                out += [f"{'#' * min(depth, 6)} {k}", ""] + _generic(v, k, depth + 1)
        return out
    return ["```json", json.dumps(data, indent=2, ensure_ascii=False), "```", ""]


def _meta_block(meta: dict) -> list[str]:
    cmd = meta.get("command")
    cmds = cmd if isinstance(cmd, list) else [cmd] if cmd else []
    out = []
    if cmds:
        out += ["```bash", *cmds, "```", ""]
    facts = [(label, meta.get(key)) for key, label in (("date", "measured"), ("commit", "commit"), ("machine", "machine"),
                                                        ("source", "source"))]
    facts = [(label, v) for label, v in facts if v]
    if facts:
        out += ["| | |", "| --- | --- |"] + [f"| {label} | {_cell(v)} |" for label, v in facts] + [""]
    return out


def results_page(name: str, data: dict) -> str:
    """A results page from one JSON file: the command and provenance first, then every figure."""
    if not isinstance(data, dict):
        data = {"results": data}
    meta = data.get("meta", {})
    out = [f"# {data.get('title', name)}", ""]
    if data.get("description"):
        out += [data["description"], ""]
    out += _meta_block(meta) if meta else ["!!! warning \"No command recorded\"",
                                           "    This file has no `meta`: rerun its bench with `--json` to record the "
                                           "command, date and commit.", ""]
    if "tables" in data:  # figures transcribed from a documented table: columns and rows exactly as written
        for t in data["tables"]:
            if t.get("title"):
                out += [f"## {t['title']}", ""]
            if t.get("command"):
                out += ["```bash", *([t["command"]] if isinstance(t["command"], str) else t["command"]), "```", ""]
            out += ["| " + " | ".join(_cell(c) for c in t["columns"]) + " |",
                    "| " + " | ".join("---" for _ in t["columns"]) + " |"]
            out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in t["rows"]]
            out.append("")
            if t.get("note"):
                out += [t["note"], ""]
    else:
        out += _generic({k: v for k, v in data.items() if k not in ("meta", "title", "description", "notes")}, name)
    for n in data.get("notes", []):
        out += [f"- {n}"]
    if data.get("notes"):
        out.append("")
    if data.get("see"):
        out += ["The investigation behind these figures: " + ", ".join(
            f"[{Path(s).stem}](../notes/{Path(s).name})" for s in data["see"]) + ".", ""]
    out += [f"*Generated at docs build from `docs/results/{name}.json`.*", ""]
    return "\n".join(out)


def claims_page(data: dict) -> str:
    """The claims summary from docs/claims.json (the bench's own file): verdict, budget and command per claim and
    prior (``prior``: exact or learned; rows without it are exact)."""
    out = ["# Claims: verdicts", "",
           "Generated from `docs/claims.json`, the file `scalegen bench claims` writes. What each claim means, why each",
           "verdict came out as it did and the pictures are in [The papers' claims](../claims.md).", "",
           "| claim | prior | statement | verdict | seeds | steps |", "| --- | --- | --- | --- | ---: | ---: |"]
    for c in data["claims"]:
        out.append(f"| {_cell(c['id'])} | {_cell(c.get('prior', 'exact'))} | {_cell(c['claim'])} | "
                   f"**{_cell(c['verdict'])}** | {_cell(c.get('seeds', ''))} | {_cell(c.get('steps', ''))} |")
    out.append("")
    for c in data["claims"]:
        prior = c.get("prior", "exact")
        out += [f"## {c['id']}. {c['claim']} ({prior} prior)", "",
                f"Verdict: **{c['verdict']}**. Rule: {c.get('rule', '')}", ""]
        if c.get("not_defined_because"):
            out += [f"Not run: {c['not_defined_because']}.", ""]
        if c.get("command"):
            out += ["```bash", c["command"], "```", ""]
        key = c["id"] if prior == "exact" else f"{c['id']}-{prior}"
        out += _generic(c.get("numbers", {}), key, depth=3)
        if c.get("learned_prior"):
            out += _generic({"learned_prior": c["learned_prior"]}, key, depth=3)
    return "\n".join(out) + "\n"


def result_files() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def results_index(results: dict[str, dict]) -> str:
    out = ["# Results", "",
           "The current figures. Every page here is generated at docs build from a JSON file under `docs/results/`",
           "(or `docs/claims.json`), written by `scalegen bench NAME --json FILE`, which records the command line,",
           "the date and the git commit in the file's `meta`. Figures measured before the benches recorded that are",
           "transcribed from the dated notes with their commands and a `source` naming the note. To update a figure,",
           "rerun its command and commit the JSON; the page follows. How each figure was investigated, and what it",
           "replaced, is in the [dated notes](../notes/index.md).", "",
           "| page | measured | command |", "| --- | --- | --- |"]
    for name, data in results.items():
        meta = data.get("meta", {}) if isinstance(data, dict) else {}
        cmd = meta.get("command")
        cmd = cmd[0] if isinstance(cmd, list) and cmd else cmd or ""
        title = data.get("title", name) if isinstance(data, dict) else name
        out.append(f"| [{_cell(title)}]({name}.md) | {_cell(meta.get('date', ''))} | `{_cell(cmd)}` |")
    if CLAIMS.is_file():
        out.append("| [Claims: verdicts](claims.md) | see the page | `scalegen bench claims` |")
    return "\n".join(out) + "\n"


def generated_pages() -> dict[str, str]:
    """Every generated page: its path under docs/ -> its Markdown."""
    results = result_files()
    pages = {"configuration.md": config_reference(), "results/index.md": results_index(results)}
    pages.update({f"results/{name}.md": results_page(name, data) for name, data in results.items()})
    if CLAIMS.is_file():
        pages["results/claims.md"] = claims_page(json.loads(CLAIMS.read_text()))
    return pages


def on_files(files, config):
    """mkdocs event: add the generated pages to the site (nothing is written into docs/)."""
    from mkdocs.structure.files import File  # noqa: PLC0415 (mkdocs only at build; tests import this module without it)

    for path, text in generated_pages().items():
        if files.get_file_from_path(path) is not None:
            raise RuntimeError(f"docs/{path} is generated at build time; delete the hand-written copy")
        files.append(File.generated(config, path, content=text))
    return files
