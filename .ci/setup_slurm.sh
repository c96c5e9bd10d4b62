#!/usr/bin/env bash
# Install what tests/slurm needs for a real local Slurm 22.05 cluster (Debian 12), when missing:
# slurmctld, slurmd, the client commands, munge, and shellcheck for the launch scripts' lint test.
# Idempotent: does nothing (and needs no network) when everything is already there. Needs root.
# The test starts and stops its own daemons from a temp dir; nothing is enabled or started here.
set -euo pipefail
need=()
command -v slurmctld >/dev/null || [[ -x /usr/sbin/slurmctld ]] || need+=(slurmctld)
command -v slurmd >/dev/null || [[ -x /usr/sbin/slurmd ]] || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || [[ -x /usr/sbin/munged ]] || need+=(munge)
command -v shellcheck >/dev/null || need+=(shellcheck)
if [[ ${#need[@]} -eq 0 ]]; then
    echo "[setup_slurm] slurm, munge and shellcheck present"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "[setup_slurm] missing ${need[*]}; run as root to install them" >&2
    exit 1
fi
echo "[setup_slurm] installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "[setup_slurm] done"
