"""`sbatch slurm/tppo_32b.sh` on a real local Slurm cluster of two emulated nodes (one host).

The session fixture starts munged, slurmctld and two slurmd (n1, n2) from a fresh directory with
free ports (tests/slurm/local_slurm.py) and stops exactly those pids at the end. The test submits
a 4-step tiny T-PPO run across both nodes, requeues it once its first checkpoint exists, polls
`scontrol show job -o`, and checks that the job restarted, resumed by itself and completed, that
a Ray head ran on n1 and a Ray worker on n2 and both were in the cluster the driver used, and
that TensorBoard holds every training step. About two minutes on 2 cores.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL
from tests.slurm.local_slurm import LocalSlurm, missing_binaries

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / "slurm" / "tppo_32b.sh", ROOT / "slurm" / "ray_node.sh", ROOT / "slurm" / "smoke.sh"]


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="session")
def slurm_cluster():
    if missing_binaries() and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", str(ROOT / ".ci" / "setup_slurm.sh")], capture_output=True, timeout=600)
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed and could not be ({', '.join(missing)} missing; "
                    "run .ci/setup_slurm.sh as root)")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root (munged as the munge user)")
    cluster = LocalSlurm(n_nodes=2, cpus=2, gpus=2).start()  # gres "GPUs": character devices
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.dir, ignore_errors=True)


@pytest.mark.slow
def test_sbatch_two_nodes_tiny_run_requeued_resumes(slurm_cluster, tiny_model, tmp_path):
    """One job: started across two nodes, requeued (`scontrol requeue`, as a preemption would) once
    its first checkpoint exists, restarted by Slurm with the same job id, resumed by itself from
    the newest whole checkpoint, and completed."""
    import time

    from megatron_tppo.monitoring import read_scalars

    run_dir = tmp_path / "run"
    overrides = TINY_MODEL + [
        f"model.hf_path={tiny_model}", "steps=4", "checkpoint.save_every=1", "rollout.num_slots=8",
        "rollout.samples_per_prompt=4",
        "rollout.window_tokens=12", "rollout.max_response_tokens=30", "algorithm.truncated_tail_ignore=2",
        "algorithm.critic_warmup_steps=1", "data.eval_prompts=4", "data.eval_every=3",
        "data.eval_samples_per_prompt=2", "logging.progress_bar=false", "parallel.threads_per_worker=1",
        f"logging.output_dir={run_dir}"]
    env = {"TPPO_PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    # CPU-only emulated nodes: no GPUs (the script's default asks 8 per node), a short time limit
    # (its --signal=B:USR1@900 would fire at once under a 15-minute limit), output in tmp.
    job = slurm_cluster.sbatch(["--nodes=2", "--gpus-per-node=0", "--time=30", "--job-name=tppo-test",
                                f"--output={tmp_path}/slurm-%j.out", str(ROOT / "slurm" / "tppo_32b.sh"),
                                "examples/tiny_cpu.yaml", *overrides], cwd=ROOT, env=env)
    out_file = tmp_path / f"slurm-{job}.out"
    first_ckpt = run_dir / "checkpoints" / "step_00000001" / "COMPLETE"
    deadline = time.time() + 480
    while not first_ckpt.exists():
        state = slurm_cluster.job_info(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING") and time.time() < deadline, (
            f"{state}; no first checkpoint\n" + (out_file.read_text()[-6000:] if out_file.exists() else ""))
        time.sleep(0.5)
    slurm_cluster.requeue(job)
    info = slurm_cluster.wait_job(job, timeout_s=600)
    out = out_file.read_text() if out_file.exists() else "(no Slurm output file)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info.get('JobState')}\n{out[-6000:]}"
    assert info["NodeList"] == "n[1-2]"
    assert info.get("Restarts") == "1", info
    # the second start found the first one's checkpoint(s) and went on from there
    driver_log = (run_dir / "driver.log").read_text()
    assert "(restart 1)" in out and re.search(r"resumed from \S+step_0000000[1-3] at step [1-3]", driver_log), out[-6000:]
    assert (run_dir / "checkpoints" / "step_00000004" / "COMPLETE").is_file()

    # a Ray head on n1 and a worker on n2, each from its own srun step, both in the driver's cluster
    head, worker = (run_dir / "ray-n1.log").read_text(), (run_dir / "ray-n2.log").read_text()
    m_head = re.search(r"\[ray-node n1\] head raylet (\S+):(\d+) \(slurm node n1", head)
    m_worker = re.search(r"\[ray-node n2\] worker raylet (\S+):(\d+) \(slurm node n2", worker)
    assert m_head and m_worker, head[-2000:] + worker[-2000:]
    assert "Ray runtime started" in head and "Ray runtime started" in worker
    assert "Ray cluster ready: 2 nodes alive" in out
    for m in (m_head, m_worker):
        assert f"raylet {m.group(1)}:{m.group(2)} " in out, out
    assert re.search(r"driver on n1 \(restart 0\): .*parallel\.ray_address=\S+:\d+", out)
    assert re.search(r"\[tppo\] Ray: joined \S+:\d+: 2 node\(s\)", out), out[-4000:]
    # the steps were stopped by the script, and cleaned up after themselves
    assert "[ray-node n1] head stopped" in head and "[ray-node n2] worker stopped" in worker
    assert not list(Path("/tmp").glob(f"ray-{job}-n*"))

    tb = read_scalars(run_dir / "tensorboard")
    steps = sorted({s for s, _ in tb["rollout/finished_count"]})
    assert steps == [1, 2, 3, 4], steps
    assert (run_dir / "config.yaml").is_file() and (run_dir / "driver.log").is_file()


@pytest.mark.slow
def test_sbatch_rehearsal_of_the_32b_shape(slurm_cluster, tiny_model, tmp_path):
    """examples/rehearsal/tppo_32b_shape.yaml through `sbatch slurm/tppo_32b.sh` on two nodes with
    two gres GPUs each: Ray takes them as logical GPUs, the shared plan is applied (policy TP2 x PP2
    over both nodes, a stage per node, the critic's two stages on node 0, in turns; one TP2 engine
    per node on the policy's GPUs), vLLM runs its multiprocess executor, every engine worker gets
    the weights from the policy rank on its GPU (the other stage's buckets relayed over the PP
    group, handed over through /dev/shm), and every sync leaves the train-vs-rollout mismatch
    below 1e-4. Two jobs: the first runs steps 1-2 (a periodic save
    after step 2) and gets Slurm's SIGUSR1 during step 3's generation (it saves and stops); the
    second resumes and finishes steps 3-4. Both drivers' memory traces match the memory schedule
    call for call (megatron_tppo/planning/schedule.py)."""
    import json
    import time

    from megatron_tppo.config_io import load_config
    from megatron_tppo.monitoring import read_scalars
    from megatron_tppo.planning.schedule import check_trace, run_phases

    run_dir = tmp_path / "run"
    overrides = TINY_MODEL + [f"model.hf_path={tiny_model}", f"logging.output_dir={run_dir}"]
    env = {"TPPO_PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    args = ["--nodes=2", "--gpus-per-node=2", "--time=30", "--job-name=tppo-rehearsal",
            f"--output={tmp_path}/slurm-%j.out", str(ROOT / "slurm" / "tppo_32b.sh"),
            "examples/rehearsal/tppo_32b_shape.yaml", *overrides]
    t0 = time.time()
    first = slurm_cluster.sbatch(args, cwd=ROOT, env={**env, "TPPO_TEST_HOLD_AT": "generation:3"})
    node_cpus = slurm_cluster.allocated_cpus(first)  # only a running job shows them
    held = run_dir / "held_generation_3"
    deadline = time.time() + 600
    while not held.exists():
        state = slurm_cluster.job_info(first).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING") and time.time() < deadline, (
            state, (run_dir / "driver.log").read_text()[-5000:] if (run_dir / "driver.log").exists() else "")
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", first], env=slurm_cluster.env(), check=True, timeout=30)
    info = slurm_cluster.wait_job(first, timeout_s=300)
    driver_log = (run_dir / "driver.log").read_text() if (run_dir / "driver.log").exists() else ""
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{driver_log[-5000:]}"
    assert "SIGUSR1 received during step 3's generation: checkpointed step 2" in driver_log, driver_log[-3000:]
    job = slurm_cluster.sbatch(args, cwd=ROOT, env=env)  # resumes from step 2 by itself
    info = slurm_cluster.wait_job(job, timeout_s=900)
    out_file = tmp_path / f"slurm-{job}.out"
    out = out_file.read_text() if out_file.exists() else "(no Slurm output file)"
    driver_log = (run_dir / "driver.log").read_text() if (run_dir / "driver.log").exists() else ""
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info.get('JobState')}\n{out[-5000:]}\n{driver_log[-5000:]}"
    assert re.search(r"resumed from \S+step_00000002 at step 2", driver_log), driver_log[-3000:]
    print(f"rehearsal jobs took {time.time() - t0:.0f} s")
    cfg = load_config(str(ROOT / "examples/rehearsal/tppo_32b_shape.yaml"), overrides)
    records = [json.loads(line) for line in (run_dir / "memory_trace.jsonl").read_text().splitlines()]
    warm = cfg.algorithm.critic_warmup_steps
    assert cfg.parallel.trainers == "shared"
    assert check_trace(cfg, records) == [run_phases(range(2), warm, {2}, signal="generation", shared=True),
                                         run_phases(range(2, 4), warm, {4}, resumed=True, shared=True)]
    # each Ray node declared the 2 GPUs Slurm gave it
    for n in ("n1", "n2"):
        log = (run_dir / f"ray-{n}.log").read_text()
        assert "CUDA_VISIBLE_DEVICES=0,1, object store" in log and "MiB free in /dev/shm" in log, log[-2000:]
    assert "CPU=2 GPU=2" in out, out[-3000:]  # both Ray nodes declared their 2 GPUs
    assert "placement: 4 of 4 GPUs requested (colocated)" in driver_log, driver_log[-4000:]
    # where every actor ran (parallel.trainers=shared): policy stage 0 and engine 0 on node 0, stage 1
    # and engine 1 on node 1, the critic's two stages on node 0's GPUs beside them
    actors = json.loads((run_dir / "actors.json").read_text())
    by = {(a["group"], a["rank"]): a for a in actors}
    assert [by[("rollout engine", e)]["gpus"] for e in (0, 1)] == [[[0, 0], [0, 1]], [[1, 0], [1, 1]]]
    assert [by[("policy", r)]["gpus"] for r in range(4)] == [[[0, 0]], [[0, 1]], [[1, 0]], [[1, 1]]]
    assert [by[("critic", r)]["gpus"] for r in (0, 1)] == [[[0, 0]], [[0, 1]]]
    for e in (0, 1):  # each engine's workers see the devices of the policy ranks on their GPUs
        assert by[("policy", 2 * e)]["node"] == by[("rollout engine", e)]["node"]
        engine_devices = by[("rollout engine", e)]["cuda_visible_devices"].split(",")
        assert engine_devices == [by[("policy", 2 * e + r)]["cuda_visible_devices"] for r in (0, 1)], actors
    # every weight sync took the local route: each engine worker from the policy rank on its GPU
    assert "[tppo] weight sync: ipc from the policy rank on each engine worker's own GPU" in driver_log, \
        driver_log[-4000:]
    # every trainer rank may run on all the cores its node was allocated: the cluster binds tasks
    # to cores (TaskPluginParam=Cores), so a Ray step without `srun -c` and every actor under it
    # would get one core. The emulated nodes share one host: both hold the same CPU ids.
    assert sorted(node_cpus) == ["n1", "n2"], node_cpus
    assert all(len(c) == slurm_cluster.cpus for c in node_cpus.values()), node_cpus
    (cores,) = {tuple(c) for c in node_cpus.values()}
    affinity = {(a["group"], a["rank"]): a["cpu_affinity"] for a in actors if a["group"] in ("policy", "critic")}
    assert len(affinity) == 6 and all(tuple(c) == cores for c in affinity.values()), (cores, affinity)
    for n in ("n1", "n2"):
        assert f"{len(cores)} CPUs (affinity {','.join(map(str, cores))})" in (run_dir / f"ray-{n}.log").read_text()
    tb = read_scalars(run_dir / "tensorboard")
    steps = sorted({s for s, _ in tb["rollout/finished_count"]})
    assert steps == [1, 2, 3, 4], steps
    mism = dict(tb["rollout/logprob_mismatch_max"])
    assert sorted(mism) == [2, 3, 4] and max(mism.values()) < 1e-4, mism
    assert all(v > 0 for _, v in tb["perf/weight_sync_buckets"])


@pytest.mark.slow
def test_sbatch_smoke_on_a_two_gpu_node(slurm_cluster, tiny_model, tmp_path):
    """`sbatch slurm/smoke.sh` on one node with two gres GPUs: the tiny model through the loop,
    a checkpoint and a resume; the report passes every check and lands in Slurm's output."""
    out = tmp_path / "smoke"
    small = ["rollout.num_slots=8", "rollout.samples_per_prompt=4", "rollout.window_tokens=12",
             "rollout.max_response_tokens=30", "algorithm.truncated_tail_ignore=2", "parallel.threads_per_worker=1"]
    env = {"TPPO_PYTHON": sys.executable, "TPPO_SMOKE_OUT": str(out),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    job = slurm_cluster.sbatch(["--nodes=1", "--gpus-per-node=2", "--cpus-per-task=2", "--time=20",
                                f"--output={tmp_path}/slurm-%j.out",
                                str(ROOT / "slurm" / "smoke.sh"), str(tiny_model), *TINY_MODEL, *small],
                               cwd=ROOT, env=env)
    info = slurm_cluster.wait_job(job, timeout_s=400)
    slurm_out = (tmp_path / f"slurm-{job}.out").read_text() if (tmp_path / f"slurm-{job}.out").exists() else ""
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info.get('JobState')}\n{slurm_out[-5000:]}"
    assert "T-PPO smoke test: PASS (7/7)" in slurm_out, slurm_out[-3000:]
    assert "placement: 2 of 2 GPUs requested" in (out / "smoke_part1.log").read_text()
