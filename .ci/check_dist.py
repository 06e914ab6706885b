"""Check the built distributions against the source tree: ``python .ci/check_dist.py DIST_DIR``.

* the wheel: exactly the package's files (every ``xent_triton/**/*.py`` of the source tree and
  ``py.typed``, nothing else outside its ``.dist-info``), and its METADATA names the version of
  ``xent_triton/__init__.py``; its file list is printed;
* the sdist: the package files too, plus pyproject.toml, README.md, LICENSE and CHANGELOG.md.

Exits 1, naming the files, on any difference.
"""
from __future__ import annotations

import pathlib
import re
import sys
import tarfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
SDIST_EXTRA = {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"}


def package_files() -> set[str]:
    pkg = ROOT / "xent_triton"
    files = {p.relative_to(ROOT).as_posix() for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}
    return files | {"xent_triton/py.typed"}


def source_version() -> str:
    text = (ROOT / "xent_triton" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def check_wheel(path: pathlib.Path, expected: set[str], version: str) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        meta = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(meta[0]).decode() if meta else ""
    print(f"{path.name}: {len(names)} files")
    for n in sorted(names):
        print(f"  {n}")
    got = {n for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    errors = [f"wheel lacks {n}" for n in sorted(expected - got)]
    errors += [f"wheel has an unexpected file {n}" for n in sorted(got - expected)]
    if f"\nVersion: {version}\n" not in metadata:
        errors.append(f"wheel METADATA does not name version {version}")
    return errors


def check_sdist(path: pathlib.Path, expected: set[str]) -> list[str]:
    with tarfile.open(path) as tf:
        top = path.name[: -len(".tar.gz")]
        got = {m.name[len(top) + 1:] for m in tf.getmembers() if m.isfile()}
    print(f"{path.name}: {len(got)} files")
    return [f"sdist lacks {n}" for n in sorted((expected | SDIST_EXTRA) - got)]


def main(dist: pathlib.Path) -> int:
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist in {dist}, found {wheels + sdists}")
        return 1
    expected = package_files()
    errors = check_wheel(wheels[0], expected, source_version()) + check_sdist(sdists[0], expected)
    for e in errors:
        print(f"ERROR: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1])))
