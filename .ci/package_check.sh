#!/usr/bin/env bash
# CI, no GPU needed: pf_kernels installed as a user installs it, in a fresh venv with torch first.
#   sdist      python -m build --sdist (isolated): every file under csrc/ that git tracks, README,
#              LICENSE, pyproject.toml, setup.py, the package; no junk (.so, build/, venvs, tests)
#   isolation  pip install <sdist> with build isolation (pip's default) fails, naming
#              `pip install --no-build-isolation .`; with PF_KERNELS_SKIP_EXTENSION=1 it installs a
#              pure wheel (...-0pure-py3-none-any) that says so once at import
#   wheel      python -m build --wheel --no-isolation on the unpacked sdist (so the sdist alone
#              builds): a platform wheel with _C inside, Requires-Dist torch==<the torch built against>
#   install    the wheel installed: no warning at import, the cpu backend available, ops forward and
#              backward equal to the reference
#   mismatch   the same install told it was built against another torch: one warning naming the fix,
#              the cpu backend unavailable (its library is not loaded)
# One compile of the CPU kernels (about 3 min of CPU time). Knobs:
#   PYTHON                  the python for the fresh venv, default python3
#   PF_KERNELS_PKG_TORCH    torch requirement, default torch==2.13.0 (a local CPU wheel here)
#   PF_KERNELS_PKG_DIR      work directory, default build/package-check (wiped first)
# Prints one PASS/FAIL line per part; exit 0 when all pass, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
start=$(date +%s)
PYTHON=${PYTHON:-python3}
TORCH_REQ=${PF_KERNELS_PKG_TORCH:-torch==2.13.0}
DIR=${PF_KERNELS_PKG_DIR:-$ROOT/build/package-check}
export MAX_JOBS=${MAX_JOBS:-2}
unset PF_KERNELS_SKIP_EXTENSION PF_KERNELS_FORCE_CUDA
failed=0

pass() { echo "PASS: package check: $*"; }
fail() { echo "FAIL: package check: $*"; failed=1; }
finish() {
  echo "package check: $([ $failed = 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - start )) s (logs: $DIR)"
  exit $failed
}

rm -rf "$DIR"
mkdir -p "$DIR"
VENV=$DIR/venv
PY=$VENV/bin/python
if ! { "$PYTHON" -m venv "$VENV" && "$PY" -m pip install "$TORCH_REQ" numpy build ninja; } >"$DIR/venv.log" 2>&1; then
  tail -5 "$DIR/venv.log"
  fail "could not create a venv with $TORCH_REQ (log: $DIR/venv.log)"
  finish
fi
echo "package check: fresh venv with torch $("$PY" -c 'import torch; print(torch.__version__)'), setuptools" \
     "$("$PY" -c 'import setuptools; print(setuptools.__version__)'), python $("$PY" -c 'import sys; print(sys.version.split()[0])')"

# --- sdist ---------------------------------------------------------------------------------------
if ! "$PY" -m build --sdist --outdir "$DIR/dist" . >"$DIR/sdist.log" 2>&1; then
  tail -20 "$DIR/sdist.log"; fail "sdist: python -m build --sdist failed (log: $DIR/sdist.log)"; finish
