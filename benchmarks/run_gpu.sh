#!/usr/bin/env bash
# shellcheck disable=SC2317  # (the steps' helpers run through `bash -c` and "plan_$stage", which shellcheck cannot follow)
# Everything that needs a GPU, in stages that each fit a short GPU lease (the device tool:
# 15 minutes of device time in all, at most 10 minutes a command, only files under $OUT
# come back; or any CUDA machine with PyTorch (CUDA build), Triton and nvcc):
#
#   bash benchmarks/run_gpu.sh smoke    # stage 1, <= 5 min on a bare H200 -- THE ONE THAT MATTERS MOST:
#                                       #   build kdfast's CUDA kernels for this GPU only, kdfast.backends(),
#                                       #   the tests marked gpu and smoke, the headline loss benchmark
#                                       #   (B=4096, C=1000, bf16: eager, kdfast-triton, kdfast-cuda) and
#                                       #   choose_backends.py (kdfast/backend_choice.json)
#   bash benchmarks/run_gpu.sh full     # stage 2, <= 6 min, after smoke on the same warm machine (the
#                                       #   build is reused): the other gpu tests, kd_loss at large C
#                                       #   (--preset gpu-large-c), torch.compile at the headline shape
#   bash benchmarks/run_gpu.sh full2    # stage 3, <= 7 min: the training step (online and from a teacher
#                                       #   cache) and the input pipelines on the GPU (bench_train.py
#                                       #   --preset imagenet, bench_data.py);
#                                       #   least important, and without DALI it measures only the
#                                       #   PyTorch loader. A 15-minute lease holds smoke + full, not full2.
#   bash benchmarks/run_gpu.sh all      # smoke, full, full2 in one go (a machine of your own)
#   bash benchmarks/run_gpu.sh --dry-run [smoke|full|full2|all]   # print the plan; runs nothing, needs no GPU
#
# Options: --out DIR (default: $OUT, else benchmarks/results/gpu-run-<date>), --rebuild (build
# even when the installed build is current), --dry-run. Environment: PYTHON (default python3),
# KDFAST_CUDA_ARCHS (default: the present GPU's compute capability, e.g. 90), KDFAST_COMMIT (the
# commit to record where the copy has no .git), RUN_GPU_BUDGET_SMOKE / _FULL / _FULL2 (seconds).
#
# Each stage: the whole log is tee'd into the output folder from the start (run_gpu-<stage>.log),
# with the provenance in environment.txt (nvidia-smi, driver, torch/Triton/CUDA, git commit,
# date); every benchmark writes its CSV straight into the output folder, row by row as it
# measures. Each step runs under its own timeout, capped by what is left of the stage's
# budget (less a minimum kept for each later step), prints its elapsed seconds, and a
# failing step does not stop the next one; the stage ends with a table of the steps (ok /
# FAILED / TIMEOUT / SKIPPED, seconds) and exits non-zero if any step was not ok.
# On the device tool run one stage per command: $OUT is emptied before each command, and at
# most 8 files come back from it (a stage writes 4 to 6). Triton's compiled kernels stay in
# TRITON_CACHE_DIR (default ~/.triton/cache, never wiped), so a later stage on the same
# machine reuses them; the build is stamped in build/run_gpu-build.stamp for the same reason.
set -uo pipefail
SCRIPT_START_MS=$(date +%s%3N)  # the first stage's budget counts from here
KILL_GRACE=10                   # seconds between a step's SIGTERM at its timeout and SIGKILL
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd -P)
export ROOT

usage() {
  sed -n '3,/^set -uo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

DRY_RUN=0 REBUILD=0 STAGE="" OUT_ARG=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n | --dry-run) DRY_RUN=1 ;;
    --rebuild) REBUILD=1 ;;
    --out) [ $# -ge 2 ] || { echo "--out needs a folder" >&2; exit 2; }; OUT_ARG=$2; shift ;;
    --out=*) OUT_ARG=${1#--out=} ;;
    -h | --help) usage; exit 0 ;;
    smoke | full | full2 | all)
      [ -z "$STAGE" ] || { echo "name one stage (got $STAGE and $1)" >&2; exit 2; }
      STAGE=$1 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$STAGE" ]; then
  if [ "$DRY_RUN" = 1 ]; then STAGE=all; else
    echo "name a stage: smoke, full, full2 or all (--dry-run prints each one's plan; --help)" >&2
    exit 2
  fi
