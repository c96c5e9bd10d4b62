"""Ray actor groups: a trainer (TP x PP x DP ranks forming one process group) and rollout engines.

Placement: every actor goes where the run's pure plan (:mod:`megatron_tppo.planning.layout`) puts it,
through the placement groups :class:`~megatron_tppo.controller.ray_placement.PlacedCluster`
created from that plan; the groups here only start actors and call them.
"""
from __future__ import annotations

from typing import Any, Optional

import ray

from megatron_tppo.controller.errors import ActorDiedError
from megatron_tppo.controller.ray_placement import PlacedCluster
from megatron_tppo.controller.workers import RolloutWorker, TrainerWorker
from megatron_tppo.training.batching import merge_row_parts


def _get(refs: Any, what: str, timeout: Optional[float] = None, who: Optional[list[str]] = None) -> Any:
    """ray.get that turns an actor death into a clear, named error instead of a hang.

    Results are awaited as they complete, so a rank that died is noticed at once even while its
    peers are still blocked in a collective waiting for it (a plain ray.get on the list would wait
    on the first, blocked, rank). ``who`` names the actor behind each ref, for the message.
    """
    listed = list(refs) if isinstance(refs, list) else [refs]
    pending, current = list(listed), None
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                raise ray.exceptions.GetTimeoutError(what)
            current = done[0]
            ray.get(current)  # raises if that task failed
        return ray.get(refs)
    except ray.exceptions.RayActorError as err:
        name = who[listed.index(current)] if who and current in listed else "a Ray actor"
        raise ActorDiedError(f"{what}: {name} died ({err.__class__.__name__}: {str(err).splitlines()[0]})") from err
    except ray.exceptions.GetTimeoutError as err:
        raise ActorDiedError(f"{what}: no answer within {timeout} s") from err


def wait_all(refs: list, what: str, who: Optional[list[str]] = None, timeout: Optional[float] = None) -> list:
    """:func:`_get` for calls into several groups at once (e.g. trainers sending while engines
    receive): the first failure anywhere raises, named, instead of leaving its peers blocked."""
    return _get(refs, what, timeout=timeout, who=who)


def _names(group: str, where: Optional[list[dict]], n: int) -> list[str]:
    if not where:
        return [f"{group} rank {i}" for i in range(n)]
    return [f"{group} rank {w['rank']} (pid {w['pid']} on {w['node']})" for w in where]


