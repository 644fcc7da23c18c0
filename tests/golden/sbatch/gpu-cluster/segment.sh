#!/bin/bash

# Parameters
#SBATCH --array=0-59%8
#SBATCH --cpus-per-task=8
#SBATCH --dependency='afterany:<prepare, generate job ids>'
#SBATCH --gpus-per-node=1
#SBATCH --job-name=paper-segment
#SBATCH --mem=32G
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=RUN_DIR/logs/segment/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@90
#SBATCH --time=240

# setup
export PYTHONNOUSERSITE=1  # no ~/.local packages in the job, host or container
# SIGTERM (preemption, scancel) reaches the cell through srun; the trap makes this
# script wait for srun and run the teardown below instead of dying at once
trap 'echo "brainhpc: batch script got SIGTERM"' TERM
module purge
module load apptainer
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output RUN_DIR/logs/segment/%A_%a_%t_log.out --cpus-per-task=8 --kill-on-bad-exit=1 apptainer exec --nv --bind RUN_DIR,DATA_DIR/br35h:DATA_DIR/br35h:ro,DATA_DIR/lgg-flair:DATA_DIR/lgg-flair:ro,DATA_DIR/brain-tumor-mri/Training:DATA_DIR/brain-tumor-mri/Training:ro /shared/containers/brainhpc.sif python -u -m submitit.core._submit RUN_DIR/logs/segment


# teardown
rc=$?  # srun's
flag=RUN_DIR/logs/segment/requeue-$SLURM_JOB_ID
if [ -e "$flag" ]; then
  rm -f "$flag"
  task=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID}
  task=${task:-$SLURM_JOB_ID}
  if scontrol show job "$task" | grep -q "JobState=RUNNING"; then
    scontrol requeue "$task" && echo "brainhpc: requeued job $task"
  else
    echo "brainhpc: job $task not requeued: no longer running (cancelled?)"
  fi
fi
exit "$rc"
