"""Full tensors gathered from TP=2 / PP=2 equal TP=1, and HF weights loaded at any layout give
HF transformers' log-probs (real gloo processes)."""
import pytest
import torch

from megatron_tppo.weights.hf_config import random_hf_model
from megatron_tppo.weights.hf_mapping import hf_state_dict_to_megatron
from tests.weights.common import MODELS, batch

LAYOUTS = [(1, 1), (2, 1), (1, 2)]


def hf_logprobs(model, b):
    with torch.no_grad():
        logits = model(input_ids=b["tokens"]).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["tokens"][:, 1:, None])[..., 0]
    return torch.nn.functional.pad(lp, (1, 0)) * b["attention_mask"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, run_jobs):
    hf_root = tmp_path_factory.mktemp("hf")
    ref = {}
    for key, m in MODELS.items():
        model = random_hf_model(m, seed=5)
        model.save_pretrained(hf_root / key, safe_serialization=True)
        ref[key] = (hf_logprobs(model, batch(m)), hf_state_dict_to_megatron(model.state_dict(), m))
    out = run_jobs([(f"tp{tp}pp{pp}", "tests.weights._gather_worker", [str(tp), str(pp), str(hf_root)], tp * pp)
                    for tp, pp in LAYOUTS], timeout_s=420)
    got = {}
    for tp, pp in LAYOUTS:
        ranks = [torch.load(out / f"tp{tp}pp{pp}_rank{r}.pt") for r in range(tp * pp)]
        merged = {}
        for key in MODELS:
            for part in ("seeded", "gathered_after_load"):
                d = {}
                for r in ranks:
                    d.update(r[f"{key}/{part}"])
                merged[f"{key}/{part}"] = d
            merged[f"{key}/logprobs"] = ranks[0][f"{key}/logprobs"]
        got[(tp, pp)] = merged
    return ref, got


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=["tp2", "pp2"])
@pytest.mark.parametrize("key", list(MODELS))
def test_gathered_tensors_equal_tp1(results, layout, key):
    _, got = results
    want, have = got[(1, 1)][f"{key}/seeded"], got[layout][f"{key}/seeded"]
    assert set(have) == set(want)
    for name in want:
        assert torch.equal(have[name], want[name]), name


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("key", list(MODELS))
def test_hf_load_matches_transformers(results, layout, key):
    ref, got = results
    ref_lp, ref_sd = ref[key]
    have = got[layout][f"{key}/gathered_after_load"]
    for name, t in have.items():
        assert torch.equal(t, ref_sd[name]), f"{name} differs after loading"
    err = (got[layout][f"{key}/logprobs"] - ref_lp).abs().max().item()
    assert err < 1e-5, f"max |logp megatron - logp HF| = {err}"