class TrainerGroup:
    """All ranks of one trained model (policy or critic) as Ray actors.

    ``init_weights=False``: the ranks skip the random initialization (no full-size master weights;
    parameters NaN until loaded), for a caller that loads every weight next (:meth:`load`,
    :meth:`load_hf`).
    """

    def __init__(self, name: str, model_cfg, layout, optim_cfg, *, role: str, device: str, seed: int,
                 total_steps: int, placed: PlacedCluster, threads: int = 0, setup_timeout_s: float = 600.0,
                 init_weights: bool = True):
        self.name, self.world, self.where = name, layout.world_size, None
        self.setup_timeout_s = setup_timeout_s
        """The limit of a build or a load (train.py sizes it from the plan's start-up projection)."""
        self.who = _names(name, None, self.world)  # actor names for errors; pid and node once known
        actors = placed.plan.policy if role == "policy" else placed.plan.critic
        assert len(actors) == self.world, (len(actors), self.world)
        remote = ray.remote(TrainerWorker)
        self.workers = [remote.options(**placed.actor_options(a)).remote(a.rank, self.world, threads) for a in actors]
        master = _get(self.workers[0].address.remote(), f"{name}: rank 0 address", timeout=setup_timeout_s)
        self.ranks = self._all("setup", master, model_cfg, layout, optim_cfg, role, device, seed, total_steps,
                               init_weights=init_weights, timeout=setup_timeout_s)
        self.where = [dict(w, group=name, rank=i, gpus=[[g.node, g.index] for g in a.gpus])
                      for i, (w, a) in enumerate(zip(self._all("ping", timeout=setup_timeout_s), actors))]
        self.who = _names(name, self.where, self.world)

    def _all(self, method: str, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> list:
        refs = [getattr(w, method).remote(*args, **kwargs) for w in self.workers]
        return _get(refs, f"{self.name}.{method}", timeout=timeout, who=self.who)

    def load_hf(self, hf_dir: str) -> int:
        return self._all("load_hf", hf_dir, timeout=self.setup_timeout_s)[0]

    def forward(self, batch: dict, with_entropy: bool = False, temperature: float = 1.0) -> dict:
        return self.wait(self.forward_async(batch, with_entropy, temperature))

    def forward_async(self, batch: dict, with_entropy: bool = False, temperature: float = 1.0) -> list:
        """Start a forward on every rank; each DP replica computes its share of the rows.
        ``temperature``: the policy's log-probs are of softmax(logits / temperature)."""
        batch_ref = ray.put(batch)
        return [w.forward.remote(batch_ref, with_entropy, temperature) for w in self.workers]

    def wait(self, refs: list) -> dict:
        """The outputs of all rows ({key: [B, T]}), reassembled from the replicas' parts."""
        return merge_row_parts(_get(refs, f"{self.name}.forward", who=self.who))

    def train_step(self, batch: dict, loss_fn, global_num_tokens: float, with_entropy: bool = False,
                   temperature: float = 1.0) -> dict:
        return self.wait_train(self.train_step_async(batch, loss_fn, global_num_tokens, with_entropy, temperature))

    def train_step_async(self, batch: dict, loss_fn, global_num_tokens: float, with_entropy: bool = False,
                         temperature: float = 1.0) -> list:
        """Start one optimizer step on every rank; :meth:`wait_train` returns its metrics."""
        batch_ref = ray.put(batch)  # one copy in the object store for all ranks
        return [w.train_step.remote(batch_ref, loss_fn, global_num_tokens, with_entropy, temperature)
                for w in self.workers]

    def wait_train(self, refs: list) -> dict:
        return _get(refs, f"{self.name}.train_step", who=self.who)[0]

    def save(self, path: str, with_optimizer: bool = True) -> None:
        self.wait_save(self.save_async(path, with_optimizer))

    def save_async(self, path: str, with_optimizer: bool = True) -> list:
        """Start a torch_dist save on every rank (so another group can save at the same time)."""
        return [w.save.remote(path, with_optimizer) for w in self.workers]

    def wait_save(self, refs: list) -> None:
        _get(refs, f"{self.name}.save", who=self.who)

    def load(self, path: str, with_optimizer: bool = True) -> None:
        self._all("load", path, with_optimizer, timeout=self.setup_timeout_s)

    def offload(self, params: bool = True, grads: bool | str = True, optimizer: bool = True) -> dict:
        """Free the trainer's device memory on every rank (bytes kept on host; ``grads="drop"``:
        gradients freed without a copy, zero after onload); rank 0's stats."""
        return self._all("offload", params, grads, optimizer)[0]

    def onload(self) -> dict:
        """Restore everything :meth:`offload` freed, on every rank; rank 0's stats."""
        return self._all("onload")[0]

    def memory_state(self) -> list[dict]:
        """Every rank's :meth:`TrainerWorker.memory_state`."""
        return self._all("memory_state")

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)


