"""What a user installs: the sdist carries the whole test suite and the full licence; the wheel is typed.

The sdist and the wheel are built once, by setuptools' PEP 517 backend in a subprocess, from a copy of the
source tree (the build writes egg-info and dist folders; the committed experiment runs are left out of the
copy except one placeholder, to check they stay out of the sdist).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAME_VERSION = "samkit-0.1.0"
# sha256 of the Apache License 2.0 as published at https://www.apache.org/licenses/LICENSE-2.0.txt (11358 bytes)
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
SKIPPED_AT_TOP = {".git", "experiments", "build", "dist", "runs", "out", ".benchmarks"}  # not tests/experiments
SKIPPED = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def _source_files(folder: str) -> list[str]:
    """Every file under ROOT/folder, as sdist-relative names, leaving out caches."""
    base = ROOT / folder
    return sorted(
        str(p.relative_to(ROOT)).replace("\\", "/")
        for p in base.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("packaging")
    tree = work / "src"
    def ignore(folder, names):
        top = Path(folder) == ROOT
        return [n for n in names if n in SKIPPED or n.endswith(".egg-info") or (top and n in SKIPPED_AT_TOP)]

    shutil.copytree(ROOT, tree, ignore=ignore)
    placeholder = tree / "experiments" / "job" / "runs" / "summary.json"
    placeholder.parent.mkdir(parents=True)
    placeholder.write_text("{}")
    code = (
        "import sys; from setuptools import build_meta as b; out = sys.argv[1]; "  # the backend rewrites sys.argv
        "names = b.build_sdist(out), b.build_wheel(out); print('built:', *names)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(work / "dist")], cwd=tree, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (
        "building the sdist and wheel failed (setuptools >= 77 is needed: pip install 'setuptools>=77'):\n"
        + done.stderr[-3000:]
    )
    sdist_name, wheel_name = done.stdout.splitlines()[-1].split()[1:]  # setuptools logs to stdout before
    with tarfile.open(work / "dist" / sdist_name) as sdist:
        sdist_files = {
            m.name[len(NAME_VERSION) + 1 :]: (sdist.extractfile(m).read() if m.isfile() else None)
            for m in sdist.getmembers()
        }
    with zipfile.ZipFile(work / "dist" / wheel_name) as wheel:
        wheel_files = {name: wheel.read(name) for name in wheel.namelist()}
    return sdist_files, wheel_files


def test_sdist_holds_the_whole_test_suite_and_what_it_runs(built):
    sdist, _ = built
    tests = _source_files("tests")
    assert sum(name.endswith(".py") for name in tests) > 50  # the suite, not a handful of files
    # the benchmarks and examples are imported or run by tests (test_benchmarks.py, sharpness/test_example.py)
    wanted = tests + _source_files("benchmarks") + _source_files("examples") + _source_files("docs")
    missing = [name for name in wanted if name not in sdist]
    assert not missing, f"missing from the sdist: {missing}"
    assert (ROOT / "tests" / "test_packaging.py").read_bytes() == sdist["tests/test_packaging.py"]


def test_sdist_leaves_out_experiment_runs_and_caches(built):
    sdist, _ = built
    assert not [name for name in sdist if name.startswith("experiments/")]
    assert not [name for name in sdist if "__pycache__" in name or name.endswith((".pyc", ".pyo"))]


def test_licence_is_the_full_apache_2_text_in_sdist_and_wheel(built):
    sdist, wheel = built
    text = (ROOT / "LICENSE").read_bytes()
    assert text.lstrip().startswith(b"Apache License\n                           Version 2.0, January 2004")
    assert b"TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert text.rstrip().endswith(b"limitations under the License."), "LICENSE must end with the licence text"
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256, "LICENSE differs from the published Apache-2.0 text"
    assert sdist["LICENSE"] == text
    assert wheel[f"{NAME_VERSION}.dist-info/licenses/LICENSE"] == text
    # the project's copyright line lives in NOTICE, as the licence's section 4(d) provides
    assert b"Copyright" in sdist["NOTICE"] and wheel[f"{NAME_VERSION}.dist-info/licenses/NOTICE"] == sdist["NOTICE"]


@pytest.mark.parametrize("where", ["sdist", "wheel"])
def test_metadata_states_the_licence_as_an_spdx_expression(built, where):
    sdist, wheel = built
    raw = sdist["PKG-INFO"] if where == "sdist" else wheel[f"{NAME_VERSION}.dist-info/METADATA"]
    metadata = HeaderParser().parsestr(raw.decode())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert sorted(metadata.get_all("License-File")) == ["LICENSE", "NOTICE"]
    assert metadata["License"] is None  # the deprecated free-text field is gone
    assert tuple(int(x) for x in metadata["Metadata-Version"].split(".")) >= (2, 4)


def test_wheel_is_typed_and_holds_the_package_only(built):
    _, wheel = built
    assert "samkit/py.typed" in wheel
    assert "samkit/optim/sam.py" in wheel and "samkit/sharpness/lanczos.py" in wheel
    top = {name.split("/")[0] for name in wheel}
    assert top == {"samkit", f"{NAME_VERSION}.dist-info"}, top


def test_ci_type_checks_before_it_tests():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    mypy = [i for i, line in enumerate(lines) if line.startswith("python -m mypy")]
    pytest_runs = [i for i, line in enumerate(lines) if line.startswith("python -m pytest")]
    assert mypy and pytest_runs and mypy[0] < pytest_runs[0], "CI must run `python -m mypy` before pytest"
