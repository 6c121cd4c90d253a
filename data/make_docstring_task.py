"""Write the docstring task: ``data/docstrings/{train,dev}.json`` and ``meta.json``.

A real task on real text: from a Python docstring's body, write its summary line. The pairs come from the
standard library of the Python that runs this script — text written by CPython's authors for functions,
classes and methods. Each source file is *parsed* (``ast``), never imported, so no module's import-time code
runs. PEP 257 lays a multi-line docstring out as a summary line, a blank line, then the body; a docstring of
that layout gives the pair (body -> summary line).

Each line of the output is a row in the toolkit's prompt / response / history format (``data=chat``,
``conf/data/docstrings.yaml``)::

    {"prompt": "<INSTRUCTION>\\n\\n<body>", "response": "<summary line>", "history": [],
     "module": "json.decoder", "name": "JSONDecoder.decode", "python": "3.11.7"}

Rules (applied in this order, files in sorted order, so a Python version always gives the same files):

* files: every ``*.py`` under the standard library folder (``sysconfig``'s ``stdlib``), except test suites
  (``test/``, ``tests/``, ``idle_test/``), ``site-packages/`` and ``__pycache__/``;
* objects: module-level functions and classes, and the methods of those classes (``ast.get_docstring``
  cleans the indentation); names starting with ``_`` are skipped except ``__init__`` and ``__call__``;
* summary: the first line, followed by a blank line; 4 to 20 words, at most 120 characters, ending in ``.``,
  not a doctest or a signature (no ``>>>``, no ``(`` in its first word);
* body: everything after the blank line, whitespace kept; 60 to 700 characters, at most 40 % of its lines
  doctest lines (``>>>`` / ``...``);
* de-duplication: a pair whose summary or body (whitespace collapsed, case folded) was already taken is
  dropped (copied docstrings of overridden methods, aliases);
* split by module, so train and dev share no module: a pair whose top-level package or module (``email``,
  ``asyncio``, ``json`` ...) has ``int(sha256(name), 16) % 6 == 0`` goes to dev, the rest to train (Python
  3.11.7: 1,107 train rows from 99 top-level modules, 275 dev rows from 20);
* each split is shuffled with a fixed seed (so ``data.max_train_samples`` / ``max_eval_samples`` take a
  spread of modules).

Run from the repository root (a few seconds)::

    python data/make_docstring_task.py                 # -> data/docstrings/
    python data/make_docstring_task.py --out outputs/docstring-task
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

#: what the model is asked (also the default ``model.prefix_init_text`` of the docstring recipe)
TASK = "docstring body -> its summary line (PEP 257), from the Python standard library"  # meta.json's "task"
OUTPUT_FILES = ("train.json", "dev.json", "meta.json")
INSTRUCTION = "Write the one-line summary of this Python docstring."
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
KEEP_DUNDER = {"__init__", "__call__"}
SUMMARY_WORDS = (4, 20)
SUMMARY_CHARS = 120
BODY_CHARS = (60, 700)
MAX_DOCTEST_SHARE = 0.4
DEV_BUCKETS = 6  # one module hash bucket of 6 goes to dev
SEED = 20240519


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's ``.py`` files, sorted, without test suites and installed packages."""
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & SKIP_PARTS or path.name.startswith("test_"):
            continue
        files.append(path)
    return files


def module_name(root: Path, path: Path) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def documented(tree: ast.Module):
    """``(qualified name, docstring)`` of the module's public functions, classes and their methods."""
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)

    def public(name: str) -> bool:
        return not name.startswith("_") or name in KEEP_DUNDER

    for node in tree.body:
        if not isinstance(node, kinds) or not public(node.name):
            continue
        doc = ast.get_docstring(node)
        if doc:
            yield node.name, doc
        if isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, kinds[:2]) and public(child.name):
                    doc = ast.get_docstring(child)
                    if doc:
                        yield f"{node.name}.{child.name}", doc


def split_docstring(doc: str) -> tuple[str, str] | None:
    """``(summary line, body)`` of a PEP 257 multi-line docstring that passes the rules, else None."""
    lines = doc.strip("\n").split("\n")
    if len(lines) < 3 or lines[1].strip():
        return None
    summary = lines[0].strip()
    body = "\n".join(lines[2:]).strip()
    words = summary.split()
    if not SUMMARY_WORDS[0] <= len(words) <= SUMMARY_WORDS[1] or len(summary) > SUMMARY_CHARS:
        return None
    if not summary.endswith(".") or ">>>" in summary or "(" in words[0]:
        return None
    if not BODY_CHARS[0] <= len(body) <= BODY_CHARS[1]:
        return None
    body_lines = [line for line in body.split("\n") if line.strip()]
    doctest = sum(1 for line in body_lines if line.lstrip().startswith((">>>", "...")))
    if doctest > MAX_DOCTEST_SHARE * len(body_lines):
        return None
    return summary, body


