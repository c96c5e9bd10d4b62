#!/usr/bin/env bash
# First run on a new cluster: the tiny model through the whole T-PPO loop on one node in a few
# minutes (generation, rewards, values, both updates, weight sync, a checkpoint), then a resume
# from that checkpoint; prints a PASS/FAIL report to paste into an issue (python -m
# megatron_tppo.smoke does the work and the checks; this script only sets up the node).
#
#   mkdir -p runs    # Slurm opens --output before this script runs
#   python tools/build_tiny_model.py --out .cache/tiny_smoke   # once, on a shared filesystem
#   sbatch slurm/smoke.sh .cache/tiny_smoke [key.sub=value ...]
#
# On GPU nodes pass parallel.device=cuda; the GPUs Slurm gave this node become Ray's
# (parallel.local_gpus). Without Slurm: TPPO_PYTHON=.venv/bin/python bash slurm/smoke.sh DIR.
# Output: runs/smoke-<job id>/ (smoke_report.txt, smoke_part1.log, smoke_part2.log, tensorboard/).
# Exit 0 when every check passed, 1 otherwise.
#
#SBATCH --job-name=tppo-smoke
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --time=00:20:00
#SBATCH --output=runs/%x-%j.out
# --cpus-per-task: everything (Ray, the trainers, vLLM's workers) runs in this one task; where the
# cluster binds tasks to cores, the default of one CPU would put all of it on a single core.
# Override on the command line (sbatch --cpus-per-task=N) for smaller nodes.
set -euo pipefail

root=${TPPO_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$root"
py=${TPPO_PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
model=${1:?usage: sbatch slurm/smoke.sh MODEL_DIR [key.sub=value ...]}
shift
extra=()
# the GPUs Slurm gave this job on its node (CUDA_VISIBLE_DEVICES, set by the gres/gpu plugin)
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]]; then
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    extra+=("parallel.local_gpus=${#visible[@]}")
fi
exec "$py" -m megatron_tppo.smoke --model "$model" --out "${TPPO_SMOKE_OUT:-runs/smoke-${SLURM_JOB_ID:-local}}" \
    "${extra[@]}" "$@"
