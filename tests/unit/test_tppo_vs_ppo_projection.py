"""benchmarks/tppo_vs_ppo: the 32B projected clock = responses to target x the seconds per finished
response that ``plan --compare-modes`` projects (checked against compare_modes called directly and
against plan's own printed table), the seeds' summary, the console lines and both PNGs."""
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from tppo_vs_ppo import (charts, projection_block, ratios, recipe_projection, seeds_summary, summarize,  # noqa: E402
                         table)

from megatron_tppo import plan  # noqa: E402
from megatron_tppo.config_io import load_config  # noqa: E402
from megatron_tppo.planning.projection import StepCosts, compare_modes, lognormal_lengths, project  # noqa: E402

RECIPE = str(ROOT / "examples/qwen2.5_32b/tppo.yaml")
MODES = ("ppo", "tppo", "tppo_continuous")


@pytest.fixture(scope="module")
def proj():
    return recipe_projection(RECIPE, (4, 16))


def test_ratios_null_where_undefined():
    assert ratios({"ppo": 6.0, "tppo": 3.0, "tppo_continuous": 0.0}) == {
        "ppo/tppo": 2.0, "ppo/tppo_continuous": None, "tppo/tppo_continuous": None}
    assert ratios({"ppo": None, "tppo": 3.0}) == {"ppo/tppo": None, "ppo/tppo_continuous": None,
                                                  "tppo/tppo_continuous": None}


@pytest.mark.parametrize("resident", [False, True])
def test_projected_seconds_are_responses_times_compare_modes(proj, resident):
    # plan --compare-modes: report(load_config(recipe)) -> compare_modes(cfg, nodes) (and resident=True)
    rows = dict(compare_modes(load_config(RECIPE), (4, 16), resident=resident))
    responses = {"ppo": 1200.0, "tppo": 700.0, "tppo_continuous": None}  # continuous never reached the target
    block = projection_block(proj, responses)
    assert block["responses_to_target"] == responses and set(block["nodes"]) == {"4", "16"}
    for nodes, projs in rows.items():
        b = block["nodes"][str(nodes)]
        b = b["if_resident"] if resident else b
        per = {p.mode: p.s_per_1000 / 1000 for p in projs}
        assert b["s_per_finished_response"] == pytest.approx(per)
        want = {"ppo": 1200.0 * per["ppo"], "tppo": 700.0 * per["tppo"], "tppo_continuous": None}
        assert b["projected_s_to_target"] == pytest.approx(want)
        assert b["ratios"] == {"ppo/tppo": pytest.approx(want["ppo"] / want["tppo"]),
                               "ppo/tppo_continuous": None, "tppo/tppo_continuous": None}
    assert "projected_s_to_target" not in proj["nodes"]["4"]  # the block is a copy


def test_inputs_reproduce_the_figure(proj):
    # the recorded inputs are the ones compare_modes used: project() on them gives the same figure
    d = proj["length_distribution"]
    dist = lognormal_lengths(d["median"], d["sigma"], d["cap"])
    for b in proj["nodes"].values():
        for v in (b, b["if_resident"]):
            for m in MODES:
                c = StepCosts(**{k: tuple(x) if isinstance(x, list) else x
                                 for k, x in v["inputs"][m]["step_costs"].items()})
                p = project(m, dist, proj["num_slots"], proj["window_tokens"][m], c)
                assert p.s_per_1000 / 1000 == pytest.approx(v["s_per_finished_response"][m])
                assert p.step_s == pytest.approx(v["inputs"][m]["step"]["step_s"])
    # the recipe's 4-node layout, filled x4 at 16 nodes
    assert proj["nodes"]["4"]["gpus"] == 32 and proj["nodes"]["16"]["gpus"] == 128
    lay = proj["nodes"]["16"]["layout"]
    assert lay["engines"] == 32 and lay["policy_tp_pp_dp"] == [8, 1, 16] and lay["critic_tp_pp_dp"] == [8, 1, 16]
    assert proj["window_tokens"] == {"ppo": 24576, "tppo": 8192, "tppo_continuous": 8192}


def test_agrees_with_plan_compare_modes_printout(proj, capsys):
    assert plan.main(["--compare-modes", "--config", RECIPE]) == 0
    text = capsys.readouterr().out
    rows = re.findall(r"^\s*(\d+) (ppo|tppo|tppo_continuous)\s+.*?(\d+)\s+[\d.]+x$", text, re.M)
    assert len(rows) == 18  # 3 node counts x 3 modes, KV-bound then resident
    for i, (nodes, mode, per_1000) in enumerate(rows):
        if nodes in proj["nodes"]:
            b = proj["nodes"][nodes] if i < 9 else proj["nodes"][nodes]["if_resident"]
            assert abs(1000 * b["s_per_finished_response"][mode] - int(per_1000)) <= 0.5, (nodes, mode)
    d = proj["length_distribution"]
    assert f"median {d['median']:.0f}, sigma {d['sigma']:g}, capped at {d['cap']}: mean {d['mean']:.0f}" in text
    assert f"window {proj['window_tokens']['tppo']}; {proj['num_slots']} slots" in text


def _record(seed, reached):
    modes = {m: {"mode": m, "responses_to_target": r, "tokens_to_target": None if r is None else 10 * r,
                 "time_to_target_s": None if r is None else r / 10} for m, r in reached.items()}
    return {"seed": seed, "modes": modes}


