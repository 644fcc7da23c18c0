#!/usr/bin/env bash
# A stand-in for `apptainer exec --bind LIST IMAGE` in the sweep's container prefix, for tests on
# a machine without Apptainer:
#   prefix = "bash tests/container_standin.sh --bind {binds} /path/to/venv/bin/python"
# the sweep appends `python ARGS...`. What it keeps of a container, for the sweep's purposes:
# Slurm's client is unreachable inside (PATH holds only the "image's" bin folder, SLURM_CONF
# points nowhere), so a requeue must happen on the host; every bind source must exist, as
# Apptainer insists. It logs the binds it was given to stderr.
set -euo pipefail
[ "${1:-}" = --bind ] || { echo "container_standin: usage: --bind LIST PYTHON python ARGS" >&2; exit 64; }
IFS=, read -r -a specs <<<"$2"
for spec in "${specs[@]}"; do
  src=${spec%%:*}
  [ -e "$src" ] || { echo "container_standin: bind source $src does not exist" >&2; exit 65; }
done
echo "container_standin: binds $2" >&2
image_python=$3
[ "${4:-}" = python ] || { echo "container_standin: expected 'python' after the image, got '${4:-}'" >&2; exit 64; }
shift 4
export PATH=$(dirname "$image_python") SLURM_CONF=/nonexistent/slurm.conf
exec "$image_python" "$@"
