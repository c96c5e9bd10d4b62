#!/usr/bin/env bash
# One Ray node of a Slurm job, run by slurm/tppo_32b.sh through
#   srun --nodes=1 --ntasks=1 -c <node CPUs> -w <node> slurm/ray_node.sh head|worker <head_ip> <gcs_port>
# It picks its own free ports on the node it runs on, starts Ray in the foreground (`ray start
# --block`: every Ray daemon stays a child of this step, so stopping the srun step stops exactly
# this node's Ray and nothing else of the user's), and removes its temp dir when Ray exits.
# tppo_32b.sh stops it with SIGUSR2 to the srun (forwarded here; srun itself turns SIGTERM into
# an immediate kill of the step, which would leave the temp dir behind).
#
# Why every port is explicit: several Ray nodes of one host (two jobs sharing a node, or the
# emulated nodes of tests/slurm, where all "nodes" are 127.0.0.1) must not collide. Ray 2.60
# accepts several raylets on one IP when each has its own node-manager, object-manager,
# dashboard-agent, runtime-env-agent and metrics ports and its own --temp-dir; worker processes
# bind random free ports (no --min-worker-port). Fixed defaults that would collide: 6379 (GCS),
# 10001 (client server), 8265 (dashboard), 52365 (dashboard agent).
#
# Environment: TPPO_RAY (ray CLI, default `ray` on PATH), TPPO_PYTHON (default python3),
# TPPO_NODE_IP (this node's address; default: head = hostname --ip-address, worker = the local
# address that routes to the head), RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH (set by tppo_32b.sh),
# TPPO_RAY_TMP_ROOT (default /tmp: Ray's unix socket paths must stay under 107 characters),
# TPPO_RAY_NUM_CPUS (CPUs declared to Ray; default those of this step).
set -euo pipefail

role=${1:?usage: ray_node.sh head|worker HEAD_IP GCS_PORT}
head_ip=${2:?head ip}
gcs_port=${3:?gcs port}
ray_bin=${TPPO_RAY:-ray}
py=${TPPO_PYTHON:-python3}
node=${SLURMD_NODENAME:-$(hostname -s)}
tag="[ray-node ${node}]"

# N distinct free TCP ports on this node, from a window of its own above the kernel's ephemeral
# range (and above Ray's worker ports, 10002-19999, and the GCS port search from 20000): a port
# that bind(0) handed out and released again can be handed to another process (another Ray node
# of the same host picking its ports at the same moment) before this node's raylet binds it. The
# window depends on the job and on this node's place in the job's node list, so nodes sharing a
# host (emulated nodes, two jobs) do not overlap; each port is still checked free.
free_ports() {
    "$py" - "$1" "${SLURM_JOB_ID:-0}" "$node" "${SLURM_JOB_NODELIST:-}" <<'EOF'
import socket, subprocess, sys, zlib
n, job, node, nodelist = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    nodes = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           timeout=30).stdout.split() if nodelist else []
except (OSError, subprocess.SubprocessError):
    nodes = []
index = nodes.index(node) if node in nodes else zlib.crc32(node.encode()) % 16
with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    base = int(f.read().split()[1]) + 1
window = 32
windows = max((65535 - base) // window, 1)
start = base + ((job * 16 + index) % windows) * window
picked = []
for port in range(start, min(start + window, 65536)):
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
    picked.append(port)
    if len(picked) == n:
        break
if len(picked) < n:  # a crowded window: ports the kernel picks
    socks = [socket.socket() for _ in range(n - len(picked))]
    for s in socks:
        s.bind(("", 0))
    picked += [s.getsockname()[1] for s in socks]
print(" ".join(map(str, picked)))
EOF
}

route_ip() {  # the local address used to reach the head (no packet is sent: UDP connect)
    "$py" -c 'import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((sys.argv[1], 1)); print(s.getsockname()[0])' "$1"
}

read -r nm_port om_port agent_http agent_grpc env_agent metrics client_port <<<"$(free_ports 7)"
tmp_dir="${TPPO_RAY_TMP_ROOT:-/tmp}/ray-${SLURM_JOB_ID:-0}-${node}"
mkdir -p "$tmp_dir"

