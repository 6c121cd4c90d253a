"""The bad-input corpus (``tests/bad_inputs/manifest.json``): every user mistake ends in one line.

For each case, a command line of ``train.py`` or ``evaluate.py`` over a bad data file, config override,
checkpoint or model folder must exit 2 with ``error: ...`` as the last line of stderr, matching the case's
pattern (which names the file/line/key and what was expected), print no traceback, leave every existing
file as it was, and never run code hidden in a pickle.

The command lines run as separate processes forked from one driver that has already imported the
libraries (``tests/forkrun.py``): the same program, argv, exit status and stderr as ``python train.py``,
without paying ~10 s of imports per case. ``test_fork_driver_matches_a_plain_subprocess`` checks that
equivalence on one case against a real ``python train.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ptuning.config import BUILTIN_MODEL

from .bad_inputs import recipes
from .common import ROOT

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
DATA = CORPUS / "data"
CASES = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))["cases"]
# Small settings so that a case that wrongly got through would not train for long.
DEFAULTS = {
    "train.py": ["data.max_train_samples=8", "data.max_eval_samples=4", "train.max_steps=1",
                 "train.per_device_batch_size=2", "train.eval_generation=false",
                 "train.eval_before_training=false", "train.plot=false"],
    "evaluate.py": ["data.max_eval_samples=2", "generation.max_new_tokens=2"],
}


def fill(text: str, built: Path, out: Path) -> str:
    return text.replace("{data}", str(DATA)).replace("{built}", str(built)).replace("{out}", str(out))


def command(case: dict, built: Path, out: Path, cache: Path) -> list[str]:
    """The case's arguments, then the defaults for the keys it does not set itself."""
    args = [fill(a, built, out) for a in case["args"]]
    given = {a.split("=", 1)[0] for a in args}
    extra = [f"data.cache_dir={cache}", *DEFAULTS[case["script"]]]
    extra.append(f"train.output_dir={out}" if case["script"] == "train.py" else f"output_dir={out}")
    return args + [a for a in extra if a.split("=", 1)[0] not in given]


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a file added, removed or changed shows as a difference)."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Builds the inputs, runs every case once (one driver), and records the files before and after."""
    root = tmp_path_factory.mktemp("bad_inputs")
    built, cache = root / "built", root / "cache"
    recipes.build(sorted({name for case in CASES for name in case["build"]}), built)
    watched = (built, DATA, BUILTIN_MODEL, ROOT / "data" / "adgen_sample")
    before = snapshot(*watched)
    jobs = []
    for case in CASES:
        out = root / "out" / case["id"]
        jobs.append({
            "script": case["script"],
            "args": command(case, built, out, cache),
            "stdout": str(root / f"{case['id']}.out"),
            "stderr": str(root / f"{case['id']}.err"),
            "timeout": 180,
        })
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "forkrun.py"), str(root / "jobs.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    results = {
        case["id"]: {"code": code, "stderr": Path(job["stderr"]).read_text(errors="replace"), "args": job["args"]}
        for case, job, code in zip(CASES, jobs, codes, strict=True)
    }
    return {"results": results, "before": before, "after": snapshot(*watched), "built": built}


def test_the_corpus_is_large_and_varied():
    assert len(CASES) >= 25
    kinds = {case["id"].split("-")[0] for case in CASES}
    assert {"data", "cli", "ckpt", "model", "state", "eval"} <= kinds
    assert len({case["id"] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_fails_with_one_clear_line(corpus, case):
    result = corpus["results"][case["id"]]
    stderr = result["stderr"]
    assert "Traceback" not in stderr, stderr
    assert result["code"] == 2, (result["code"], stderr[-2000:])
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr[-2000:]
    assert re.search(case["expect"], last), f"{last!r} does not match {case['expect']!r}"
    # what the case pointed at was not modified (nor was any other watched input: checked once below)
    mentioned = [a.split("=", 1)[1] for a in result["args"] if "=" in a and "/" in a.split("=", 1)[1]]
    for path, digest in corpus["before"].items():
        if any(path == m or path.startswith(m.rstrip("/") + "/") for m in mentioned):
            assert corpus["after"].get(path) == digest, f"{case['id']} changed {path}"


def test_no_input_file_changed_and_no_payload_ran(corpus):
    before, after = corpus["before"], corpus["after"]
    assert sorted(set(after) - set(before)) == [], "files appeared among the inputs"
    assert sorted(set(before) - set(after)) == [], "input files vanished"
    assert [p for p in before if before[p] != after[p]] == []
    assert not (corpus["built"] / recipes.PAYLOAD_MARKER).exists(), "a pickled payload was executed"


def test_fork_driver_matches_a_plain_subprocess(corpus, tmp_path):
    case = next(c for c in CASES if c["id"] == "data-missing-column")
    args = command(case, corpus["built"], tmp_path / "out", tmp_path / "cache")
    proc = subprocess.run([sys.executable, case["script"], *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    forked = corpus["results"][case["id"]]
    assert proc.returncode == forked["code"] == 2
    assert proc.stderr.strip().splitlines()[-1] == forked["stderr"].strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
