"""A receiver in a process of its own (tests/weights/test_transfer.py's ipc test):
``python -m tests.weights._ipc_receiver HOST PORT RANK WORLD OUT``. Joins the ipc group, keeps every
received view (not a copy) until the stage ends, then saves copies, whether each view's storage is
shared memory, and its TransferStats to OUT."""
import sys

import torch

from megatron_tppo.weights.transfer import receive
from megatron_tppo.weights.transports import TransferStats, join


def main(host: str, port: str, rank: str, world: str, out: str) -> None:
    group = join("ipc", int(rank), int(world), address=(host, int(port)), timeout_s=60)
    stats = TransferStats()
    views = list(receive(group, stats))  # views into the sender's buffers, held past its release and unlink
    torch.save({"tensors": [(n, t.clone()) for n, t in views],
                "shared": [t.untyped_storage().is_shared() for _, t in views],
                "stats": stats.as_dict()}, out)
    group.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