args=(--block --disable-usage-stats --temp-dir="$tmp_dir"
      --node-manager-port="$nm_port" --object-manager-port="$om_port"
      --dashboard-agent-listen-port="$agent_http" --dashboard-agent-grpc-port="$agent_grpc"
      --runtime-env-agent-port="$env_agent" --metrics-export-port="$metrics")
# TPPO_IFACE (e.g. ib0): this node's address on that interface, so that Ray, and with it the
# weight-transfer groups (they rendezvous on Ray's node address), use the fast fabric and not a
# management network; NCCL and gloo open their sockets on it too.
if [[ -n "${TPPO_IFACE:-}" && -z "${TPPO_NODE_IP:-}" ]]; then
    TPPO_NODE_IP=$("$py" -m megatron_tppo.netinfo ip --iface "$TPPO_IFACE") || exit 2
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$TPPO_IFACE}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$TPPO_IFACE}"
fi
# Ray's object store lives in /dev/shm (a smaller one spills to disk and crawls): size it
# explicitly (TPPO_OBJECT_STORE_GB, default 30% of the node's memory as Ray would pick) and refuse
# a size /dev/shm cannot hold, before Ray starts.
shm_free=$("$py" -m megatron_tppo.netinfo shm)
store=$("$py" -c 'import os, sys; gb = sys.argv[1]; mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
print(int(float(gb) * 2**30) if gb else int(0.3 * mem))' "${TPPO_OBJECT_STORE_GB:-}")
if (( store > shm_free * 9 / 10 )); then
    echo "${tag} object store of $((store >> 20)) MiB does not fit /dev/shm ($((shm_free >> 20)) MiB free):" \
         "set TPPO_OBJECT_STORE_GB lower or enlarge /dev/shm" >&2
    exit 2
fi
args+=(--object-store-memory="$store")
if [[ "$role" == head ]]; then
    ip=${TPPO_NODE_IP:-$head_ip}
    args+=(--head --node-ip-address="$ip" --port="$gcs_port" --ray-client-server-port="$client_port"
           --include-dashboard=false)
else
    ip=${TPPO_NODE_IP:-$(route_ip "$head_ip")}
    args+=(--address="${head_ip}:${gcs_port}" --node-ip-address="$ip")
fi
# CPUs: those Slurm gave this step (srun -c: SLURM_CPUS_PER_TASK; else the cores this process may
# run on), declared to Ray explicitly: Ray would count every core of the host, bound or not.
# TPPO_RAY_NUM_CPUS overrides.
affinity=$("$py" -c 'import os; c = sorted(os.sched_getaffinity(0)); print(len(c), ",".join(map(str, c)))')
num_cpus=${TPPO_RAY_NUM_CPUS:-${SLURM_CPUS_PER_TASK:-${affinity%% *}}}
args+=(--num-cpus="$num_cpus")
# GPUs: exactly those Slurm gave this step (CUDA_VISIBLE_DEVICES, set by the gres/gpu plugin),
# declared to Ray explicitly; Ray maps its GPU ids onto that list. On nodes without a GPU driver
# (tests/slurm's character-device "GPUs") these are logical GPUs: the GPU placement still runs.
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]]; then
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    args+=(--num-gpus="${#visible[@]}")
fi
echo "${tag} ${role} raylet ${ip}:${nm_port} (slurm node ${node}, job ${SLURM_JOB_ID:-?}, GCS ${head_ip}:${gcs_port}," \
     "${num_cpus} CPUs (affinity ${affinity#* }), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}," \
     "object store $((store >> 20)) MiB of $((shm_free >> 20)) MiB free in /dev/shm, temp ${tmp_dir})"

# ray in the background so that this script can clean up after it; SIGTERM from srun is passed on
"$ray_bin" start "${args[@]}" &
ray_pid=$!
trap 'kill -TERM "$ray_pid" 2>/dev/null || true' TERM INT HUP USR2
rc=0
while kill -0 "$ray_pid" 2>/dev/null; do
    wait "$ray_pid" || rc=$?
done
echo "${tag} ${role} stopped (exit ${rc})"
rm -rf "$tmp_dir"
exit 0
