"""One rank of a weights job: ``python -m tests.weights._gather_worker <tp> <pp> <hf_dir> <out_dir>``.

Builds the policy at (tp, pp) from a fixed seed, gathers its full tensors (iter_full_params), then
loads the HF checkpoint in ``hf_dir`` into it (load_hf_into) and computes log-probs of a fixed
batch. Writes ``<out_dir>/tp<tp>pp<pp>_rank<r>.pt``.
"""
import sys

import torch

from megatron_tppo.config import LayoutConfig, OptimizerConfig
from megatron_tppo.training import TrainEngine, init_parallel
from megatron_tppo.weights.gather import iter_full_params
from megatron_tppo.weights.hf_io import load_hf_into
from tests.weights.common import MODELS, SEED, batch


def main(tp: int, pp: int, hf_root: str, out: str) -> None:
    info = init_parallel(tp, pp, "cpu")
    res = {}
    for key, m in MODELS.items():
        layout = LayoutConfig(tensor_parallel=tp, pipeline_parallel=pp, data_parallel=info.dp)
        eng = TrainEngine(m, layout, OptimizerConfig(), role="policy", device="cpu", seed=SEED, with_optimizer=False)
        res[f"{key}/seeded"] = dict(iter_full_params(eng.module))
        res[f"{key}/loaded_n"] = load_hf_into(eng.module, f"{hf_root}/{key}", m)
        res[f"{key}/logprobs"] = eng.forward(batch(m))["logprobs"]
        res[f"{key}/gathered_after_load"] = dict(iter_full_params(eng.module))
    torch.save(res, f"{out}/tp{tp}pp{pp}_rank{torch.distributed.get_rank()}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