def test_seeds_summary_means_and_their_projection(proj):
    results = [_record(1, {"ppo": 1000.0, "tppo": 600.0, "tppo_continuous": None}),
               _record(2, {"ppo": 1400.0, "tppo": 800.0, "tppo_continuous": 900.0})]
    s = seeds_summary(results, proj)
    assert "every seed" in s["aggregation"] and s["seeds"] == [1, 2]
    assert s["modes"]["ppo"] == {"seeds": 2, "seeds_reached": 2, "responses_to_target": 1200.0,
                                 "tokens_to_target": 12000.0, "time_to_target_s": 120.0}
    assert s["modes"]["tppo_continuous"]["seeds_reached"] == 1
    assert s["modes"]["tppo_continuous"]["responses_to_target"] is None
    assert s["measured_ratios"]["time_to_target_s"]["ppo/tppo"] == pytest.approx(120.0 / 70.0)
    assert s["measured_ratios"]["responses_to_target"]["tppo/tppo_continuous"] is None
    for b in s["projection_32b"]["nodes"].values():
        spr = b["s_per_finished_response"]
        assert b["ratios"]["ppo/tppo"] == pytest.approx(1200.0 * spr["ppo"] / (700.0 * spr["tppo"]))


def test_table_and_both_pngs(proj, tmp_path):
    from tppo_vs_ppo import measured_ratios

    cfg = SimpleNamespace(rollout=SimpleNamespace(window_tokens=64, refill="window"))
    tags = {"perf/step_s": {1: 10.0, 2: 10.0}, "rollout/finished_count": {1: 4.0, 2: 6.0},
            "rollout/generated_tokens": {1: 100.0, 2: 100.0}, "eval/accuracy": {0: 0.40, 2: 0.50}}
    res = {"seed": 7, "budget_s": 20.0, "modes": {"tppo": summarize("tppo", cfg, tags, 25.0, 0.05)}}
    res["measured_ratios"] = measured_ratios(res["modes"])
    res["projection_32b"] = projection_block(proj, {"tppo": 10.0})
    text = table(res)
    assert re.search(r"^tppo\s+64\s+2\s", text, re.M) and "rsp->tgt" in text
    assert "16 nodes (128 GPUs)" in text and "ppo/tppo -" in text
    tppo_s = 10.0 * proj["nodes"]["4"]["s_per_finished_response"]["tppo"]
    assert f"tppo {tppo_s:.0f} tppo_continuous -" in text
    pngs = charts(tmp_path / "r.json", {"tppo": res["modes"]["tppo"]["accuracy_curve"]},
                  {"tppo": res["modes"]["tppo"]["accuracy_by_responses"]}, "seed 7")
    assert [p.name for p in pngs] == ["r.png", "r_responses.png"] and all(p.stat().st_size > 0 for p in pngs)


def test_main_two_seeds_files_and_summary(monkeypatch, tmp_path, capsys):
    """main with the training stubbed out: each seed's JSON and PNGs, the combined file's summary."""
    import json

    import tppo_vs_ppo

    import megatron_tppo.console

    cfg = SimpleNamespace(rollout=SimpleNamespace(window_tokens=64, refill="window"))

    def fake_seed(a, seed, proj):
        tags = _tags_for(seed)
        res = {"seed": seed, "budget_s": a.budget_s, "config": a.config, "overrides": a.overrides,
               "modes": {m: summarize(m, cfg, tags[m], 1.0, a.target_delta) for m in a.modes}}
        res["measured_ratios"] = tppo_vs_ppo.measured_ratios(res["modes"])
        res["projection_32b"] = projection_block(proj, {m: x["responses_to_target"] for m, x in res["modes"].items()})
        return res

    monkeypatch.setattr(tppo_vs_ppo, "run_seed", fake_seed)
    monkeypatch.setattr(megatron_tppo.console, "start_run_logs", lambda d: Path(d) / "logs")
    out = tmp_path / "r.json"
    assert tppo_vs_ppo.main(["--seeds", "1", "2", "--out", str(out), "--run-dir", str(tmp_path / "runs"),
                             "--recipe", RECIPE, "--project-nodes", "4", "16", "--config",
                             str(ROOT / "examples/tiny_cpu.yaml")]) == 0
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == sorted(f"r{s}{e}" for s in ("", "_seed1", "_seed2") for e in (".json", ".png", "_responses.png"))
    combined = json.loads(out.read_text())
    assert set(combined["seeds"]) == {"1", "2"} and combined["seeds"]["2"]["projection_32b"]["recipe"] == RECIPE
    sm = combined["summary"]
    # ppo: 12 then 18 responses to target (mean 15); tppo: 7 both seeds; continuous: seed 2 never
    assert sm["modes"]["ppo"]["responses_to_target"] == 15.0 and sm["modes"]["tppo"]["responses_to_target"] == 7.0
    assert sm["modes"]["tppo_continuous"]["responses_to_target"] is None
    b = sm["projection_32b"]["nodes"]["16"]
    assert b["ratios"]["ppo/tppo"] == pytest.approx(15 * b["s_per_finished_response"]["ppo"]
                                                    / (7 * b["s_per_finished_response"]["tppo"]))
    assert "mean over seeds" in capsys.readouterr().out


def _tags_for(seed):
    steps = range(1, 7)

    def tags(acc):
        return {"perf/step_s": {s: 5.0 for s in steps}, "rollout/finished_count": {s: 2.0 + s for s in steps},
                "rollout/generated_tokens": {s: 100.0 for s in steps}, "eval/accuracy": acc}
    return {"ppo": tags({0: 0.40, 3: 0.46 if seed == 1 else 0.41, 4: 0.47}),  # 12 (seed 1) or 18 responses
            "tppo": tags({0: 0.40, 2: 0.46}),  # 7
            "tppo_continuous": tags({0: 0.40, 6: 0.50 if seed == 1 else 0.42})}
