"""Planner: counts and bytes checked against numbers worked out by hand, refusals, the 32B recipe."""
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tppo import plan as CLI
from megatron_tppo.planning import hardware as H
from megatron_tppo.planning import memory as M
from megatron_tppo.planning import plan as P
from megatron_tppo.config_io import load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "examples/qwen2.5_32b/tppo.yaml")
GiB = 2 ** 30

# A ~0.85B Llama-style model: h 2048, 16 layers, SwiGLU 5632, 16 heads of 128, 4 KV groups, vocab
# 32000 (= 250 x 128: no padding), no QKV bias, untied.
ONE_B = ["model.arch=llama", "model.hidden_size=2048", "model.num_layers=16", "model.ffn_hidden_size=5632",
         "model.num_attention_heads=16", "model.num_query_groups=4", "model.vocab_size=32000",
         "model.qkv_bias=false", "model.tie_word_embeddings=false", "model.params_dtype=bf16"]
# by hand: q and o 2048*2048 each, k and v 2048*512 each, MLP 3*2048*5632, two norms 2*2048
LAYER = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 5632 + 2 * 2048
assert LAYER == 45_092_864
EMB = 32000 * 2048
N = 16 * LAYER + EMB + 2048 + EMB  # layers + embedding + final norm + output layer


def cfg(*over):
    return load_config(None, ONE_B + list(over))


def test_param_counts_by_hand():
    m = cfg().model
    assert M.layer_params(m) == LAYER
    assert M.model_params(m) == N == 852_559_872
    assert M.model_params(m, value_head=True) == N - EMB + 2048
    # Qwen2-style bias on q, k, v: h + 2 * kv more per layer
    assert M.layer_params(cfg("model.qkv_bias=true").model) == LAYER + 2048 + 2 * 512


def test_trainer_memory_tp2_dp2_by_hand():
    c = cfg("parallel.policy.tensor_parallel=2", "parallel.policy.data_parallel=2",
            "parallel.policy.micro_batch_tokens=4096")
    mem = M.trainer_memory(c.model, c.parallel.policy)
    params = 16 * LAYER // 2 + EMB // 2 + EMB // 2 + 2048  # PP=1: everything on one stage, split by TP
    assert mem.params == params
    assert mem.weights == params * 2              # bf16
    assert mem.grads == params * 4                # fp32 main grads
    assert mem.optimizer == params * 12 / 2       # fp32 master + 2 moments, sharded over DP=2
    # activations: 2 bytes x (4h replicated + (2h + 2kv + 3F)/TP) per token and layer
    per_tok_layer = 2 * (4 * 2048 + (2 * 2048 + 2 * 512 + 3 * 5632) / 2)
    assert per_tok_layer == 38_400
    assert mem.activations == 16 * 4096 * per_tok_layer
    assert mem.logits == 2 * 4 * 4096 * 32000 / 2  # fp32 logits + their gradient, vocab split by TP
    # full recompute: layer inputs (2h bytes per token) for every layer + one layer's full set
    rc = M.trainer_memory(c.model, load_config(None, ONE_B + ["parallel.policy.tensor_parallel=2",
                                                              "parallel.policy.micro_batch_tokens=4096",
                                                              "parallel.policy.recompute=full"]).parallel.policy)
    assert rc.activations == 16 * 2 * 2048 * 4096 + 4096 * per_tok_layer


def test_pipeline_stage_and_fp32():
    c = cfg("parallel.policy.pipeline_parallel=4", "model.params_dtype=fp32")
    mem = M.trainer_memory(c.model, c.parallel.policy)
    assert mem.params == 4 * LAYER + EMB + 2048  # worst stage: the last (4 layers + output layer + final norm)
    assert mem.weights == mem.params * 4 and mem.optimizer == mem.params * 8  # fp32: no separate master copy
    # 1F1B: stage 0 keeps PP micro-batches of layers/PP layers = all layers' worth
    assert mem.activations == 16 * c.parallel.policy.micro_batch_tokens * 2 * (4 * 2048 + (2 * 2048 + 2 * 512 + 3 * 5632))


