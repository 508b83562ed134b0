"""The package's layers: every module lives in one layer, and no import runs upwards."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "attnlab"


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [name.strip() for layer in contract["layers"] for name in layer.split("|")]


def test_every_module_sits_in_a_layer():
    layers = {name.removeprefix("attnlab.") for name in _layers()}
    top_level = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py"} - {"__init__", "__main__"}
    assert top_level <= layers, "modules belong in a layer's subpackage (or are a layer: errors)"
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages | top_level == layers


def test_import_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_the_console_script_points_at_the_command_line():
    import importlib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, function = config["project"]["scripts"]["attnlab"].split(":")
    assert callable(getattr(importlib.import_module(module), function))