class RolloutGroup:
    """``num_engines`` generation engines; requests are split across them.

    ``weights``: what the engines start from (:data:`~megatron_tppo.rollout.base.StartWeights`):
    "checkpoint" reads ``model_path``'s safetensors; "dummy" only its config, for a caller that
    syncs weights into the engines before it generates (the engines refuse to generate until then).
    """

    def __init__(self, backend: str, model_path: str, rollout_cfg, model_cfg, *, placed: PlacedCluster,
                 threads: int = 0, setup_timeout_s: float = 600.0, weights: str = "checkpoint",
                 utilization=None):
        """``utilization``: on GPUs, ``f(GPU memory in bytes) -> rollout.gpu_memory_utilization``, called
        in each engine actor before vLLM starts (the memory schedule's budget for the engines)."""
        n = rollout_cfg.num_engines
        actors = placed.plan.engines
        assert len(actors) == n, (len(actors), n)
        # an engine's actor holds a share of its first GPU; its TP workers (vLLM's own processes)
        # see all of its GPUs through CUDA_VISIBLE_DEVICES
        remote = ray.remote(RolloutWorker)
        self.workers = [remote.options(**placed.actor_options(a)).remote(
                            backend, model_path, rollout_cfg, model_cfg, threads, placed.visible_devices(a),
                            weights, utilization)
                        for a in actors]
        where = _get([w.ping.remote() for w in self.workers], "rollout: engine start", timeout=setup_timeout_s)
        self.where = [dict(w, group="rollout engine", rank=i, gpus=[[g.node, g.index] for g in a.gpus])
                      for i, (w, a) in enumerate(zip(where, actors))]
        self.who = _names("rollout engine", self.where, n)

    def generate(self, prompts: list, max_tokens: list, sampling, n: int = 1) -> list:
        """Split the prompts evenly over the engines; results in prompt-major order."""
        k = len(self.workers)
        chunks = [(i * len(prompts) // k, (i + 1) * len(prompts) // k) for i in range(k)]
        refs = [w.generate.remote(prompts[a:b], max_tokens[a:b], sampling, n)
                for w, (a, b) in zip(self.workers, chunks) if b > a]
        out: list = []
        who = [name for name, (a, b) in zip(self.who, chunks) if b > a]
        for part in _get(refs, "rollout.generate", who=who):
            out.extend(part)
        return out

    def stream_step(self, pool, sampling) -> dict:
        """One continuous-refill step of ``pool`` over all engines (``rollout.refill=continuous``).

        Engine e gets its own contiguous share of the pool's slots and the same share of the
        step's token budget (:class:`~megatron_tppo.controller.continuous.ContinuousStep`); the
        engines run at once and each reply is applied to the pool as it arrives, so an engine
        never waits for another. Returns the step's stats (tokens, utilization, ...); the
        caller ends the pool's step. After an error every stream still open is closed.
        """
        from megatron_tppo.controller.continuous import ContinuousStep

        step = ContinuousStep(pool, len(self.workers), sampling)
        refs = {}
        for e, call in enumerate(step.first_calls()):
            if call is not None:
                refs[self.workers[e].call.remote("stream", *call.args())] = e
        try:
            while refs:
                (done,), _ = ray.wait(list(refs), num_returns=1)
                e = refs.pop(done)
                nxt = step.on_update(e, _get(done, "rollout.stream", who=[self.who[e]]))
                if nxt is not None:
                    refs[self.workers[e].call.remote("stream", *nxt.args())] = e
        except BaseException:
            for e in step.close_calls():
                try:
                    ray.get(self.workers[e].call.remote("stream", [], 0), timeout=60)
                except Exception:  # noqa: BLE001 - best effort on an error path
                    pass
            raise
        return step.stats()

    def sleep(self, level: int = 2) -> None:
        """Every engine frees its GPU memory (level 2: weights and KV cache; the next sync reloads
        the weights, so a step without a sync must use level 1). No-op on CPU."""
        _get([w.call.remote("sleep", level) for w in self.workers], "rollout.sleep", who=self.who)

    def memory_state(self) -> list[dict]:
        """Every engine's sleep state (:meth:`RolloutEngine.memory_state`)."""
        return _get([w.call.remote("memory_state") for w in self.workers], "rollout.memory_state", who=self.who)

    def wake_up(self, tags: Optional[list] = None) -> None:
        """Every engine re-allocates ``tags`` ("weights" before a sync, "kv_cache" after; None = all)."""
        _get([w.call.remote("wake_up", tags) for w in self.workers], "rollout.wake_up", who=self.who)

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.get(w.call.remote("shutdown"), timeout=30)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            ray.kill(w, no_restart=True)
