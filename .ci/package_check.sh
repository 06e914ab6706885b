#!/usr/bin/env bash
# Packaging check (run by .ci/run inside its venv; needs .ci/release-tools.txt installed):
#   1. `python -m build`: the sdist, then the wheel built FROM the sdist (a file the sdist lacks is
#      missing from the wheel too), in an isolated build environment (pyproject's build-system);
#   2. `twine check --strict`: the metadata and the README render as a package index shows them;
#   3. .ci/check_dist.py: the wheel's file list (printed) is exactly the package + py.typed, the
#      sdist has the package and its top-level files;
#   4. the BUILT wheel installed (not editable) into a fresh venv, and .ci/wheel_smoke.py run with
#      that venv's python from a temporary directory outside the repository, twice: the torch path
#      and the Triton kernels under the interpreter;
#   5. mypy on tests/harness/typing_usage.py (a typed user's calls) against the INSTALLED wheel, from the same
#      directory: it reads the annotations only through the shipped py.typed (reuses the cache of
#      .ci/run's mypy step for torch).
# The fresh venv is made without pip and sees the CI venv's packages (torch, triton) through a .pth
# file, so nothing is downloaded again. A directory named by a .pth file is appended to sys.path
# after the venv's own site-packages, and .pth files inside it are NOT processed: the CI venv's
# editable-install hook for xent_triton stays inactive, and wheel_smoke.py also asserts that
# xent_triton was imported from the fresh venv.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf dist
python -m build --outdir dist . > "$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
ls -l dist
twine check --strict dist/*
python .ci/check_dist.py dist

python -m venv --without-pip "$tmp/venv"
purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
python -c "$purelib" > "$("$tmp/venv/bin/python" -c "$purelib")/ci_venv_packages.pth"
python -m pip --python "$tmp/venv/bin/python" install -q --no-deps --no-index dist/*.whl
version=$(basename dist/*.whl | cut -d- -f2)  # xent_triton-VERSION-py3-none-any.whl
cp .ci/wheel_smoke.py "$tmp/"
cd "$tmp"
"$tmp/venv/bin/python" -I wheel_smoke.py "$version"
TRITON_INTERPRET=1 "$tmp/venv/bin/python" -I wheel_smoke.py "$version"
cp "$repo/tests/harness/typing_usage.py" "$tmp/"
mypy --python-executable "$tmp/venv/bin/python" --cache-dir "$repo/.mypy_cache" typing_usage.py
