"""The docstring task (data/make_docstring_task.py): pairs from a standard library's source, parsed and never
imported, split by module, the Python version recorded; the shipped files are what the script writes."""

from __future__ import annotations

import json
import sys

from .common import ROOT

sys.path.insert(0, str(ROOT / "data"))
import make_docstring_task as task  # noqa: E402  (a script of data/, imported for its functions)

BODY = "Reads the whole file, decodes it with the given encoding and returns the text without the final newline."


def function(name: str, summary: str, body: str | None = BODY, indent: str = "") -> str:
    """Source of a function whose docstring is ``summary``, a blank line and ``body`` (none: one line)."""
    inner = indent + "    "
    text = f'{summary}\n\n{inner}{body} ({name})\n{inner}' if body is not None else summary
    return f'{indent}def {name}(x):\n{inner}"""{text}"""\n\n'


def write(root, relative: str, source: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")


def fake_stdlib(root):
    long = "It is written here to be long enough for the rules of the task, " * 2
    write(root, "os.py", "import sys  # the marker of a standard library folder\n")
    write(root, "alpha/__init__.py",
          function("read_text", "Return the text of the file at the given path.")
          + function("_private", "Return something no user should call directly.", long)
          + 'class Reader:\n    """Read records from a stream one by one.\n\n    ' + long + 'Reader.\n    """\n\n'
          + function("close", "Close the reader and release the stream.", long, indent="    ")
          + function("copy", "Return the text of the file at the given path.", long, indent="    "))
    write(root, "alpha/sub.py",
          function("one_line", "Only a summary line, no body.", None)
          + function("no_period", "Return a value without a period at the end", long)
          + function("doctests", "Return the square of a number.", ">>> square(2)\n    4\n    >>> square(3)\n    9"))
    write(root, "beta.py",
          function("parse", "Parse a configuration text into sections.", long)
          + function("exec_me", "Never run: the module is parsed, not imported.", long)
          + 'raise SystemExit("imported!")\n')
    write(root, "test/test_alpha.py", function("test_read", "Check that reading a file returns its text.", long))
    write(root, "site-packages/other/__init__.py",
          function("installed", "Belong to an installed package, not the library.", long))


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_pairs_follow_the_rules_and_every_module_lands_in_one_split(tmp_path):
    fake_stdlib(tmp_path / "lib")
    assert task.main(["--stdlib", str(tmp_path / "lib"), "--out", str(tmp_path / "out")]) == 0
    rows = read(tmp_path / "out" / "train.json") + read(tmp_path / "out" / "dev.json")
    names = sorted((r["module"], r["name"]) for r in rows)
    assert names == [("alpha", "Reader"), ("alpha", "Reader.close"), ("alpha", "read_text"), ("beta", "exec_me"),
                     ("beta", "parse")]  # no private, test, installed, one-line, doctest or duplicate pairs
    version = ".".join(map(str, sys.version_info[:3]))
    for row in rows:
        assert set(row) == {"prompt", "response", "history", "module", "name", "python"}
        assert row["prompt"].startswith(task.INSTRUCTION + "\n\n") and row["history"] == []
        assert row["python"] == version and row["response"].endswith(".")
    read_text = next(r for r in rows if r["name"] == "read_text")
    assert read_text["response"] == "Return the text of the file at the given path."
    assert read_text["prompt"] == f"{task.INSTRUCTION}\n\n{BODY} (read_text)"
    for name in ("train", "dev"):
        tops = {r["module"].split(".")[0] for r in read(tmp_path / "out" / f"{name}.json")}
        assert all(task.is_dev(top) == (name == "dev") for top in tops)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["python"] == sys.version.split()[0] and sum(meta["rows"].values()) == 5


def test_a_folder_without_os_py_is_refused(tmp_path, capsys):
    assert task.main(["--stdlib", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not a Python standard library folder (no os.py)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_shipped_files_share_no_module_and_record_their_python():
    folder = ROOT / "data" / "docstrings"
    train, dev = read(folder / "train.json"), read(folder / "dev.json")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["rows"] == {"train": len(train), "dev": len(dev)} and len(train) > 1000 and len(dev) > 200
    assert not {r["module"].split(".")[0] for r in train} & {r["module"].split(".")[0] for r in dev}
    assert {r["python"] for r in train + dev} == {meta["python"]}
    assert len({r["response"] for r in train + dev}) == len(train) + len(dev)  # de-duplicated


def test_the_shipped_files_are_what_the_script_writes_for_their_python(tmp_path):
    folder = ROOT / "data" / "docstrings"
    meta = json.loads((folder / "meta.json").read_text())
    assert task.main(["--out", str(tmp_path)]) == 0
    if meta["python"] == sys.version.split()[0]:
        for name in ("train.json", "dev.json"):
            assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
    else:  # another Python's standard library: other pairs, recorded as such
        assert json.loads((tmp_path / "meta.json").read_text())["python"] != meta["python"]


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "README.md"
    target.write_text("mine\n")
    assert task.main(["--stdlib", str(tmp_path), "--out", str(target)]) == 2
    assert capsys.readouterr().err == f"error: --out {target}: exists and is not a folder\n"
    assert target.read_text() == "mine\n"


def test_a_users_own_train_json_is_never_overwritten(tmp_path, capsys):
    fake_stdlib(tmp_path / "lib")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train.json").write_text('{"prompt": "mine"}\n')
    assert task.main(["--stdlib", str(tmp_path / "lib"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: --out {out}: train.json was not written by this script (no meta.json "
                                       f"of the docstring task beside it) and is never overwritten: choose a new folder\n")
    assert sorted(p.name for p in out.iterdir()) == ["train.json"]
    assert (out / "train.json").read_text() == '{"prompt": "mine"}\n'


def test_a_folder_the_script_wrote_is_written_again(tmp_path):
    fake_stdlib(tmp_path / "lib")
    out = tmp_path / "out"
    assert task.main(["--stdlib", str(tmp_path / "lib"), "--out", str(out)]) == 0
    first = {name: (out / name).read_bytes() for name in task.OUTPUT_FILES}
    assert task.main(["--stdlib", str(tmp_path / "lib"), "--out", str(out)]) == 0
    assert {name: (out / name).read_bytes() for name in task.OUTPUT_FILES} == first
