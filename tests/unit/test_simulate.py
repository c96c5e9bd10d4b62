"""Slot-utilization simulation: PPO mode against an independent computation from the lengths."""
from megatron_tppo.planning.simulate import _target_length, simulate
from megatron_tppo.config_io import load_config
from megatron_tppo.planning.simulate import compare_utilization, format_table


def test_ppo_mode_matches_direct_computation():
    slots, n, L, seed = 12, 4, 100, 7
    res = simulate(slots, n, L, L, horizon=400, seed=seed)
    # synchronous PPO: step k takes samples k*slots .. (k+1)*slots - 1, and lasts as long as the longest
    lengths = [_target_length(seed, uid, L, L / 8, 1.0) for uid in range(res.steps * slots)]
    steps = [lengths[k * slots:(k + 1) * slots] for k in range(res.steps)]
    iters = sum(max(s) for s in steps)
    assert res.decode_iterations == iters
    assert res.tokens == sum(lengths)
    assert abs(res.utilization - sum(lengths) / (slots * iters)) < 1e-12


def test_windowing_raises_utilization_and_continuous_reaches_one():
    cfg = load_config(None, ["rollout.num_slots=32", "rollout.samples_per_prompt=4",
                             "rollout.window_tokens=32", "rollout.max_response_tokens=256"])
    ppo, tppo, cont = compare_utilization(cfg, seed=1)
    assert ppo.mode == "ppo" and tppo.mode == "tppo" and cont.mode == "tppo_continuous"
    assert ppo.utilization < tppo.utilization < cont.utilization
    assert cont.utilization == 1.0
    assert "tppo_continuous" in format_table([ppo, tppo, cont])