def test_kv_cache_bytes():
    m = cfg().model
    assert M.kv_bytes_per_token(m) == 2 * 16 * 4 * 128 * 2          # K and V, 16 layers, 4 heads, bf16
    assert M.kv_bytes_per_token(m, tp=2) == 2 * 16 * 2 * 128 * 2
    assert M.kv_bytes_per_token(m, tp=8) == 2 * 16 * 1 * 128 * 2    # 4 KV heads replicate over TP 8


def test_small_layout_fits_and_splits_time():
    c = cfg("parallel.device=cuda", "parallel.policy.tensor_parallel=2", "parallel.critic.tensor_parallel=2",
            "rollout.num_engines=2", "rollout.tensor_parallel=2", "rollout.colocate=false",
            "rollout.gpu_memory_utilization=0.8")
    pl = P.make_plan(c, nodes=1, gpus_per_node=8)
    n = pl.numbers
    assert n["gpus_used"] == 2 + 2 + 4
    assert n["vllm_weights_gib"] == pytest.approx(N * 2 / 2 / GiB)
    kv = 0.8 * 79.6 * GiB - N * 2 / 2 - 2 * GiB
    assert n["kv_cache_gib"] == pytest.approx(kv / GiB)
    assert n["kv_tokens_per_engine"] == pytest.approx(kv / (2 * 16 * 2 * 128 * 2))
    assert n["gen_s"] > 0 and n["train_s"] > 0 and n["step_s"] == pytest.approx(n["gen_s"] + n["train_s"] + n["sync_s"])
    assert n["swap_s"] == 0.0  # engines on their own GPUs: nothing offloads
    # sync: one bf16 copy of the policy, S = 2N bytes; engines on GPUs of their own -> NCCL broadcast from
    # the sender, all on one node: the sender gathers the other half of its TP2 stage over NVLink
    # (350 GB/s), broadcasts S over NVLink, each TP2 worker copies its half into its weights (1300 GB/s)
    s = 2 * N
    assert n["sync_gb"] == pytest.approx(s / 1e9)
    assert (pl.sync.route.path, pl.sync.route.transport) == ("broadcast", "nccl")
    assert pl.sync.terms == pytest.approx({"tp_allgather": s / 2 / 350e9, "nccl_broadcast": s / 350e9,
                                           "engine_copy": s / 2 / 1300e9})
    assert n["sync_s"] == pytest.approx(s / 2 / 350e9 + s / 350e9 + s / 2 / 1300e9)
    text = "\n".join(pl.lines)
    assert "policy : TP2 x PP1 x DP1" in text and "vLLM   : 2 engine(s) x TP2" in text and "on their own GPUs" in text


@pytest.mark.parametrize("over,nodes,gpn,reason", [
    (["parallel.policy.tensor_parallel=3"], 1, 8, "does not divide the 16 heads"),
    (["parallel.critic.pipeline_parallel=3"], 1, 8, "does not divide model.num_layers=16"),
    (["parallel.policy.tensor_parallel=4"], 1, 2, "spans nodes"),
    (["parallel.policy.data_parallel=8", "rollout.colocate=false"], 1, 8, "needs 10 GPUs"),
    (["parallel.critic.tensor_parallel=2"], 2, 2, "TP groups would straddle nodes"),
    (["rollout.num_engines=4", "rollout.colocate=true"], 1, 8, "4 engines x rollout.tensor_parallel=1 = 4 GPUs, but the trainers hold only 2"),
])
def test_refuses_layouts_that_do_not_divide(over, nodes, gpn, reason):
    c = load_config(None, ONE_B + over, validate=False)
    with pytest.raises(P.PlanError, match=reason):
        P.make_plan(c, nodes, gpn)


def test_refuses_what_does_not_fit():
    c = load_config(RECIPE, ["parallel.policy.recompute=none"])  # shared trainers: the policy's turn
    with pytest.raises(P.PlanError, match=r"phase updates@policy: GPU \d of node 0 needs .* GiB .*largest: policy rank \d+ activations .*recompute=full"):
        P.make_plan(c, 4, 8)
    c = load_config(RECIPE, ["rollout.gpu_memory_utilization=0.2"])
    with pytest.raises(P.PlanError, match="less than one sequence"):
        P.make_plan(c, 4, 8)


