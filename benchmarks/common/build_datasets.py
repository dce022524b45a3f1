"""Three instruction datasets of real human-written text, built offline.

    python -m benchmarks.common.build_datasets --out data/bench [--seed 0]

Sources on every machine that runs this project (no download):

- ``stdlib-docs``: docstrings of the Python standard library's public functions
  and classes ("What does `json.dumps` do?" -> the docstring's first paragraphs).
- ``manpages``: Debian manual pages in /usr/share/man/man1 ("What does the
  `ls` command do?" -> the NAME line and the first DESCRIPTION paragraphs).
- ``python-reference``: the Python language reference shipped as
  ``pydoc_data.topics`` (one row per paragraph, asked about its topic).

Each goes to OUT/<name>/train.jsonl and eval.jsonl (10% held out), in alpaca
format. Same seed, same files. Rows are capped at 600 output characters.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import inspect
import json
import pkgutil
import random
import re
import sys
import warnings
from pathlib import Path

MAX_OUTPUT = 600
SIZES = {"stdlib-docs": 3000, "manpages": 1500, "python-reference": 800}


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def clip(text: str) -> str:
    text = clean(text)
    if len(text) <= MAX_OUTPUT:
        return text
    cut = text[:MAX_OUTPUT]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > 200 else cut


def stdlib_rows() -> list[dict[str, str]]:
    rows = []
    skip = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv", "pydoc_data")
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names and not m.name.startswith("_"))
    for module_name in names:
        if module_name.startswith(skip):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except Exception:  # some stdlib modules need optional system libraries
            continue
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            paragraphs = [p for p in doc.split("\n\n") if p.strip()]
            if not paragraphs or len(clean(paragraphs[0])) < 40:
                continue
            kind = "class" if inspect.isclass(obj) else "function"
            rows.append({"instruction": f"What does the Python {kind} `{module_name}.{attr}` do?", "input": "", "output": clip(" ".join(paragraphs[:2]))})
    return rows


_ROFF_ESCAPES = [
    (r"\\f[BIRP1-4]", ""), (r"\\f\(..", ""), (r"\\\(em", "-"), (r"\\\(en", "-"), (r"\\-", "-"),
    (r"\\\(aq", "'"), (r"\\\(dq", '"'), (r"\\\(.{2}", ""), (r"\\&", ""), (r"\\e", "\\\\"), (r"\\ ", " "), (r"\\[|^]", ""),
]


def roff_text(lines: list[str]) -> str:
    out = []
    for line in lines:
        if line.startswith((".\\\"", "'\\\"")):
            continue
        if line.startswith("."):
            macro, _, rest = line.partition(" ")
            if macro in (".B", ".I", ".BR", ".IR", ".RB", ".BI", ".IB", ".RI", ".SM"):
                line = rest.replace('"', "")
            elif macro in (".PP", ".LP", ".P", ".TP", ".IP", ".sp", ".br"):
                out.append("\n\n" if macro in (".PP", ".LP", ".P") else " ")
                continue
            else:
                continue
        for pattern, repl in _ROFF_ESCAPES:
            line = re.sub(pattern, repl, line)
        out.append(line + " ")
    return "".join(out)


def manpage_rows() -> list[dict[str, str]]:
    rows = []
    for path in sorted(Path("/usr/share/man/man1").glob("*.1.gz")):
        try:
            source = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        sections: dict[str, list[str]] = {}
        current = None
        for line in source.splitlines():
            if line.startswith((".SH", ".Sh")):
                current = line[3:].strip().strip('"').upper()
                sections[current] = []
            elif current:
                sections[current].append(line)
        name = clean(roff_text(sections.get("NAME", [])))
        description = [p for p in roff_text(sections.get("DESCRIPTION", [])).split("\n\n") if clean(p)]
        command = path.name[: -len(".1.gz")]
        if " - " not in name or not description or len(clean(description[0])) < 60:
            continue
        summary = name.split(" - ", 1)[1]
        rows.append({"instruction": f"What does the `{command}` command do?", "input": "", "output": clip(f"{command} - {summary}. " + " ".join(description[:2]))})
    return rows


def reference_rows() -> list[dict[str, str]]:
    from pydoc_data.topics import topics

    rows = []
    for topic, text in sorted(topics.items()):
        title = text.strip().splitlines()[0].strip()
        for paragraph in text.split("\n\n")[1:]:
            paragraph = clean(paragraph)
            if len(paragraph) < 150 or paragraph.startswith(("*", "|", ">>>")):
                continue
            rows.append({"instruction": f"Explain this part of the Python language reference on {title}.", "input": "", "output": clip(paragraph)})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    builders = {"stdlib-docs": stdlib_rows, "manpages": manpage_rows, "python-reference": reference_rows}
    print("| dataset | train rows | eval rows | mean output chars |")
    print("|---|---|---|---|")
    for name, build in builders.items():
        rows, seen = [], set()
        for row in build():
            if row["output"] and row["output"] not in seen:
                seen.add(row["output"])
                rows.append(row)
        if len(rows) < 100:
            raise SystemExit(f"{name}: only {len(rows)} rows found; is the source installed (see the module docstring)?")
        rng = random.Random(args.seed)
        rng.shuffle(rows)
        rows = rows[: SIZES[name]]
        n_eval = max(20, len(rows) // 10)
        write_jsonl(args.out / name / "eval.jsonl", rows[:n_eval])
        write_jsonl(args.out / name / "train.jsonl", rows[n_eval:])
        mean = sum(len(r["output"]) for r in rows) / len(rows)
        print(f"| {name} | {len(rows) - n_eval} | {n_eval} | {mean:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
