#!/usr/bin/env bash
# containers/gpu-check.sh (make gpu-check): run `python -m brainhpc.gpu_check` where the jobs
# run, inside the image, on a GPU node. It exits non-zero when anything fails, no GPU included.
#
#   IMAGE=brainhpc.sif       apptainer exec --nv IMAGE python ...            (a .sif/.simg file)
#   IMAGE=brainhpc:gpu       docker run --gpus all --shm-size=$SHM_SIZE IMAGE ...  (any other)
#   IMAGE=venv               $PYTHON (default .venv/bin/python): the checkout, only when asked
#
# OUT (default runs/gpu-check) is the only folder written (bound into the container); more
# arguments go to python -m brainhpc.gpu_check (--no-smoke, --ranks N, --archs ...).
# CONTAINER_ENGINE=podman for a podman tag; DRY=1 prints the command instead of running it.
set -euo pipefail

IMAGE=${IMAGE:-}
OUT=${OUT:-runs/gpu-check}
SHM_SIZE=${SHM_SIZE:-8g}  # NCCL's intra-node buffers live in /dev/shm: docker gives 64 MB
usage="set IMAGE=PATH.sif (Apptainer), IMAGE=TAG (Docker; CONTAINER_ENGINE=podman) or IMAGE=venv"
die() { echo "make gpu-check: $*" >&2; exit 2; }

[ -n "$IMAGE" ] || die "no image given: $usage"
mkdir -p "$OUT"
out=$(cd "$OUT" && pwd)
# -P and a working directory without brainhpc/ in it: the image's brainhpc is what is tested,
# not a checkout that happens to be the current directory
args=(-P -m brainhpc.gpu_check --out "$out" "$@")

case "$IMAGE" in
  venv)
    py=${PYTHON:-.venv/bin/python}
    [ -x "$py" ] || die "IMAGE=venv: $py is not there (make install)"
    cmd=("$py" -m brainhpc.gpu_check --out "$out" "$@")
    ;;
  *.sif|*.simg)
    [ -f "$IMAGE" ] || die "IMAGE=$IMAGE: no such file (make image VARIANT=gpu && make sif; $usage)"
    engine=${APPTAINER:-$(command -v apptainer || command -v singularity || true)}
    [ -n "$engine" ] || die "IMAGE=$IMAGE: apptainer is not on PATH (module load apptainer?)"
    cmd=("$engine" exec --nv --bind "$out" --pwd "$out" "$IMAGE" python "${args[@]}")
    ;;
  *)
    engine=${CONTAINER_ENGINE:-docker}
    cmd=("$engine" run --rm --gpus all --shm-size="$SHM_SIZE" --user "$(id -u):$(id -g)"
         -v "$out:$out" -w "$out" --entrypoint python "$IMAGE" "${args[@]}")
    ;;
esac

if [ "${DRY:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
echo "gpu-check in $IMAGE: ${cmd[*]}"
exec "${cmd[@]}"
