"""The library's shape, read from its source (tests/architecture.py): its modules import each other without a
cycle, imports stand at the top of modules (a function imports only an optional heavy package), and functions
stay short enough to hold in one's head."""

from __future__ import annotations

import textwrap

from .architecture import (
    LONG_FUNCTION,
    OPTIONAL_HEAVY,
    cycles,
    functions,
    import_graph,
    library_modules,
    local_imports,
    misplaced_local_imports,
    package_graph,
)
from .common import ROOT

LIBRARY = library_modules(ROOT / "ptuning")


def write_package(root, files: dict[str, str]) -> dict:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return library_modules(root / "pkg")


# ---- the library ----


def test_the_library_modules_import_each_other_without_a_cycle():
    found = cycles(import_graph(LIBRARY))
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_library_parts_form_layers():
    # training, evaluation, checkpoint, build, models, memory, interop ... as wholes: none imports one that
    # imports it back, also through the imports inside functions
    for graph in (import_graph(LIBRARY), import_graph(LIBRARY, with_local=True)):
        found = cycles(package_graph(graph))
        assert found == [], "cycles between parts: " + "; ".join(" <-> ".join(c) for c in found)


def test_functions_import_no_library_module_and_only_optional_heavy_packages():
    misplaced = misplaced_local_imports(LIBRARY)
    assert misplaced == [], "imports that belong at the top of their module:\n" + "\n".join(
        f"{imp.path.relative_to(ROOT)}:{imp.line} {', '.join(imp.targets)}" for imp in misplaced
    )
    # what does stay inside functions is one of the optional heavy packages
    assert {imp.targets[0] for imp in local_imports(LIBRARY)} <= set(OPTIONAL_HEAVY)


def test_no_function_of_the_library_is_over_80_lines():
    long = {f.name: f.lines for f in functions(LIBRARY) if f.lines > LONG_FUNCTION}
    assert long == {}, "split into named steps: " + ", ".join(f"{name} ({n} lines)" for name, n in long.items())


def test_the_training_recipe_reads_as_phases():
    by_name = {f.name: f for f in functions(LIBRARY)}
    for phase in ("setup", "evaluate_before_training", "train", "step_gradients", "evaluate_loss", "save", "finish"):
        assert f"ptuning.training.loop.Recipe.{phase}" in by_name
    assert max(f.lines for f in by_name.values() if f.name.startswith("ptuning.training.")) <= LONG_FUNCTION


# ---- the measures themselves, on small packages written for them ----


def test_a_cycle_through_a_package_that_imports_its_modules_is_found(tmp_path):
    modules = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/jobs/__init__.py": "from .train import run\n",
        "pkg/jobs/train.py": "from ..checkpoint import save\n",
        "pkg/jobs/evaluate.py": "def score(): ...\n",
        # importing pkg.jobs.evaluate first runs pkg/jobs/__init__.py, which imports train, which imports this
        "pkg/checkpoint.py": "from .jobs.evaluate import score\n",
        "pkg/leaf.py": "import json\n",
    })
    graph = import_graph(modules)
    assert graph["pkg.checkpoint"] == {"pkg.jobs", "pkg.jobs.evaluate"}
    assert cycles(graph) == [["pkg.checkpoint", "pkg.jobs", "pkg.jobs.train"]]
    assert package_graph(graph)["pkg.checkpoint"] == {"pkg.jobs"}


def test_a_cycle_hidden_in_a_function_shows_only_with_function_local_imports(tmp_path):
    modules = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/build.py": "from .train import run\n",
        "pkg/train.py": "def run():\n    from .build import load\n    return load\n",
    })
    assert cycles(import_graph(modules)) == []
    assert cycles(import_graph(modules, with_local=True)) == [["pkg.build", "pkg.train"]]
    assert [(i.module, i.targets) for i in misplaced_local_imports(modules)] == [("pkg.train", ("pkg.build",))]


def test_function_local_imports_are_sorted_into_optional_heavy_and_misplaced(tmp_path):
    modules = write_package(tmp_path, {
        "pkg/__init__.py": """\
            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from .other import Thing

            def save(state):
                import deepspeed
                import json
                return json.dumps(state), deepspeed

            class Tracker:
                def start(self):
                    import wandb.sdk
                    return wandb
            """,
        "pkg/other.py": "Thing = int\n",
    })
    assert {(i.targets, i.type_checking) for i in local_imports(modules)} == {
        (("deepspeed",), False), (("json",), False), (("wandb",), False)}
    assert [i.targets for i in misplaced_local_imports(modules)] == [("json",)]
    assert import_graph(modules)["pkg"] == set()  # the TYPE_CHECKING import never runs


def test_function_lengths_count_from_def_to_the_last_line_nested_functions_included(tmp_path):
    modules = write_package(tmp_path, {
        "pkg/__init__.py": "def outer():\n    def inner():\n        return 1\n\n    return inner\n\n\n"
                           "class A:\n    def method(self):\n        pass\n",
    })
    assert [(f.name, f.lines) for f in functions(modules)] == [
        ("pkg.outer", 5), ("pkg.A.method", 2), ("pkg.outer.inner", 2)]
