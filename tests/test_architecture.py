"""The package's import graph follows docs/architecture.md: the chain runs one way, there is no import
circle, nothing imports the package root, and hpvit's own imports sit at module level (outside cli/).

The same check for anyone: ``python tools/check_layers.py`` (``--graph`` and ``--deferred`` list details).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
check_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_layers)


def test_chain_runs_one_way_without_circles():
    r = check_layers.analyse()
    assert r["cycles"] == [], r["cycles"]
    assert r["violations"] == [], "\n".join(r["violations"])
    assert r["deferred_hpvit"] == [], "\n".join(r["deferred_hpvit"])


def test_checker_sees_a_violation(tmp_path, monkeypatch):
    """The checker is not blind: a module that imports against the chain, and a circle, are reported."""
    pkg = tmp_path / "src" / "hpvit"
    (pkg / "layers").mkdir(parents=True)
    (pkg / "cli").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "layers" / "__init__.py").write_text("from ..cli import x\n")
    (pkg / "cli" / "__init__.py").write_text("from ..layers import y\n")
    monkeypatch.setattr(check_layers, "ROOT", pkg)
    r = check_layers.analyse()
    assert any("hpvit.layers (layers) imports hpvit.cli" in v for v in r["violations"])
    assert r["cycles"] == [["hpvit.cli", "hpvit.layers"]]


def test_command_line_help_does_not_import_torch():
    """The cli/ package builds every parser without torch, so `hpvit ... --help` answers at once."""
    for cmd in (["--help"], ["train", "det", "--help"], ["bench", "--help"], ["adapt", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "hpvit", *cmd], capture_output=True, text=True,
                           cwd=ROOT)
        assert r.returncode == 0 and "usage: hpvit" in r.stdout, r.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
        assert "torch" not in imported and "hpvit.cli.main" in imported, cmd
