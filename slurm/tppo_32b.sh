#!/usr/bin/env bash
# T-PPO on a multi-node GPU cluster (8 GPUs per node): the Qwen2.5-32B recipe by default.
#
#   mkdir -p runs    # Slurm opens --output before this script runs: the folder must exist
#   sbatch [--nodes=K --time=... --partition=...] slurm/tppo_32b.sh [CONFIG] [key.sub=value ...]
#
# Submit from the repository root (on a filesystem every node sees), with the project's Python
# environment active or TPPO_PYTHON pointing at it. CONFIG defaults to
# examples/qwen2.5_32b/tppo.yaml; `key.sub=value` arguments override it (python -m
# megatron_tppo.train --help-config lists every key). Check the layout first:
#   python -m megatron_tppo.plan --config CONFIG --nodes K --gpus-per-node 8
#
# What it does: a Ray head on the first node and one Ray worker on every other node, each an
# `srun --nodes=1 --ntasks=1 -c <the node's CPUs> -w <node>` step in the background
# (slurm/ray_node.sh: free ports picked on its node); waits until Ray sees every node (and the
# GPUs asked for); runs the driver on this (the head) node with parallel.ray_address=<head>:<port>;
# forwards SIGTERM/SIGUSR1 to the driver so it can checkpoint; finally stops the Ray steps it started, by pid. No `ray stop`, no
# pkill: other jobs of the same user on a shared node are left alone.
#
# Output: runs/<job name>-<job id>/ (or logging.output_dir=... when given): config.yaml,
# tensorboard/, checkpoints/, ray-<node>.log per Ray node, driver.log, slurm.out -> Slurm's output
# file (runs/<job name>-<job id>.out).
#
# Resume: the driver always runs with checkpoint.resume=true (pass checkpoint.resume=false to
# start over), so a requeued job (--requeue: preemption, node failure, `scontrol requeue`; same job
# id, same run dir) continues from the newest whole checkpoint by itself, and so does a new job
# given logging.output_dir=<a stopped run's dir>. A run dir without checkpoints starts fresh.
#
# Environment knobs: TPPO_PYTHON (python of the project's venv; default python3), TPPO_RAY (ray
# CLI; default: next to TPPO_PYTHON, else on PATH), TPPO_ROOT (repo root; default the submit
# dir), TPPO_RAY_WAIT_S (cluster start timeout, default 600), TPPO_NODE_IP (see ray_node.sh),
# TPPO_IFACE (network interface for Ray and the weight transfer, e.g. ib0; its address becomes
# every node's Ray address), TPPO_OBJECT_STORE_GB (Ray object store per node; checked against
# /dev/shm), TPPO_RAY_AUTH=disabled (turn Ray token auth off; default a fresh per-job token, kept 0600 in
# the run dir, so nobody else on the network can submit work to this job's Ray).
#
#SBATCH --job-name=tppo-32b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --output=runs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# --signal=B:USR1@900: Slurm sends SIGUSR1 to this script 15 minutes before the time limit; the
# trap below forwards it to the driver, which has time to write a checkpoint.
# --exclusive --mem=0: whole nodes (all CPUs and host memory: trainers offload to it while vLLM
# generates); --ntasks-per-node=1:
# one Ray node per Slurm node, Ray schedules GPUs inside it. On CPU-only (emulated) nodes
# override: sbatch --gpus-per-node=0 (or --gres=none) ... .
set -euo pipefail

log() { echo "[tppo-slurm $(date +%H:%M:%S)] $*"; }

