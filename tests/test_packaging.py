"""What `pip install vlpcache` (or `pip install git+URL`, or `pip install .`) installs: a wheel built from the
source, not the editable checkout the suite runs. A file the package reads at run time (the search page,
Visual Genome's vocabulary) but the wheel leaves out works in every test and fails for such a user.

The wheel is built from a copy of the source with setuptools (the `test` extra has it) and pip, without
build isolation, so nothing is downloaded."""

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from waiting import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def source_files() -> list[str]:
    """The package's files as the source holds them (no byte code), relative to the root."""
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "vlpcache").rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (pip install -e '.[test]' brings it)")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "vlpcache", source / "vlpcache",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(source)], check=True, timeout=HANG_GUARD_S, capture_output=True)
    (built,) = out.glob("vlpcache-*.whl")
    return built


def test_the_wheel_holds_every_file_of_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in source_files() if name not in names]
    assert not missing, f"the wheel leaves out {missing}: add them to [tool.setuptools.package-data]"
    assert "vlpcache/serve/page/page.js" in names and "vlpcache/cache/vocab/vg_objects.txt" in names
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = configparser.ConfigParser()
    entry_points.read_string(zipfile.ZipFile(wheel).read(meta).decode())
    assert entry_points["console_scripts"]["vlpcache"] == "vlpcache.__main__:main"


def test_the_installed_wheel_reads_its_page_and_vocabulary(wheel, tmp_path):
    """Installed into a folder of its own and imported from there (not from the checkout), the package
    finds the page it serves and the vocabulary the vg detector names its regions by."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, timeout=HANG_GUARD_S, capture_output=True)
    probe = ("import vlpcache, sys; from pathlib import Path\n"
             "from vlpcache.serve.app import PAGE_DIR\n"
             "from vlpcache.cache.labels import visual_genome\n"
             "assert Path(vlpcache.__file__).is_relative_to(Path(sys.argv[1])), vlpcache.__file__\n"
             "pages = sorted(p.name for p in PAGE_DIR.iterdir())\n"
             "vg = visual_genome()\n"
             "print(pages, len(vg.classes), len(vg.attributes))\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['index.html',", "'page.css',", "'page.js']", "1600", "400"]
