"""The session's real CPU engine runs with the settings llm_kwargs chose (eager, max_num_seqs from
the caller), and unseeded sampling (rollout.seeded=false, the GPU default) generates."""
from __future__ import annotations

from megatron_tppo.rollout.base import Sampling


def test_cpu_engine_is_eager_with_the_given_max_num_seqs(engine):
    vc = engine.llm.llm_engine.vllm_config
    assert vc.model_config.enforce_eager is True
    assert vc.scheduler_config.max_num_seqs == 16  # the fixture's value


def test_unseeded_sampling_generates(engine):
    res = engine.generate([[1, 2, 3, 4]] * 3, 8, Sampling(temperature=1.0, seed=None))
    assert [len(r.token_ids) for r in res] and all(len(r.logprobs) == len(r.token_ids) for r in res)
