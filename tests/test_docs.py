"""The documentation holds together: every relative link reaches a file (and a heading, when it names one),
and every training command the README shows composes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from hydra_entry import CONF_DIR, to_object

from .common import ROOT

PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (but - and _), spaces as -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_the_docs_pages_exist():
    names = {p.name for p in PAGES}
    assert {"architecture.md", "families.md", "configuration.md", "checkpoints.md", "evaluation.md",
            "serving.md", "distributed.md", "reliability.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_an_existing_file_and_heading(page):
    links = relative_links(page)
    assert links, f"{page}: no links found (the pattern is broken?)"
    for target in links:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.relative_to(ROOT)}: link {target!r}: no such file {file}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.relative_to(ROOT)}: link {target!r}: no such heading in {file.name}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](missing.md) [web](https://example.com)\n```\n[code](not-a-link.md)\n```\n")
    assert relative_links(page) == ["#top", "missing.md"]
    assert anchors(page) == {"top"}
    assert slug("Logging: the console, train_log.jsonl and wandb") == "logging-the-console-train_logjsonl-and-wandb"
    assert slug("Tiny ChatGLM2 / ChatGLM3 models") == "tiny-chatglm2--chatglm3-models"


def readme_train_commands() -> list[list[str]]:
    """Every ``python train.py ...`` of the README, in code blocks and in backticks."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    found = re.findall(r"^(python train\.py[^\n#`]*)", text, re.M) + re.findall(r"`(python train\.py[^`]*)`", text)
    return [shlex.split(command) for command in found]


def test_every_training_command_of_the_readme_composes():
    commands = readme_train_commands()
    assert len(commands) >= 8, commands
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for args in commands:
            job = to_object(compose("train", overrides=["train.output_dir=/tmp/x", *args[2:]]))
            for override in args[2:]:  # what the command sets is what the job holds
                key, _, value = override.partition("=")
                if key.startswith(("model.", "data.", "train.")) and "'" not in value:
                    section, field = key.split(".", 1)
                    held = getattr(getattr(job, section), field)
                    assert (held == float(value)) if isinstance(held, float) else str(held) == value, (args, key)


def test_every_evaluate_table_header_in_the_docs_is_the_one_evaluate_prints():
    from ptuning.evaluation.run import format_table

    metrics = {"bleu-4": 1.0, "rouge-1": 1.0, "rouge-2": 1.0, "rouge-l": 1.0, "num_samples": 1,
               "num_empty_predictions": 0, "num_stopped_predictions": 1, "new_tokens_per_s": 1.0}
    printed = format_table(metrics).splitlines()[0]
    found = []
    for page in PAGES:
        text = re.sub(r"\s*\n\s*", " ", page.read_text(encoding="utf-8"))  # a header wrapped over lines
        found += [(page.name, m.group(0)) for m in re.finditer(r"\| bleu-4 \| rouge-1 \|[^`\n]*?tokens/s \|", text)]
    assert found and all(header == printed for _, header in found), (printed, found)