fi
SDIST=$(ls "$DIR"/dist/*.tar.gz)
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files csrc pf_kernels >"$DIR/expected.txt"
else
  find csrc pf_kernels -type f ! -name '*.so' ! -name '*.pyc' ! -name '_build_info.py' >"$DIR/expected.txt"
fi
printf '%s\n' README.md LICENSE pyproject.toml setup.py MANIFEST.in PKG-INFO >>"$DIR/expected.txt"
if "$PY" - "$SDIST" "$DIR/expected.txt" <<'EOF'
import re, sys, tarfile
sdist, expected_list = sys.argv[1], sys.argv[2]
with tarfile.open(sdist) as tar:
    names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
expected = {line.strip() for line in open(expected_list) if line.strip()}
missing = sorted(expected - names)
junk = sorted(n for n in names if re.search(
    r"(^|/)(\.venv[^/]*|build|dist|results|tests|__pycache__|\.git)/|\.(so|o|pyd|pyc)$|_build_info\.py$", n))
for name in missing:
    print(f"  missing from the sdist: {name}")
for name in junk:
    print(f"  junk in the sdist: {name}")
print(f"  {len(names)} files, {sum(n.startswith('csrc/') for n in names)} under csrc/")
sys.exit(1 if missing or junk else 0)
EOF
then pass "sdist $(basename "$SDIST") holds every tracked source and header, README, LICENSE, build files; no junk"
else fail "sdist $(basename "$SDIST") is incomplete or carries junk"
fi

# --- build isolation ------------------------------------------------------------------------------
"$PY" -m pip install --no-deps "$SDIST" >"$DIR/isolated.log" 2>&1
rc=$?
if [ $rc != 0 ] && grep -q "pip install --no-build-isolation \." "$DIR/isolated.log" \
    && grep -q "torch is not importable in this build environment" "$DIR/isolated.log"; then
  pass "isolation: pip install <sdist> with build isolation stops, naming 'pip install --no-build-isolation .'"
else
  tail -20 "$DIR/isolated.log"; fail "isolation: pip install <sdist> under build isolation exited $rc without the fix in its output"
fi
PF_KERNELS_SKIP_EXTENSION=1 "$PY" -m pip wheel --no-deps -w "$DIR/pure" "$SDIST" >"$DIR/pure.log" 2>&1 \
  && "$PY" -m pip install --no-deps "$DIR"/pure/*.whl >>"$DIR/pure.log" 2>&1
rc=$?
if [ $rc = 0 ] && (cd "$DIR" && "$PY" - "$(ls "$DIR"/pure/)" <<'EOF'
import sys, warnings
name = sys.argv[1]
assert name.endswith("-0pure-py3-none-any.whl"), f"a wheel without _C is named {name}"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import pf_kernels
    cpu = pf_kernels.available_backends()["cpu"]
ours = [w for w in caught if type(w.message).__name__ == "KernelsUnavailableWarning"]
assert len(ours) == 1 and "PF_KERNELS_SKIP_EXTENSION=1" in str(ours[0].message), [str(w.message) for w in ours]
assert not cpu["available"] and "on purpose" in cpu["reason"], cpu
print(f"  {name}; at import: {ours[0].message}")
EOF
); then
  pass "isolation: PF_KERNELS_SKIP_EXTENSION=1 gives a pure wheel named as such, which says so once at import"
else
  tail -20 "$DIR/pure.log"; fail "isolation: the PF_KERNELS_SKIP_EXTENSION=1 install (log: $DIR/pure.log)"
fi
"$PY" -m pip uninstall -y pf_kernels >>"$DIR/pure.log" 2>&1

# --- wheel from the unpacked sdist ----------------------------------------------------------------
tar xzf "$SDIST" -C "$DIR"
SRC=$DIR/$(basename "$SDIST" .tar.gz)
build_start=$(date +%s)
if ! "$PY" -m build --wheel --no-isolation --outdir "$DIR/wheel" "$SRC" >"$DIR/wheel.log" 2>&1; then
  grep -E "error|Error" "$DIR/wheel.log" | head -20; fail "wheel: python -m build --wheel --no-isolation on the unpacked sdist failed (log: $DIR/wheel.log)"; finish
fi
WHEEL=$(ls "$DIR"/wheel/*.whl)
if "$PY" - "$WHEEL" <<'EOF'
import re, sys, zipfile
import torch
wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as zf:
    names = zf.namelist()
    meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    info = zf.read("pf_kernels/_build_info.py").decode()
tag = re.match(r"pf_kernels-[^-]+-(.+)\.whl$", wheel.rsplit("/", 1)[-1]).group(1)
problems = []
if "none-any" in tag or "linux" not in tag:
    problems.append(f"the wheel is tagged {tag}, not a platform wheel")
if not any(re.fullmatch(r"pf_kernels/_C\.[^/]*\.so", n) for n in names):
    problems.append("no pf_kernels/_C*.so in the wheel")
pin = f"Requires-Dist: torch=={torch.__version__.split('+')[0]}"
if pin not in meta.splitlines():
    problems.append(f"METADATA lacks '{pin}': {[l for l in meta.splitlines() if 'torch' in l]}")
if f"TORCH_VERSION = {torch.__version__!r}" not in info or "EXTENSION = 'built'" not in info:
    problems.append(f"pf_kernels/_build_info.py does not record this torch:\n{info}")
if not any(l.startswith(("License-Expression: BSD-3-Clause", "License: BSD-3-Clause")) for l in meta.splitlines()):
    problems.append("METADATA has no BSD-3-Clause license")
for p in problems:
    print(f"  {p}")
print(f"  {wheel.rsplit('/', 1)[-1]}: {len(names)} files, {pin}")
sys.exit(1 if problems else 0)
EOF
then pass "wheel: built from the unpacked sdist in $(( $(date +%s) - build_start )) s: platform wheel, _C inside, torch pinned"
else fail "wheel: $(basename "$WHEEL")"
fi

# --- the installed wheel --------------------------------------------------------------------------
OP_CHECK=$(cat <<'EOF'
import sys, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import pf_kernels
    from pf_kernels import reference
    report = pf_kernels.available_backends()
ours = [str(w.message) for w in caught if type(w.message).__name__ == "KernelsUnavailableWarning"]
assert "site-packages" in pf_kernels.__file__, pf_kernels.__file__
if sys.argv[1] == "mismatch":
    assert len(ours) == 1 and "built against torch 2.0.0" in ours[0] and "pip install --no-build-isolation ." in ours[0], ours
    assert not report["cpu"]["available"] and "built against torch 2.0.0" in report["cpu"]["reason"], report["cpu"]
    assert not hasattr(torch.ops.pf_kernels, "backproj_concat"), "the mismatched library was loaded"
    print(f"  at import: {ours[0]}")
    sys.exit(0)
assert not ours, ours
assert report["cpu"]["available"], report["cpu"]
torch.manual_seed(0)
x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
w = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
b = torch.randn(2, dtype=torch.float64, requires_grad=True)
h2 = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
hw = torch.randn(4, 13, dtype=torch.float64, requires_grad=True)
for op, args, ref in [
        (pf_kernels.backproj_concat, (x, z, w, b), reference.backproj_concat),
        (pf_kernels.fusion_head, ([z, h2], hw, None), reference.fusion_head)]:
    out = op(*args, activation="gelu", backend="cpu")
    expected = ref(*args, activation="gelu")
    torch.testing.assert_close(out, expected)
    leaves = [t for a in args for t in (a if isinstance(a, list) else [a]) if t is not None]
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, leaves, g), torch.autograd.grad(expected, leaves, g))
print(f"  pf_kernels from {pf_kernels.__file__}; backends: "
      f"{ {k: v['available'] for k, v in report.items()} }")
EOF
)
if "$PY" -m pip install "$WHEEL" >"$DIR/install.log" 2>&1 && (cd "$DIR" && "$PY" -c "$OP_CHECK" ok); then
  pass "install: the wheel imports without a warning; cpu backend forward and backward equal the reference"
else
  tail -5 "$DIR/install.log"; fail "install: the installed wheel (log: $DIR/install.log)"
fi
INFO=$(cd "$DIR" && "$PY" -c "import importlib.util as u; print(u.find_spec('pf_kernels').submodule_search_locations[0])")/_build_info.py
if [ -f "$INFO" ] && sed -i "s/^TORCH_VERSION = .*/TORCH_VERSION = '2.0.0'/" "$INFO" \
    && (cd "$DIR" && "$PY" -c "$OP_CHECK" mismatch); then
  pass "mismatch: built against another torch: one warning naming the fix, the library not loaded"
else
  fail "mismatch: a build recorded against another torch ($INFO)"
fi
finish
