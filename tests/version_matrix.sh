#!/usr/bin/env bash
# The version matrix: run before changing a pin in setup.cfg's train extra (README, "Tested versions").
#
#   bash tests/version_matrix.sh [TRANSFORMERS_VERSION] [-- PYTEST_ARGS...]
#
# 1. pins: resolves a clean `pip install '.[train]'` (dry run, PyPI only: this machine's pip config and
#    constraint file are left out) and checks that every package pinned in setup.cfg resolves to its pin.
# 2. matrix: builds a second venv ($MATRIX_VENV, default .venv-matrix) with the pinned set but another
#    transformers, and runs the CPU training tier there (pytest -m "train and not slurm and not gpu": real
#    LLaMA-Factory on the CPU, the speed features' equality tests included). The default, 4.56.2, is the oldest
#    release that LLaMA-Factory 0.9.5 (>=4.55) and the pinned trl 0.24.0 (>=4.56.1) accept together; the newest
#    one LLaMA-Factory accepts, 5.6.0, is known-bad, and the one below it, 5.5.4, is the pin.
#    MATRIX_FROM=DIR copies an existing venv that has the train+test extras (cp -a) instead of installing them,
#    which saves the downloads. A copied venv's scripts keep the old path in their shebangs: everything here
#    goes through `python -m`.
# MATRIX_SKIP_PINS=1 skips step 1. The last line is the result to record in the README: date, versions, pass/fail counts, duration.
# Not part of CI (.ci/run), which runs the tiers on the pins: the tier takes ~7 min on the 2-core machine (18 when
# shared), and a second venv built from scratch downloads and installs torch and the rest once more.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
version=${1:-4.56.2}
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
venv=${MATRIX_VENV:-$repo/.venv-matrix}
py=$venv/bin/python

if [ -z "${MATRIX_SKIP_PINS:-}" ]; then
echo "== pins: a clean install of '.[train]' (PyPI only)"
report=$(mktemp)
trap 'rm -f "$report"' EXIT
env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
  python3 -m pip install --dry-run --ignore-installed --quiet --report "$report" "$repo[train]"
python3 - "$report" "$repo/setup.cfg" <<'EOF'
import configparser, json, re, sys
report, cfg = sys.argv[1], sys.argv[2]
resolved = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
            for i in json.load(open(report))["install"]}
parser = configparser.ConfigParser()
parser.read(cfg)
pins = {}
for line in parser["options.extras_require"]["train"].splitlines():
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
    if m:
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
bad = [f"{n}: pinned {v}, resolves to {resolved.get(n, 'nothing')}" for n, v in pins.items() if resolved.get(n) != v]
print(f"{len(pins)} pins, {len(resolved)} packages resolved")
if bad:
    sys.exit("pins do not hold:\n  " + "\n  ".join(bad))
print("every pin resolves to itself")
EOF
fi

echo "== matrix: transformers $version in $venv"
if [ ! -x "$py" ]; then
  if [ -n "${MATRIX_FROM:-}" ]; then
    cp -a "$MATRIX_FROM" "$venv"
  else
    python3 -m venv "$venv"
    "$py" -m pip install -q -e "$repo[train,test]"
  fi
fi
# transformers' own requirements pull the tokenizers / huggingface_hub it needs; everything else stays pinned.
"$py" -m pip install -q "transformers==$version"
"$py" -m pip check | grep -v "^sftjobs " || true   # sftjobs' own transformers pin is the one knowingly broken here
versions=$("$py" - <<'EOF'
from importlib.metadata import version
print(", ".join(f"{n} {version(n)}" for n in ("transformers", "llamafactory", "torch", "deepspeed", "accelerate",
                                             "peft", "trl", "tokenizers", "huggingface_hub")))
EOF
)
echo "$versions"
started=$(date +%s)
set +e
PYTHONPATH=$repo "$py" -m pytest -p no:cacheprovider -q -m "train and not slurm and not gpu" "$@" 2>&1 \
  | tee "$venv/version-matrix.log"
code=${PIPESTATUS[0]}
set -e
seconds=$(( $(date +%s) - started ))
counts=$(tail -n 1 "$venv/version-matrix.log" | sed 's/^=* *//; s/ *=*$//')
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo "${MATRIX_COMMIT:-unknown}")
echo "version matrix: $(date -u +%Y-%m-%d), commit $commit, $versions, python $("$py" -c 'import platform; print(platform.python_version())'): $counts (${seconds} s, exit $code)"
exit "$code"