root=${TPPO_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$root"
py=${TPPO_PYTHON:-python3}
py_dir=$(dirname "$(command -v "$py")")
if [[ -z "${TPPO_RAY:-}" && -x "$py_dir/ray" ]]; then TPPO_RAY="$py_dir/ray"; fi
export TPPO_PYTHON="$py" TPPO_RAY="${TPPO_RAY:-ray}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

config=examples/qwen2.5_32b/tppo.yaml
if [[ $# -gt 0 && "$1" != *=* ]]; then config=$1; shift; fi
overrides=("$@")
job_id=${SLURM_JOB_ID:?run this with sbatch (or inside salloc)}
run_dir="runs/${SLURM_JOB_NAME:-tppo}-${job_id}"
for kv in "${overrides[@]}"; do  # the last logging.output_dir= wins, as in the driver
    if [[ "$kv" == logging.output_dir=* ]]; then run_dir=${kv#logging.output_dir=}; fi
done
mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)
stdout_file=$(scontrol show job -o "$job_id" 2>/dev/null | tr ' ' '\n' | sed -n 's/^StdOut=//p' || true)
if [[ -n "$stdout_file" && -e "$stdout_file" ]]; then ln -sfn "$stdout_file" "$run_dir/slurm.out"; fi

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
n_nodes=${#nodes[@]}
gpus_per_node=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
gpus_per_node=${gpus_per_node##*:}  # "h100:8" -> 8
expected_gpus=$(( n_nodes * ${gpus_per_node:-0} ))
# CPUs the job holds on each node, in node-list order: SLURM_JOB_CPUS_PER_NODE reads "2(x2)" or
# "72,36(x2)". Each Ray step asks for all of them (srun -c): a step with the default one CPU per
# task is bound to a single core where the cluster binds tasks (task/affinity or task/cgroup, e.g.
# TaskPluginParam=Cores), and the raylet, every trainer rank and the vLLM workers would share it.
# ray_node.sh declares the same count to Ray (--num-cpus). Ray's Slurm template passes -c likewise.
node_cpus=()
IFS=, read -r -a cpn <<<"${SLURM_JOB_CPUS_PER_NODE:-}"
for item in "${cpn[@]}"; do
    if [[ "$item" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
        for ((i = 0; i < BASH_REMATCH[2]; i++)); do node_cpus+=("${BASH_REMATCH[1]}"); done
    elif [[ "$item" =~ ^[0-9]+$ ]]; then
        node_cpus+=("$item")
    fi
done
if [[ ${#node_cpus[@]} -ne $n_nodes ]]; then
    log "cannot read the CPUs of ${n_nodes} node(s) from" \
        "SLURM_JOB_CPUS_PER_NODE='${SLURM_JOB_CPUS_PER_NODE:-}'" >&2
    exit 2
fi

log "job ${job_id}: ${n_nodes} node(s) ${nodes[*]}, head ${head_node}, ${gpus_per_node} GPU(s)/node," \
    "CPUs per node ${node_cpus[*]}; run dir ${run_dir}"
log "config ${config} ${overrides[*]}"

# Fail before any Ray starts when the config is wrong (validation only, no heavy import) or, on
# GPU nodes, when the layout does not divide or fit (megatron_tppo.plan; TPPO_SKIP_PLAN=1 skips)
plan_args=()
if [[ "${gpus_per_node:-0}" -gt 0 && -z "${TPPO_SKIP_PLAN:-}" ]]; then
    plan_args=(--nodes "$n_nodes" --gpus-per-node "$gpus_per_node")
fi
"$py" -m megatron_tppo.train --config "$config" "${overrides[@]}" "logging.output_dir=$run_dir" --dry-run \
    "${plan_args[@]}" >"$run_dir/dry_run.txt"
if [[ ${#plan_args[@]} -gt 0 ]]; then sed -n '/^cluster:/,$p' "$run_dir/dry_run.txt"; fi

# Ray token auth with a per-job token: every step and the driver read it from the run dir
if [[ "${TPPO_RAY_AUTH:-token}" == disabled ]]; then
    export RAY_AUTH_MODE=disabled
else
    token_file="$run_dir/.ray_auth_token"
    (umask 077 && "$py" -c 'import secrets; print(secrets.token_hex(32))' >"$token_file")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token_file"
fi

# This script runs on the first node of the allocation: the head. Its GCS port is probed free
# here, starting from a job-dependent base so two jobs on one node do not even try the same one.
# Ray replaces a loopback --node-ip-address by the address of the default route, so do the same
# here (hosts whose name resolves to 127.0.x.x, like the emulated nodes of tests/slurm).
node_ip() {
    "$py" - <<'EOF'
import socket
try:
    ip = socket.gethostbyname(socket.gethostname())
except OSError:
    ip = "127.0.0.1"
if ip.startswith("127."):
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("8.8.8.8", 80))  # UDP connect: picks the route, sends nothing
            ip = s.getsockname()[0]
    except OSError:
        pass
print(ip)
EOF
}
if [[ -n "${TPPO_IFACE:-}" && -z "${TPPO_NODE_IP:-}" ]]; then  # the head's address on the fast fabric
    TPPO_NODE_IP=$("$py" -m megatron_tppo.netinfo ip --iface "$TPPO_IFACE")
fi
head_ip=${TPPO_NODE_IP:-$(node_ip)}
gcs_port=$("$py" - "$job_id" <<'EOF'
import socket, sys
base = 20000 + (int(sys.argv[1]) * 7) % 20000
for p in list(range(base, min(base + 200, 65000))):
    try:
        with socket.socket() as s:
            s.bind(("", p))
        print(p)
        break
    except OSError:
        continue
else:
    with socket.socket() as s:
        s.bind(("", 0))
        print(s.getsockname()[1])
EOF
)
ray_address="${head_ip}:${gcs_port}"

ray_pids=()
driver_pid=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT TERM USR1 INT
    if [[ -n "$driver_pid" ]] && kill -0 "$driver_pid" 2>/dev/null; then
        log "stopping the driver (pid ${driver_pid})"
        kill -TERM "$driver_pid" 2>/dev/null || true
        wait "$driver_pid" 2>/dev/null || true
    fi
    # Our own srun steps only. SIGUSR2: srun forwards it to the step (ray_node.sh stops its Ray and
    # removes its temp dir); SIGTERM would make srun kill the step at once, so it is the fallback.
    local sig
    for sig in USR2 TERM; do
        for pid in "${ray_pids[@]}"; do kill -s "$sig" "$pid" 2>/dev/null || true; done
        for _ in $(seq 30); do
            local alive=0
            for pid in "${ray_pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            [[ $alive == 0 ]] && break
            sleep 1
        done
    done
    wait 2>/dev/null || true
    log "done (exit ${rc})"
    exit "$rc"
}
trap cleanup EXIT
# shellcheck disable=SC2317  # invoked by traps
forward() {  # SIGTERM (scancel, preemption) / SIGUSR1 (--signal): let the driver checkpoint
    if [[ -z "$driver_pid" ]]; then
        log "got SIG$1 before the driver started: stopping"
        exit 143
    fi
    log "got SIG$1: forwarding to the driver (pid ${driver_pid})"
    kill -s "$1" "$driver_pid" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1

start_node() {  # role node cpus: one background srun step, pid recorded
    local role=$1 node=$2 cpus=$3
    # --overlap: the Ray steps and the driver share the allocation's CPUs/GPUs (Ray schedules them);
    # each Ray step asks for its node's GPUs explicitly, so Slurm sets its CUDA_VISIBLE_DEVICES, and
    # for all of the node's CPUs (-c, see above)
    local gpus=()
    if [[ "${gpus_per_node:-0}" -gt 0 ]]; then gpus=(--gpus-per-node="$gpus_per_node"); fi
    srun --nodes=1 --ntasks=1 -c "$cpus" -w "$node" --overlap --kill-on-bad-exit=0 "${gpus[@]}" \
        bash "$root/slurm/ray_node.sh" "$role" "$head_ip" "$gcs_port" >"$run_dir/ray-${node}.log" 2>&1 &
    ray_pids+=("$!")
    log "started Ray ${role} on ${node} with ${cpus} CPUs (srun pid $!, log ${run_dir}/ray-${node}.log)"
}

start_node head "$head_node" "${node_cpus[0]}"
for i in $(seq 1 $((n_nodes - 1))); do start_node worker "${nodes[$i]}" "${node_cpus[$i]}"; done

log "waiting for ${n_nodes} Ray node(s) and ${expected_gpus} GPU(s) at ${ray_address}"
"$py" - "$ray_address" "$n_nodes" "$expected_gpus" "${TPPO_RAY_WAIT_S:-600}" "${ray_pids[@]}" <<'EOF'
import os, sys, time
import ray

addr, n_nodes, n_gpus, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
pids = [int(p) for p in sys.argv[5:]]
deadline = time.time() + timeout
connected, seen = False, ""
while time.time() < deadline:
    for pid in pids:  # a Ray step that died will never join: fail now, not at the timeout
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(f"a Ray srun step (pid {pid}) exited before the cluster was up: see ray-<node>.log")
    try:
        if not connected:
            ray.init(address=addr, logging_level="ERROR", log_to_driver=False)
            connected = True
        alive = [n for n in ray.nodes() if n["Alive"]]
        gpus = sum(n["Resources"].get("GPU", 0) for n in alive)
        seen = f"{len(alive)} node(s), {gpus:g} GPU(s)"
        if len(alive) >= n_nodes and gpus >= n_gpus:
            cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
            print(f"Ray cluster ready: {len(alive)} nodes alive, {cpus:g} CPUs, {gpus:g} GPUs:", flush=True)
            for n in alive:
                print(f"  raylet {n['NodeManagerAddress']}:{n['NodeManagerPort']} "
                      f"CPU={n['Resources'].get('CPU', 0):g} GPU={n['Resources'].get('GPU', 0):g}", flush=True)
            ray.shutdown()
            sys.exit(0)
    except Exception as err:  # GCS not up yet
        seen = f"not reachable yet ({type(err).__name__})"
        if connected:
            ray.shutdown()
            connected = False
    time.sleep(2)
sys.exit(f"Ray cluster at {addr} not ready after {timeout:g} s: {seen}; expected {n_nodes} nodes, {n_gpus:g} GPUs")
EOF

log "driver on ${head_node} (restart ${SLURM_RESTART_COUNT:-0}): python -m megatron_tppo.train --config ${config} parallel.ray_address=${ray_address}"
"$py" -m megatron_tppo.train --config "$config" "logging.output_dir=$run_dir" checkpoint.resume=true \
    "parallel.ray_address=$ray_address" "${overrides[@]}" > >(tee -a "$run_dir/driver.log") 2>&1 &
driver_pid=$!
driver_rc=0
while kill -0 "$driver_pid" 2>/dev/null; do
    wait "$driver_pid" && driver_rc=0 || driver_rc=$?   # a trapped signal interrupts wait: wait again
done
log "driver exited with ${driver_rc}"
exit "$driver_rc"