def _key(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def is_dev(module: str) -> bool:
    """The split of a module: its top-level package's sha256, one bucket of :data:`DEV_BUCKETS` is dev."""
    top = module.split(".")[0]
    return int(hashlib.sha256(top.encode()).hexdigest(), 16) % DEV_BUCKETS == 0


def collect(root: Path) -> tuple[list[dict], dict]:
    """Every pair of the standard library under ``root`` (rows) and counts of what the rules dropped."""
    version = ".".join(map(str, sys.version_info[:3]))
    rows, seen_summary, seen_body = [], set(), set()
    counts = {"files": 0, "unparsable_files": 0, "docstrings": 0, "layout_or_length": 0, "duplicates": 0}
    for path in stdlib_files(root):
        counts["files"] += 1
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            counts["unparsable_files"] += 1  # e.g. lib2to3's deliberately broken test data
            continue
        module = module_name(root, path)
        for name, doc in documented(tree):
            counts["docstrings"] += 1
            pair = split_docstring(doc)
            if pair is None:
                counts["layout_or_length"] += 1
                continue
            summary, body = pair
            if _key(summary) in seen_summary or _key(body) in seen_body:
                counts["duplicates"] += 1
                continue
            seen_summary.add(_key(summary))
            seen_body.add(_key(body))
            rows.append({"prompt": f"{INSTRUCTION}\n\n{body}", "response": summary, "history": [],
                         "module": module, "name": name, "python": version})
    return rows, counts


def refuse_foreign_files(out: Path) -> str | None:
    """Why ``out`` cannot take the task's files, or None: it is new, or a folder whose ``train.json``,
    ``dev.json`` and ``meta.json`` (where present) this script wrote, as its ``meta.json`` records (``task``)."""
    if not out.exists():
        return None
    if not out.is_dir():
        return f"--out {out}: exists and is not a folder"
    present = [name for name in OUTPUT_FILES if (out / name).exists()]
    if not present:
        return None
    try:
        ours = json.loads((out / "meta.json").read_text(encoding="utf-8")).get("task") == TASK
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    if ours and all((out / name).is_file() for name in present):
        return None
    return (f"--out {out}: {present[0]} was not written by this script (no meta.json of the docstring task "
            f"beside it) and is never overwritten: choose a new folder")


def write(rows: list[dict], out: Path, counts: dict) -> dict:
    """Splits, shuffles and writes ``train.json``, ``dev.json`` (JSON lines) and ``meta.json`` (what it records
    holds on any machine: the Python version names the standard library, not its folder)."""
    splits = {"train": [r for r in rows if not is_dev(r["module"])], "dev": [r for r in rows if is_dev(r["module"])]}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        random.Random(f"{SEED}-{name}").shuffle(part)
        with open(out / f"{name}.json", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    meta = {
        "task": TASK,
        "python": sys.version.split()[0],
        "instruction": INSTRUCTION,
        "rows": {name: len(part) for name, part in splits.items()},
        "modules": {name: len({r["module"].split(".")[0] for r in part}) for name, part in splits.items()},
        "dev_modules": sorted({r["module"].split(".")[0] for r in splits["dev"]}),
        "counts": counts,
        "rules": {"summary_words": SUMMARY_WORDS, "summary_chars": SUMMARY_CHARS, "body_chars": BODY_CHARS,
                  "max_doctest_share": MAX_DOCTEST_SHARE, "dev_buckets": DEV_BUCKETS, "seed": SEED},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "docstrings"),
                        help="output folder (default: data/docstrings beside this script)")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"],
                        help="the standard library folder to read (default: the running Python's)")
    args = parser.parse_args(argv)
    refused = refuse_foreign_files(Path(args.out))  # before reading the library: seconds
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    root = Path(args.stdlib)
    if not (root / "os.py").is_file():
        print(f"error: --stdlib {root}: not a Python standard library folder (no os.py)", file=sys.stderr)
        return 2
    rows, counts = collect(root)
    meta = write(rows, Path(args.out), counts)
    print(f"wrote {meta['rows']['train']} train and {meta['rows']['dev']} dev rows "
          f"({meta['modules']['train']} and {meta['modules']['dev']} top-level modules, Python {meta['python']}) "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