fi
if [ "$STAGE" = all ]; then STAGES=(smoke full full2); else STAGES=("$STAGE"); fi
declare -A BUDGET=([smoke]=${RUN_GPU_BUDGET_SMOKE:-300} [full]=${RUN_GPU_BUDGET_FULL:-360}
                   [full2]=${RUN_GPU_BUDGET_FULL2:-420})
for stage in smoke full full2; do
  case "${BUDGET[$stage]}" in '' | *[!0-9]*) echo "RUN_GPU_BUDGET_${stage^^}: seconds, got '${BUDGET[$stage]}'" >&2; exit 2 ;; esac
done

OUT_DIR=${OUT_ARG:-${OUT:-benchmarks/results/gpu-run-$(date -u +%Y-%m-%d)}}
case "$OUT_DIR" in /*) ;; *) OUT_DIR=$ROOT/$OUT_DIR ;; esac
OUT_DIR=${OUT_DIR%/}
export OUT_DIR
PY=${PYTHON:-python3}
case "$PY" in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # steps run from other folders too
export PY REBUILD
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
export STAMP=$ROOT/build/run_gpu-build.stamp
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=$PATH:/usr/local/cuda/bin
fi

# The log, from here on (not on a dry run).
if [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$OUT_DIR" "$TRITON_CACHE_DIR" || exit 2
  LOG=$OUT_DIR/run_gpu-$STAGE.log
  exec > >(tee -a "$LOG") 2>&1
  TEE_PID=$!
  echo "run_gpu.sh $STAGE: started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname); log $LOG"
fi
finish() {
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$1"
}

# Wheels carried in .whl/ (the device tool's way to bring packages: liger-kernel for the
# large-C comparison, DALI for the data benchmarks, ...) go to /tmp/kdfast-site, before the
# plan is made (which test modules can be collected depends on what is installed).
WHEELS=0
if compgen -G ".whl/*.whl" >/dev/null; then
  WHEELS=1
  export PYTHONPATH="/tmp/kdfast-site${PYTHONPATH:+:$PYTHONPATH}"
  if [ "$DRY_RUN" = 0 ]; then
    echo "installing into /tmp/kdfast-site:" .whl/*.whl
    timeout 120 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
      --target /tmp/kdfast-site .whl/*.whl || echo "warning: installing the wheels in .whl/ failed"
  fi
fi

# The GPU architecture to build for: the present GPU's compute capability ("9.0" -> "90").
detect_archs() {
  local caps
  if [ -n "${KDFAST_CUDA_ARCHS:-}" ]; then echo "$KDFAST_CUDA_ARCHS"; return; fi
  caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' .' | sort -u | paste -sd';')
  if [ -z "$caps" ] && [ "$DRY_RUN" = 0 ]; then
    caps=$("$PY" -c "import torch; print(';'.join(sorted({'%d%d' % torch.cuda.get_device_capability(i)
                                                         for i in range(torch.cuda.device_count())})))" 2>/dev/null)
  fi
  echo "$caps"
}
ARCHS=$(detect_archs)
case "$ARCHS" in *[!0-9\;]*) echo "KDFAST_CUDA_ARCHS must look like 90 or 80;90, got '$ARCHS'" >&2; exit 2 ;; esac
export ARCHS

# Test modules that import, at module level, an optional package that is not installed
# (torchsort, scikit-learn, ...) cannot even be collected: leave them out, say which and why.
# The GPU tests are then selected by marker over the rest of tests/. (torch, triton, numpy and
# pytest are needed by everything: without them the tests fail, as they should.)
test_ignores() {
  "$PY" - "$ROOT/tests" <<'EOF'
import ast, importlib.util, pathlib, sys
tests = pathlib.Path(sys.argv[1])
local = {p.stem for p in tests.glob("*.py")} | {"kdfast", "__future__", "torch", "triton", "numpy", "pytest"}
def installed(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
for path in sorted(tests.glob("test_*.py")):
    missing = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        missing |= {n.split(".")[0] for n in names if n.split(".")[0] not in local and not installed(n.split(".")[0])}
    if missing:
        print(f"tests/{path.name}\t{', '.join(sorted(missing))}")
EOF
}
IGNORE_ARGS="" IGNORE_NOTE=""
if IGNORED=$(test_ignores 2>&1); then
  while IFS=$'\t' read -r module packages; do
    [ -n "$module" ] || continue
    IGNORE_ARGS+=" --ignore=$module"
    IGNORE_NOTE+="${IGNORE_NOTE:+; }$module (imports $packages, not installed)"
  done <<<"$IGNORED"
else
  IGNORE_NOTE="could not check the test modules' imports with $PY: $IGNORED"
fi
PYTEST_PLUGINS_NOTE=""
has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
TIMEOUT_SMOKE="" TIMEOUT_FULL="" XDIST_SMOKE="" XDIST=""
if has_module pytest_timeout; then TIMEOUT_SMOKE=" --timeout=120" TIMEOUT_FULL=" --timeout=120"
else PYTEST_PLUGINS_NOTE+="pytest-timeout absent (no per-test timeouts); "; fi
# The tests spend most of their time having Triton compile kernels, one at a time per process:
# spread them over 4 (smoke) and 8 (full) processes when pytest-xdist is there.
if has_module xdist; then XDIST_SMOKE=" -n 4" XDIST=" -n 8"
else PYTEST_PLUGINS_NOTE+="pytest-xdist absent (the tests run in one process); "; fi

# ---------------------------------------------------------------------------------------------
# The steps' helpers (exported: each step runs as `bash -c` under `timeout`).

write_environment() {  # provenance of this stage's results, appended to environment.txt
  {
    echo "=== run_gpu.sh $1, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname), $(nproc) CPUs, $(uname -srm)"
    if git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
      echo "git commit: $(git -C "$ROOT" rev-parse HEAD)"
      git -C "$ROOT" status --porcelain --untracked-files=no | sed 's/^/  /'
    else
      echo "git commit: no .git in this copy of the tree; KDFAST_COMMIT=${KDFAST_COMMIT:-<unset: rows say 'unknown'>}"
    fi
    echo "KDFAST_COMMIT=${KDFAST_COMMIT:-}"
    echo "sources sha256: $(cd "$ROOT" && find kdfast kernels csrc benchmarks setup.py -type f \( -name '*.py' \
      -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.sh' \) ! -path '*/__pycache__/*' \
      | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)  (of kdfast/ kernels/ csrc/ benchmarks/ setup.py sources)"
    echo "KDFAST_CUDA_ARCHS=$ARCHS  TRITON_CACHE_DIR=$TRITON_CACHE_DIR  PYTHONPATH=${PYTHONPATH:-}"
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,compute_cap,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
    nvidia-smi
    echo "nvcc: $(command -v nvcc) $(nvcc --version | grep -i release)"
    "$PY" - <<'EOF'
import importlib.metadata as metadata, platform, sys
import torch, triton
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(),
      "triton", triton.__version__)
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch",
      "capability", torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "-")
for name in ("numpy", "scipy", "scikit-learn", "pillow", "matplotlib", "pytest", "pytest-xdist", "pytest-timeout",
             "torchsort", "nvidia-dali-cuda120", "nvidia-dali-cuda130", "liger-kernel", "kdfast"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name}: not installed")
EOF
  } 2>&1 | tee -a "$OUT_DIR/environment.txt"
}

build_fingerprint() {  # what the installed build depends on: the GPU archs, python/torch, nvcc, the sources
  echo "archs $ARCHS"
  "$PY" -c "import sys, torch; print('python', sys.executable, sys.version.split()[0]); print('torch', torch.__version__, torch.version.cuda)" || return 1
  echo "nvcc $(nvcc --version 2>/dev/null | grep -i release)"
  (cd "$ROOT" && find csrc setup.py pyproject.toml -type f ! -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum)
}

installed_ok() {  # kdfast imports, from this checkout, with both compiled extensions (from outside the tree)
  (cd /tmp && "$PY" -c "
import os, sys, kdfast, kdfast._C, kdfast._C_cuda
here = os.path.realpath(kdfast.__file__)
assert here.startswith(sys.argv[1] + os.sep), f'kdfast is imported from {here}, not from {sys.argv[1]}'
print('installed:', here, '+', kdfast._C_cuda.__file__)" "$ROOT")
}

build_kdfast() {  # skip when build/run_gpu-build.stamp matches and kdfast imports; else build and stamp
  local fingerprint so
  if [ -z "$ARCHS" ]; then echo "no GPU found (nvidia-smi, torch.cuda): no architecture to build for"; return 1; fi
  fingerprint=$(build_fingerprint) || return 1
  if [ "$REBUILD" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ] && installed_ok; then
    echo "the installed build is current ($STAMP: same archs, python, torch, nvcc and csrc/, setup.py): not rebuilding"
    return 0
  fi
  rm -f "$STAMP"
  echo "building for KDFAST_CUDA_ARCHS=$ARCHS (sm_${ARCHS//;/, sm_} and PTX for the last)"
  (cd "$ROOT" && KDFAST_CUDA=1 KDFAST_CUDA_ARCHS="$ARCHS" "$PY" -m pip install --disable-pip-version-check \
     --no-build-isolation --no-deps -e .) || return 1
  installed_ok || return 1
  mkdir -p "$(dirname "$STAMP")" && printf '%s\n' "$fingerprint" >"$STAMP"
  so=$(cd /tmp && "$PY" -c "import kdfast._C_cuda as m; print(m.__file__)")
  if command -v cuobjdump >/dev/null 2>&1; then  # the machine code and PTX the module carries
    cuobjdump --list-elf "$so" | sed 's/^/  /'
    cuobjdump --list-ptx "$so" | sed 's/^/  /'
  fi
}
export -f write_environment build_fingerprint installed_ok build_kdfast

# ---------------------------------------------------------------------------------------------
# The plan: per stage, each step's name, time cap (s), minimum kept for it (s), command, note.

STEP_STAGE=() STEP_NAME=() STEP_CAP=() STEP_MIN=() STEP_CMD=() STEP_NOTE=()
add_step() {
  STEP_STAGE+=("$1") STEP_NAME+=("$2") STEP_CAP+=("$3") STEP_MIN+=("$4") STEP_CMD+=("$5") STEP_NOTE+=("${6:-}")
}
PYQ=$(printf '%q' "$PY")
OUTQ=$(printf '%q' "$OUT_DIR")
PYTEST="$PYQ -m pytest -p no:cacheprovider -q -rfE --durations=15 tests/$IGNORE_ARGS"
BUILD_NOTE="skipped when $STAMP matches and kdfast imports; else: KDFAST_CUDA=1 KDFAST_CUDA_ARCHS=${ARCHS:-<cc>} $PY -m pip install --no-build-isolation --no-deps -e . ; then cuobjdump --list-elf/--list-ptx of kdfast/_C_cuda*.so"

common_steps() {  # every stage starts with these
  add_step "$1" environment 30 5 "write_environment $1" \
    "nvidia-smi (name, driver, memory, clocks), nvcc, python/torch/CUDA/Triton and package versions, git commit, date -> environment.txt"
  add_step "$1" build 150 "$2" build_kdfast "$BUILD_NOTE"
}

plan_smoke() {
  common_steps smoke 40
  add_step smoke backends 30 5 \
    "cd /tmp && $PYQ -c 'import kdfast; print(kdfast.__file__); print(*kdfast.backends().values(), sep=chr(10))'"
  add_step smoke tests-smoke 150 20 \
    "$PYTEST -m 'gpu and smoke'$XDIST_SMOKE$TIMEOUT_SMOKE --junitxml=$OUTQ/gpu_tests_smoke.xml"
  add_step smoke bench-headline 90 60 \
    "$PYQ benchmarks/bench_losses.py --preset gpu-headline --output $OUTQ/losses_gpu.csv" \
    "B=4096, C=1000, bf16; eager, kdfast-triton, kdfast-cuda; all six losses"
  add_step smoke choose-backends 20 5 \
    "$PYQ benchmarks/choose_backends.py --csv $OUTQ/losses_gpu.csv && cp kdfast/backend_choice.json $OUTQ/" \
    "the faster fused backend per loss on this GPU -> kdfast/backend_choice.json"
}

plan_full() {
  common_steps full 10
  add_step full tests-full 200 30 \
    "$PYTEST -m 'gpu and not smoke'$XDIST$TIMEOUT_FULL --junitxml=$OUTQ/gpu_tests_full.xml"
  add_step full bench-large-c 90 30 \
    "$PYQ benchmarks/bench_losses.py --preset gpu-large-c --output $OUTQ/losses_gpu_large_c.csv --plot $OUTQ/losses_gpu_large_c.png" \
    "kd_loss, C = 32k ... 256k (up to 1 G logits a tensor, drawn on the GPU); eager, kdfast-cuda, kdfast-triton, liger where installed"
  add_step full bench-compiled 90 30 \
    "TORCHINDUCTOR_COMPILE_THREADS=8 $PYQ benchmarks/bench_losses.py --preset gpu-headline --providers eager compiled --output $OUTQ/losses_gpu_compiled.csv" \
    "torch.compile of the reference at the headline shape, next to eager from the same run"
}

plan_full2() {
  common_steps full2 10
  add_step full2 bench-train 150 30 \
    "$PYQ benchmarks/bench_train.py --preset imagenet --workers 16 --output $OUTQ/train_gpu.csv" \
    "ResNet-34 -> ResNet-18, CMKD, bf16, channels_last, 224 px, batch 256: synthetic vs DALI (if installed) vs PyTorch loader; needs scikit-learn for its photos"
  add_step full2 bench-train-cache 120 20 \
    "$PYQ benchmarks/bench_train.py --preset imagenet --method kd --workers 16 --feeds synthetic synthetic+cache torch torch+cache --steps 10 --repeats 3 --output $OUTQ/teacher_cache_gpu.csv" \
    "KD step from an offline teacher cache (top-10, built first: build vs teacher-inference images/s) vs the online teacher, ResNet-34 -> ResNet-18 bf16 224 px"
  add_step full2 bench-data 90 20 \
    "providers=torch-gpu; $PYQ -c 'import nvidia.dali' 2>/dev/null && providers='dali-gpu torch-gpu'; $PYQ benchmarks/bench_data.py --providers \$providers --workers 16 --batch-size 256 --output $OUTQ/data_gpu.csv" \
    "images/s of the loaders delivering to the GPU; needs scikit-learn for its photos"
}

for stage in "${STAGES[@]}"; do "plan_$stage"; done

print_plan() {
  local i stage k n
  echo "run_gpu.sh plan: stage(s) ${STAGES[*]}; output folder $OUT_DIR"
  echo "  python: $PY; GPU architecture for the build: ${ARCHS:-<cc> (no GPU seen here: read from nvidia-smi --query-gpu=compute_cap on the GPU machine, e.g. 9.0 -> 90)}"
  echo "  TRITON_CACHE_DIR=$TRITON_CACHE_DIR (kept between stages)"
  [ "$WHEELS" = 0 ] || echo "  the wheels in .whl/ are installed into /tmp/kdfast-site (on PYTHONPATH) first"
  echo "  test modules left out (as $PY sees them; decided again when the stage runs): ${IGNORE_NOTE:-none}"
  [ -z "$PYTEST_PLUGINS_NOTE" ] || echo "  note: ${PYTEST_PLUGINS_NOTE%; }"
  for stage in "${STAGES[@]}"; do
    n=0; for i in "${!STEP_NAME[@]}"; do [ "${STEP_STAGE[$i]}" = "$stage" ] && n=$((n + 1)); done
    echo
    echo "stage $stage: budget ${BUDGET[$stage]} s (a step's timeout: its cap, or what is left of the budget less the minimum kept for each later step and ${KILL_GRACE} s, if shorter)"
    k=0
    for i in "${!STEP_NAME[@]}"; do
      [ "${STEP_STAGE[$i]}" = "$stage" ] || continue
      k=$((k + 1))
      printf '  [%s %d/%d] %-16s cap %3d s, min %2d s\n' "$stage" "$k" "$n" "${STEP_NAME[$i]}" "${STEP_CAP[$i]}" "${STEP_MIN[$i]}"
      printf '      $ %s\n' "${STEP_CMD[$i]}"
      [ -z "${STEP_NOTE[$i]}" ] || printf '      # %s\n' "${STEP_NOTE[$i]}"
    done
  done
}

if [ "$DRY_RUN" = 1 ]; then
  print_plan
  echo
  echo "(dry run: nothing was run)"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Running.

RES_NAME=() RES_STATUS=() RES_SECS=() RES_LIMIT=()
CHILD="" INTERRUPTED=0
on_signal() {
  INTERRUPTED=1
  echo "run_gpu.sh: interrupted; stopping the current step"
  [ -z "$CHILD" ] || kill -TERM "$CHILD" 2>/dev/null
}
trap on_signal INT TERM

now_ms() { date +%s%3N; }
seconds() { printf '%d.%d' $(($1 / 1000)) $((($1 % 1000) / 100)); }

run_stage() {  # run_stage STAGE [START_MS]: its steps, each within what is left of the stage's budget
  local stage=$1 deadline i j reserve left limit rc begin took status k=0 n=0
  deadline=$((${2:-$(now_ms)} + ${BUDGET[$stage]} * 1000))
  for i in "${!STEP_NAME[@]}"; do [ "${STEP_STAGE[$i]}" = "$stage" ] && n=$((n + 1)); done
  echo
  echo "########## stage $stage: $n steps, budget ${BUDGET[$stage]} s, started $(date -u +%H:%M:%SZ)"
  for i in "${!STEP_NAME[@]}"; do
    [ "${STEP_STAGE[$i]}" = "$stage" ] || continue
    k=$((k + 1))
    reserve=0
    for ((j = i + 1; j < ${#STEP_NAME[@]}; j++)); do
      [ "${STEP_STAGE[$j]}" = "$stage" ] && reserve=$((reserve + STEP_MIN[j]))
    done
    left=$(((deadline - $(now_ms)) / 1000 - reserve - KILL_GRACE))
    limit=${STEP_CAP[$i]}
    [ "$left" -lt "$limit" ] && limit=$left
    RES_NAME+=("$stage/${STEP_NAME[$i]}")
    if [ "$INTERRUPTED" = 1 ] || [ "$limit" -lt "${STEP_MIN[$i]}" ]; then
      if [ "$INTERRUPTED" = 1 ]; then status="SKIPPED (interrupted)"; else status="SKIPPED (no time left)"; fi
      echo "=== [$stage $k/$n] ${STEP_NAME[$i]}: $status"
      RES_STATUS+=("$status") RES_SECS+=("0.0") RES_LIMIT+=("-")
      continue
    fi
    echo
    echo "=== [$stage $k/$n] ${STEP_NAME[$i]} (timeout $limit s) at $(date -u +%H:%M:%SZ)"
    echo "\$ ${STEP_CMD[$i]}"
    begin=$(now_ms)
    (cd "$ROOT" && exec timeout -k "$KILL_GRACE" "$limit" bash -o pipefail -c "${STEP_CMD[$i]}") </dev/null &
    CHILD=$!
    wait "$CHILD"
    rc=$?
    while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; rc=$?; done  # woken by a signal: reap it
    CHILD=""
    took=$(($(now_ms) - begin))
    if [ "$rc" = 0 ]; then status=ok
    elif [ "$INTERRUPTED" = 1 ]; then status="INTERRUPTED"
    elif [ "$rc" = 124 ] || { [ "$rc" = 137 ] && [ "$took" -ge $((limit * 1000)) ]; }; then status="TIMEOUT"
    else status="FAILED (exit $rc)"; fi
    echo "=== [$stage $k/$n] ${STEP_NAME[$i]}: $status in $(seconds "$took") s (timeout $limit s)"
    RES_STATUS+=("$status") RES_SECS+=("$(seconds "$took")") RES_LIMIT+=("$limit")
  done
}

print_plan
START_MS=$SCRIPT_START_MS
for stage in "${STAGES[@]}"; do
  if [ "$stage" = "${STAGES[0]}" ]; then run_stage "$stage" "$SCRIPT_START_MS"; else run_stage "$stage"; fi
done

echo
echo "########## summary: run_gpu.sh $STAGE, $(seconds $(($(now_ms) - START_MS))) s in all, output folder $OUT_DIR"
printf '  %-24s %-26s %8s %8s\n' step status seconds timeout
failed=0
for i in "${!RES_NAME[@]}"; do
  printf '  %-24s %-26s %8s %8s\n' "${RES_NAME[$i]}" "${RES_STATUS[$i]}" "${RES_SECS[$i]}" "${RES_LIMIT[$i]}"
  [ "${RES_STATUS[$i]}" = ok ] || failed=$((failed + 1))
done
echo "files in $OUT_DIR:"
(cd "$OUT_DIR" && ls -l)
files=$(find "$OUT_DIR" -type f | wc -l)
[ "$files" -le 8 ] || echo "note: $files files here; the device tool brings back at most 8 from \$OUT (run one stage per command)"
[ "$INTERRUPTED" = 0 ] || { echo "interrupted; $failed step(s) not ok"; finish 130; }
if [ "$failed" -gt 0 ]; then echo "$failed step(s) not ok"; finish 1; fi
echo "all steps ok"
finish 0
