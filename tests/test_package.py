"""
Specification of the installed package: what pyproject.toml ships (nanochat/ and megacontext/,
never scripts/ or tasks/) must work on its own. The wheel is built from a copy of the sources
with setuptools' PEP 517 hook (no network, nothing written into the repo), unpacked into a
temp directory, and every module is imported by a fresh interpreter that cannot see the repo.
"""
import ast
import os
import subprocess
import sys
import shutil
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("nanochat", "megacontext")
SCRIPT_PACKAGES = ("scripts", "tasks", "tests")


def package_modules(root):
    """Dotted names of every module under root/nanochat and root/megacontext."""
    names = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).glob("*.py")):
            names.append(pkg if path.stem == "__init__" else f"{pkg}.{path.stem}")
    return names


def test_library_never_imports_scripts():
    """Also the imports inside functions, which importing a module never runs."""
    offenders = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    mods = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    mods = [node.module or ""]
                else:
                    continue
                for mod in mods:
                    if mod.split(".")[0] in SCRIPT_PACKAGES:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {mod}")
    assert offenders == []


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, unpacked as an installer would into a fresh directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in (*PACKAGES, "pyproject.toml", "README.md"):
        s = REPO / name
        if s.is_dir():
            shutil.copytree(s, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(s, src / name)
    dist = tmp / "dist"
    build = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_wheel({str(dist)!r}))"],
        cwd=src, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = dist / build.stdout.strip().splitlines()[-1]
    target = tmp / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    return target


def run_isolated(target, code):
    """A fresh interpreter with the unpacked wheel and the environment's third-party packages
    on sys.path, but not the repo: -S skips site (so the editable install's .pth is not read)
    and the working directory is outside the repo."""
    purelib = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), purelib])
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=target.parent, env=env,
                          capture_output=True, text=True, timeout=600)


def test_every_module_imports_from_the_installed_wheel(installed):
    shipped = sorted(p.name for p in installed.iterdir() if not p.name.endswith(".dist-info"))
    assert shipped == sorted(PACKAGES)
    assert package_modules(installed) == package_modules(REPO)  # nothing left out of the wheel
    assert (installed / "nanochat" / "ui.html").is_file()  # package data that chat_web serves
    assert (installed / "megacontext" / "viz.html").is_file()  # and the visualizer's page
    code = (
        "import importlib, sys\n"
        f"for name in {package_modules(installed)!r}:\n"
        "    mod = importlib.import_module(name)\n"
        f"    assert mod.__file__.startswith({str(installed)!r}), (name, mod.__file__)\n"
        "for name in ('scripts', 'tasks'):\n"
        "    assert importlib.util.find_spec(name) is None, name + ' is importable: the test is not isolated'\n"
        "print('imported', len(sys.modules))\n"
    )
    result = run_isolated(installed, code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("imported")