@pytest.mark.parametrize("nodes", [4, 8, 16])
def test_32b_recipe_fits_on_4_8_16_nodes(nodes, capsys):
    import argparse

    args = argparse.Namespace(nodes=nodes, gpus_per_node=8, fill=True, prompt_tokens=1024, gpu_mem_gb=80, host_mem_gb=2048, object_store_gb=None, json=False)
    assert CLI.run_plan(load_config(RECIPE), args) == 0
    out = capsys.readouterr().out
    # shared trainers TP8 x PP1 on every GPU: DP = GPUs / 8
    assert f"parallel.policy.data_parallel={nodes}" in out and f"rollout.num_engines={nodes * 2}" in out
    assert f"GPUs used {nodes * 8} of {nodes * 8}" in out
    # the model is Qwen2.5-32B: 32.76B parameters with the (untied) embeddings
    assert "model 32.76B params" in out


def test_cli_refusal_exit_code_and_purity():
    code = ("import sys; from megatron_tppo import plan; rc = plan.main(['--config', sys.argv[1], '--nodes', '3', "
            "'--fill']); heavy = [m for m in ('ray', 'vllm', 'megatron', 'torch') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, RECIPE], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 3
    assert "plan refused" in r.stderr and "24 GPUs is not a multiple" in r.stderr
    assert "HEAVY []" in r.stdout


def test_train_dry_run_prints_the_plan(capsys):
    from megatron_tppo.train import main

    assert main(["--config", RECIPE, "--dry-run", "--nodes", "4"]) == 0
    out = capsys.readouterr().out
    assert "num_slots: 8192" in out and "policy : TP8 x PP1 x DP4 = 32 GPUs" in out
    assert main(["--config", RECIPE, "--dry-run", "--nodes", "1"]) == 3


def test_checkpoint_size_and_keep_last_disk_by_hand():
    m = cfg().model  # bf16: 2 (weights) + 4 (fp32 master) + 4 + 4 (Adam moments) = 14 B/param
    ck = M.checkpoint_bytes(m, keep_last=2)
    critic = N - EMB + 2048  # the output layer replaced by a value head of h
    assert ck["bytes_per_param"] == 14
    assert ck["policy"] == 14 * N and ck["critic"] == 14 * critic
    assert ck["checkpoint"] == 14 * (N + critic)
    assert ck["kept"] == 2 * ck["checkpoint"] and ck["peak"] == 3 * ck["checkpoint"]
    fp32 = M.checkpoint_bytes(cfg("model.params_dtype=fp32").model, keep_last=1)
    assert fp32["bytes_per_param"] == 12 and fp32["peak"] == 2 * fp32["checkpoint"]


def test_checkpoint_size_of_the_32b_recipe_is_about_0_9_tb():
    c = load_config(RECIPE, [])
    ck = M.checkpoint_bytes(c.model, c.checkpoint.keep_last)
    assert 0.85e12 < ck["checkpoint"] < 0.95e12  # 32.8B policy + ~31.5B critic at 14 B/param
    plan = P.make_plan(c, nodes=4, gpus_per_node=8)
    assert any(line.startswith("checkpoint: policy ") and "keep_last=2" in line for line in plan.lines)
    assert plan.numbers["checkpoint_disk_peak_tb"] == pytest.approx(3 * ck["checkpoint"] / 1e12)


def _gpu_layout(*over):
    return cfg("parallel.device=cuda", "parallel.policy.tensor_parallel=2", "parallel.critic.tensor_parallel=2",
               "rollout.num_engines=2", "rollout.tensor_parallel=2", "rollout.colocate=false",
               "rollout.gpu_memory_utilization=0.8", *over)


def test_reprefill_after_the_sync_is_in_the_generation_estimate_by_hand():
    n = P.make_plan(_gpu_layout(), nodes=1, gpus_per_node=8).numbers
    # 64 slots / 2 engines = 32; W 64, L_max 256 -> 4 windows; context before a window on average
    # 1024 + 64 * 3 / 2 = 1120 tokens; per token 2N + causal attention forward 2 x 16 x 2048 x 1120
    tokens = 32 * 1120
    flops = tokens * (2 * N + 2 * 16 * 2048 * 1120)
    assert n["reprefill_tokens_per_engine"] == tokens
    assert n["reprefill_s"] == pytest.approx(flops / (2 * H.GPU().peak_tflops_bf16 * 1e12 * 0.5))
    assert n["gen_s"] == pytest.approx(n["gen_decode_s"] + n["reprefill_s"])


def test_warns_when_the_kv_cache_cannot_hold_an_engines_slots_at_mean_context():
    # KV per engine (TP2): (0.8 x 79.6 GiB - N - 2 GiB) / (2 x 16 x 2 x 128 x 2 B); mean context
    # 1024 + 64 x 5 / 2 = 1184 tokens: about 3370 slots fit per engine
    kv_tokens = (0.8 * 79.6 * GiB - N - 2 * GiB) / (2 * 16 * 2 * 128 * 2)
    assert 2048 * 1184 < kv_tokens < 4096 * 1184
    quiet = P.make_plan(_gpu_layout("rollout.num_slots=4096"), nodes=1, gpus_per_node=8)
    assert quiet.warnings == []
    loud = P.make_plan(_gpu_layout("rollout.num_slots=8192"), nodes=1, gpus_per_node=8)
    assert len(loud.warnings) == 1 and "4096 slots at mean context 1184" in loud.warnings[0]
    assert f"{kv_tokens:.0f} tokens per engine" in loud.warnings[0]
    assert any(line.startswith("WARNING: vLLM KV cache") for line in loud.lines)


def _shared_small(*over):
    # one node of 4 GPUs: policy and critic TP2 x DP2 both on GPUs 0-3, two TP2 engines over them
    return cfg("parallel.device=cuda", "parallel.trainers=shared", "parallel.policy.tensor_parallel=2",
               "parallel.critic.tensor_parallel=2", "parallel.policy.data_parallel=2", "parallel.critic.data_parallel=2",
               "parallel.policy.micro_batch_tokens=4096", "parallel.critic.micro_batch_tokens=4096",
               "rollout.tensor_parallel=2", "rollout.num_engines=2", "rollout.colocate=true", *over)


def test_shared_json_names_every_workers_transport_and_both_layouts():
    js = P.make_plan(_shared_small(), nodes=1, gpus_per_node=4).to_json()
    sync = js["sync"]
    assert sync["route"]["path"] == "local" and sync["route"]["transport"] == "ipc"
    # engine e's worker j on GPU 2e + j, which holds policy rank 2e + j; every one by ipc
    assert sync["workers"] == [dict(engine=e, worker=j, node=0, gpu=2 * e + j, policy_rank=2 * e + j, transport="ipc",
                                    path="local") for e in range(2) for j in range(2)]
    # the terms by hand: S = 2N = 1.705 GB in ceil(S / 512 MiB) = 4 buckets of the default 512 MiB
    s = 2 * N
    assert sync["buckets"] == 4
    assert sync["terms"] == pytest.approx({"tp_allgather": s / 2 / 350e9, "pack": s / 1300e9, "ipc_handoff": 4 * 2e-3,
                                           "engine_copy": s / 2 / 1300e9})
    assert sync["seconds"] == pytest.approx(sum(sync["terms"].values()))
    assert sync["dominant"] == max(sync["terms"], key=sync["terms"].get)
    lay = js["layouts"]
    assert lay["config"] == "shared" and lay["other"] == "split"
    # shared -> split: each model on half of the 4 GPUs, TP kept, the config's PP1: DP = 2 / 2 = 1
    assert (lay["split"]["policy"], lay["split"]["critic"]) == ("TP2 PP1 DP1", "TP2 PP1 DP1")
    assert "parallel.trainers=split" in lay["split"]["overrides"]
    for name in ("shared", "split"):
        x = lay[name]
        assert x["fits"] and x["step_s"] == pytest.approx(x["gen_s"] + x["train_s"] + x["sync_s"] + x["swap_s"])
    # shared trains one after the other, each on all 4 GPUs; split at once, each on 2
    sh, sp = lay["shared"], lay["split"]
    assert sh["train_s"] == pytest.approx(sh["policy_train_s"] + sh["critic_train_s"])
    assert sp["train_s"] == pytest.approx(max(sp["policy_train_s"], sp["critic_train_s"]))
    assert sp["policy_train_s"] == pytest.approx(2 * sh["policy_train_s"])
    assert lay["faster"] == min(("shared", "split"), key=lambda k: lay[k]["step_s"])
    assert lay["split"]["route"]["transport"] == "ipc" and lay["split"]["route"]["path"] == "broadcast"


def test_text_names_the_sync_dominant_term_and_the_faster_layout():
    text = "\n".join(P.make_plan(_shared_small(), nodes=1, gpus_per_node=4).lines)
    assert "route local/ipc" in text and "; dominant: ipc_handoff (" in text  # 4 buckets x 2 ms: 8 ms, the largest
    assert "trainer layouts side by side" in text and "is faster by" in text
    assert "(one after the other)" in text and "(at once)" in text


def test_split_derives_shared_pp1_first():
    c = cfg("parallel.device=cuda", "parallel.policy.tensor_parallel=2", "parallel.critic.tensor_parallel=2",
            "parallel.policy.pipeline_parallel=2", "parallel.critic.pipeline_parallel=2",
            "rollout.tensor_parallel=2", "rollout.num_engines=4", "rollout.colocate=true")
    other, tried = P.other_candidates(c)
    # G = 4 + 4 GPUs; PP1: DP = 8 / 2 = 4; then the config's PP2: DP = 8 / 4 = 2
    assert other == "shared"
    assert [t[0][1:] for t in tried] == [
        ["parallel.policy.pipeline_parallel=1", "parallel.critic.pipeline_parallel=1",
         "parallel.policy.data_parallel=4", "parallel.critic.data_parallel=4"],
        ["parallel.policy.pipeline_parallel=2", "parallel.critic.pipeline_parallel=2",
         "parallel.policy.data_parallel=2", "parallel.critic.data_parallel=2"]]
    # not colocated: no shared layout to compare
    lay = P.make_plan(_gpu_layout(), nodes=1, gpus_per_node=8).layouts
    assert lay["faster"] is None and "rollout.colocate" in lay["shared"]["error"]


def test_32b_recipe_is_shared_and_beats_split_by_the_plan():
    """The recipe as written on 4 nodes: shared TP8 x PP1 x DP4 trainers, every engine worker fed
    by IPC from the policy rank on its own GPU; its split counterpart is slower (the gloo sync, the
    critic's idle half) and both fit."""
    r = subprocess.run([sys.executable, "-m", "megatron_tppo.plan", "--config", RECIPE, "--nodes", "4", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    js = json.loads(r.stdout)
    sync = js["sync"]
    assert sync["route"]["path"] == "local" and sync["route"]["transport"] == "ipc"
    assert len(sync["workers"]) == 32 and {w["transport"] for w in sync["workers"]} == {"ipc"}
    # engine e's worker j on GPU 4(e%2)+j of node e//2 holds (and receives from) policy rank 8(e//2)+4(e%2)+j
    assert [(w["engine"], w["worker"], w["node"], w["gpu"], w["policy_rank"]) for w in sync["workers"]] == [
        (e, j, e // 2, 4 * (e % 2) + j, 8 * (e // 2) + 4 * (e % 2) + j) for e in range(8) for j in range(4)]
    assert sync["seconds"] <= 1.0 and sync["dominant"] == "tp_allgather"
    lay = js["layouts"]
    assert lay["config"] == "shared" and lay["faster"] == "shared"
    assert lay["shared"]["fits"] and lay["split"]["fits"]
    assert (lay["split"]["policy"], lay["split"]["critic"]) == ("TP8 PP2 DP1", "TP8 PP2 DP1")  # PP1 DP2 does not fit
    assert lay["split"]["route"]["transport"] == "gloo" and lay["split"]["sync_s"] > 100 * lay["shared"]["sync_s"]
    for name in ("shared", "split"):
        x = lay[name]
        assert x["step_s"] == pytest.approx(x["gen_s"] + x["train_s"] + x["sync_s"] + x["swap_s"])
    assert lay["shared"]["step_s"] < lay["split"]["step_s"]
