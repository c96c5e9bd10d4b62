"""The T-PPO step loop (TPPO.md): one window of generation, rewards, values, EGAE, two updates, sync.

Data flows one way, one call per arrow:
prompts -> window pool -> rollout -> rewards (+ critic values, overlapped) -> EGAE -> policy update
-> critic update (finished responses only) -> weight sync -> rollout.
With ``rollout.colocate`` the GPUs change hands between the phases (:mod:`.colocation`); trainers
on GPUs of their own update at once, shared trainers (``parallel.trainers=shared``) one after the
other, each in its turn.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megatron_tppo.algorithms.objectives import critic_objective, explained_variance_from_sums, policy_objective
from megatron_tppo.algorithms.tppo_batch import (
    ResponseInput,
    SegmentInput,
    critic_batch,
    pad_token_rows,
    policy_batch,
    row_attention_mask,
)
from megatron_tppo.algorithms.window_pool import Prompt, StepBatch, WindowPool
from megatron_tppo.controller.colocation import Colocation
from megatron_tppo.controller.errors import NonFiniteLossError
from megatron_tppo.evaluation import evaluate_policy
from megatron_tppo.rollout.base import Sampling


@dataclass
class Task:
    """What the loop needs from the data side (built by the entry point)."""

    prompts: object
    """Iterator of window_pool.Prompt (resumable stream)."""
    eval_prompts: list[Prompt]
    """Held-out prompts with meta for scoring."""
    decode: Callable[[list[int]], str]
    """Token ids -> text (for the reward)."""
    score: Callable[[str, dict], tuple[float, Optional[str]]]
    """(response text, prompt meta) -> (reward, failure reason or None); never raises."""
    counters: dict = field(default_factory=dict)
    """Failure counters (reward errors/timeouts, bad rows) merged into the metrics."""


class TPPOLoop:
    def __init__(self, cfg, policy, critic, rollout, task: Task, logger, progress=None, weight_sync=None,
                 colocation: Optional[Colocation] = None):
        self.cfg, self.policy, self.critic, self.rollout, self.task = cfg, policy, critic, rollout, task
        self.weight_sync = weight_sync
        self.logger, self.progress = logger, progress
        r, a = cfg.rollout, cfg.algorithm
        self.pool = WindowPool(r.num_slots, r.samples_per_prompt, r.window_tokens, r.max_response_tokens, task.prompts)
        self.version = 0
        self.policy_loss = functools.partial(policy_objective, clip_low=a.clip_low, clip_high=a.clip_high,
                                             dual_clip=a.dual_clip, positive_lm_coef=a.positive_lm_coef,
                                             entropy_coef=a.entropy_coef)
        self.critic_loss = functools.partial(critic_objective, value_clip=a.value_clip)
        self.filtered_groups = 0
        self.failures = {"reward_error": 0, "reward_timeout": 0}
        """Cumulative counts of skipped or failed items (logged as health/* every step)."""
        self.utilization = 0.0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        if colocation is None:  # (train.py makes it before the trainers exist: the start-up moves too)
            colocation = Colocation(cfg, rollout)
            colocation.attach(policy, critic)
        self.colocation = colocation
        """Applies the memory schedule (megatron_tppo/planning/schedule.py) at every phase change."""
        self.stopped_after: Optional[str] = None
        """The phase after which the last :meth:`step` stopped for a signal, or None."""

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """The loop's own state (models and the prompt stream are saved by their owners)."""
        return {"version": self.version, "filtered_groups": self.filtered_groups, "failures": dict(self.failures),
                "nonfinite_total": self.nonfinite_total, "pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.version, self.filtered_groups = state["version"], state["filtered_groups"]
        self.failures.update(state.get("failures", {}))
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.pool.load_state_dict(state["pool"])

    # ------------------------------------------------------------------ one step
    def step(self, step: int, stop_requested: Optional[Callable[[str], bool]] = None) -> dict:
        """Run step ``step`` (0-based). ``stop_requested(phase)`` is asked after generation
        (``"generation"``) and after the updates (``"updates"``); ``self.stopped_after`` says which
        phase a stop cut the step after (None: the step ran whole).

        Stopped after generation: the step is undone. The pool and the prompt stream go back to
        their state before it (the models have not moved), so a checkpoint now is the one of the
        previous step, and a resumed run regenerates the step: the same tokens with
        ``rollout.seeded`` (seeded per step and request), otherwise fresh samples of the same
        prompts (nothing lost or counted twice either way). That re-spends the window's generation
        time (about 1.5 h at 32B) but saves right away, where Slurm's warning leaves minutes and the
        updates would take many more.
        Stopped after the updates: the sync and the rest are skipped (the resumed run syncs first).
        """
        cfg, m, t_step = self.cfg, {}, time.perf_counter()
        self.stopped_after = None
        before = (self.task.prompts.state_dict(), self.state_dict()) if stop_requested is not None else None
        batch, m["perf/generate_s"] = self._timed(self.generate_window, step)
        will_sync = step >= cfg.algorithm.critic_warmup_steps  # the policy moves from this step on
        if stop_requested is not None and stop_requested("generation"):
            self.task.prompts.load_state_dict(before[0])  # (the order run_checkpoint.load uses)
            self.load_state_dict(before[1])
            self.colocation.enter("signal_generation", "critic")  # trainers back on the GPU for the save
            self.stopped_after = "generation"
            return {"perf/generate_s": m["perf/generate_s"]}
        gen_tokens = sum(s.end - s.start for s in batch.segments)
        m["perf/generated_tokens_per_s"] = gen_tokens / max(m["perf/generate_s"], 1e-9)
        self.colocation.for_training(warmup=not will_sync)  # engines sleep, trainers back on the GPU

        values_ref, t0 = self.critic.forward_async(self._context_batch(batch)), time.perf_counter()
        m.update(self.score_finished(batch))  # overlaps with the critic forward
        self.store_values(batch, self.critic.wait(values_ref))
        m["perf/values_s"] = time.perf_counter() - t0

        # decoupled updates: the policy on this window's segments, the critic on finished responses;
        # they share nothing, so trainers on GPUs of their own run both at once; shared trainers
        # take turns, the critic first (the policy stays on the GPU for the sync)
        self.colocation.for_updates(warmup=not will_sync, role="critic")
        t0 = time.perf_counter()
        segments = self.policy_segments(batch)
        train_policy = will_sync and bool(segments)
        at_once = train_policy and not self.colocation.shared
        policy_job = self.start_policy_update(segments) if at_once else None
        finished = [s for s in batch.finished if s.values and None not in s.values]
        if finished:
            m.update(self.update_critic(finished))
        if will_sync:  # (split: the same phase; a policy without segments still takes its turn for the sync)
            self.colocation.for_updates(role="policy")
        if train_policy and not at_once:
            policy_job = self.start_policy_update(segments)
        if policy_job is not None:
            m.update(self.finish_policy_update(*policy_job))
        m["perf/train_s"] = time.perf_counter() - t0
        self._check_nonfinite(m)
        if stop_requested is not None and stop_requested("updates"):
            self.stopped_after = "updates"  # no sync: the checkpoint holds the new weights
            self.colocation.enter("signal_updates" if will_sync else "signal_warmup_updates", "critic")
        else:
            if will_sync:  # (also after an update-less step: a sleeping engine dropped its weights)
                m.update(self.sync_weights())  # hands the GPUs over for the sync first (colocated)
            self.colocation.for_generation()  # trainers off the GPU, engines wake their KV cache
            m["perf/colocation_s"] = self.colocation.take_seconds()
        m.update(self.rollout_metrics(batch, gen_tokens))
        if cfg.logging.rollout_dump:
            self.dump_finished(step + 1, batch)
        m["perf/step_s"] = time.perf_counter() - t_step
        return m

    def dump_finished(self, step: int, batch: StepBatch) -> None:
        """``<output_dir>/rollouts/step_<N>.jsonl``: one line per finished response (atomic write)."""
        out = Path(self.cfg.logging.output_dir) / "rollouts"
        out.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"step": step, "prompt_uid": s.prompt_uid, "sample": s.index, "uid": s.uid,
                             "reward": s.reward, "finish_reason": s.finish_reason, "length": len(s.response_ids),
                             "windows": s.windows, "versions": [min(s.versions), max(s.versions)] if s.versions else [],
                             "response": self.task.decode(s.response_ids)})
                 for s in batch.finished]
        tmp = out / f".step_{step:08d}.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(out / f"step_{step:08d}.jsonl")

    def _check_nonfinite(self, m: dict) -> None:
        """Count updates the engine skipped for a NaN/inf loss; stop after too many in a row."""
        bad = int(m.get("policy/nonfinite_loss", 0) + m.get("critic/nonfinite_loss", 0))
        self.nonfinite_total += bad
        self.nonfinite_streak = self.nonfinite_streak + 1 if bad else 0
        m["health/nonfinite_updates"] = float(self.nonfinite_total)
        limit = self.cfg.algorithm.max_nonfinite_updates
        if self.nonfinite_streak >= limit:
            raise NonFiniteLossError(f"{self.nonfinite_streak} consecutive steps with a NaN/inf loss "
                                     f"(algorithm.max_nonfinite_updates={limit}); stopping")

    @staticmethod
    def _timed(fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - t0

    def generate_window(self, step: int) -> StepBatch:
        """One step of generation (``rollout.refill``), closed into the step's segments.

        ``self.utilization`` (``rollout/slot_utilization``) is the fraction of slot-iterations
        that produced a token. window: tokens / (active slots x the longest request's tokens),
        the decode iterations of the window. continuous: tokens / sum over engines of (its
        slots x the iterations its stream ran).
        """
        r = self.cfg.rollout
        if r.refill == "continuous":
            return self._generate_continuous(step)
        if r.refill != "window":
            raise ValueError(f"rollout.refill={r.refill!r}: not a refill mode (window, continuous)")
        self.pool.refill()
        reqs = self.pool.requests()
        if reqs:
            sampling = Sampling(temperature=r.temperature, top_p=r.top_p,
                                seed=self._seed(self.cfg.seed * 100_003 + step * 7919))
            results = self.rollout.generate([q.token_ids for q in reqs], [q.max_new_tokens for q in reqs], sampling)
            for q, res in zip(reqs, results):
                self.pool.append(q.slot, res.token_ids, res.logprobs, res.policy_version,
                                 eos=res.finish_reason == "stop")
            # decode iterations of this window = its longest request; the rest of the slots idled
            lengths = [len(res.token_ids) for res in results]
            self.utilization = sum(lengths) / max(len(lengths) * max(lengths), 1)
        return self.pool.end_step()

    def _generate_continuous(self, step: int) -> StepBatch:
        """Continuous refill: a slot whose response ends takes the next sample at once; the step
        ends after num_slots x window_tokens tokens (:mod:`megatron_tppo.controller.continuous`)."""
        r = self.cfg.rollout
        sampling = Sampling(temperature=r.temperature, top_p=r.top_p,
                            seed=self._seed(self.cfg.seed * 100_003 + step * 7919))
        stats = self.rollout.stream_step(self.pool, sampling)
        self.utilization = stats["utilization"]
        return self.pool.end_step()

    def score_finished(self, batch: StepBatch) -> dict:
        """Score every finished response; a reward that raised or hung scored 0 and is counted."""
        a = self.cfg.algorithm
        for s in batch.finished:
            reward, failure = self.task.score(self.task.decode(s.response_ids), s.meta)
            if failure:
                key = f"reward_{failure}"
                self.failures[key] = self.failures.get(key, 0) + 1
            if s.finish_reason == "length_cap":
                reward -= a.overlong_penalty
            self.pool.set_reward(s.uid, reward)
        return {f"health/{k}": float(v) for k, v in self.failures.items()}

    def _context_batch(self, batch: StepBatch) -> dict:
        """Rows = each segment's full context; the critic's values for its new tokens."""
        rows = [seg.token_ids for seg in batch.segments] or [[0, 0]]
        width = max(len(r) for r in rows)
        return {"tokens": pad_token_rows(rows, width), "attention_mask": row_attention_mask(rows, width)}

    def store_values(self, batch: StepBatch, out: dict) -> None:
        values, after = out["values"], out["values_after"]
        for i, seg in enumerate(batch.segments):
            a = seg.prompt_len + seg.start
            self.pool.set_values(seg.sample_uid, seg.start, values[i, a: a + seg.end - seg.start].tolist(),
                                 after=float(after[i, seg.prompt_len + seg.end - 1]))

    def policy_segments(self, batch: StepBatch) -> list[SegmentInput]:
        """This step's segments as policy inputs, less the groups dynamic sampling drops (config
        validation allows it only where each group is generated and trained within this step)."""
        drop = set()
        if self.cfg.algorithm.dynamic_sampling:
            for gid, group in batch.completed_groups.items():
                if len({s.reward for s in group}) == 1:
                    drop.add(gid)
            self.filtered_groups += len(drop)
        out = []
        for seg in batch.segments:
            if seg.prompt_uid in drop:
                continue
            s = self.pool.sample(seg.sample_uid)
            exact = self.cfg.algorithm.truncation_bootstrap == "exact" and not seg.finished
            out.append(SegmentInput(seg.token_ids, seg.prompt_len, seg.start, seg.end, seg.logprobs,
                                    s.values[seg.start: seg.end], seg.finished, s.reward or 0.0,
                                    value_after=s.value_after if exact else None))
        return out

    def start_policy_update(self, segments: list[SegmentInput]) -> tuple:
        """Build the policy batch and start the first optimizer step (epoch) on it."""
        a, r = self.cfg.algorithm, self.cfg.rollout
        b = policy_batch(segments, gamma=a.gamma, lambda_alpha=a.policy_lambda_alpha, lambda_min=a.policy_lambda_min,
                         window_tokens=r.window_tokens, tail_ignore=a.truncated_tail_ignore,
                         advantage_clamp=a.advantage_clamp, whiten=a.advantage_whiten)
        n = float(b.pop("num_tokens"))
        m = {}
        adv = b["advantages"][b["loss_mask"].bool()]
        m.update({"policy/advantage_mean": float(adv.mean()),
                  "policy/advantage_std": float(adv.std()) if adv.numel() > 1 else 0.0,
                  "policy/advantage_max": float(adv.max()), "policy/advantage_min": float(adv.min()),
                  "policy/lambda_mean": float(b["lambda"].mean())})
        t0 = time.perf_counter()
        refs = self.policy.train_step_async(b, self.policy_loss, n, with_entropy=True,
                                            temperature=self.cfg.rollout.logprob_temperature())
        return refs, b, n, m, t0

    def finish_policy_update(self, refs, b: dict, n: float, m: dict, t0: float) -> dict:
        """Finish the first epoch, run the others; ``policy/*`` are the last epoch's metrics.

        ``rollout/logprob_mismatch_max`` / ``_mean``: the largest and the mean |train log-prob -
        rollout log-prob| over the batch's loss tokens. They come from the FIRST epoch's forward
        (no extra forward), which runs before any update of this step, i.e. with the weights that
        generated the window's tokens (the last sync); so they measure the trainer-vs-engine
        numerical mismatch whatever ``policy_epochs`` is. Later epochs' differences
        (``policy/logprob_abs_diff*``) also include the updates made since.
        """
        a = self.cfg.algorithm
        out = first = self.policy.wait_train(refs)
        for _ in range(a.policy_epochs - 1):
            out = self.policy.train_step(b, self.policy_loss, n, with_entropy=True,
                                         temperature=self.cfg.rollout.logprob_temperature())
        dt = time.perf_counter() - t0
        self.version += 1
        m["rollout/logprob_mismatch_max"] = first["logprob_abs_diff_max"]
        m["rollout/logprob_mismatch_mean"] = first["logprob_abs_diff"]
        m["perf/policy_train_tokens_per_s"] = float(b["attention_mask"].sum()) * a.policy_epochs / max(dt, 1e-9)
        m.update({f"policy/{k}": v for k, v in out.items()})
        return m

    def update_critic(self, finished) -> dict:
        a = self.cfg.algorithm
        resp = [ResponseInput(s.prompt_ids + s.response_ids, len(s.prompt_ids), list(s.values), float(s.reward or 0.0))
                for s in finished]
        b = critic_batch(resp, gamma=a.gamma, lam=a.critic_lambda)
        n = float(b.pop("num_tokens"))
        for _ in range(a.critic_epochs):
            out = self.critic.train_step(b, self.critic_loss, n)
        m = {f"critic/{k}": v for k, v in out.items() if k not in ("ret_mean", "ret_sq", "err_mean", "err_sq")}
        m["critic/explained_variance"] = explained_variance_from_sums(out)
        m["critic/tokens"] = n
        return m

    def sync_weights(self) -> dict:
        """The policy's weights straight from its trainer ranks into every engine worker
        (:class:`~megatron_tppo.controller.weight_sync.WeightSync`; the driver holds no tensor)."""
        self.colocation.for_sync()  # colocated: critic and optimizer states off, engine weights awake
        return self.weight_sync.sync(self.version)

    def rollout_metrics(self, batch: StepBatch, gen_tokens: int) -> dict:
        fin = batch.finished
        lengths = [len(s.response_ids) for s in fin]
        rewards = [s.reward or 0.0 for s in fin]
        st = self.pool.stats()
        m = {"rollout/finished_count": float(len(fin)),
             "rollout/truncated_count": float(sum(1 for s in batch.segments if not s.finished)),
             "rollout/active_slots": float(len(batch.segments)),
             "rollout/generated_tokens": float(gen_tokens),
             "rollout/prompts_taken": float(st["prompts_taken"]),
             "rollout/in_flight": float(st["in_flight"]), "rollout/pending": float(st["pending"]),
             "rollout/filtered_groups": float(self.filtered_groups),
             "rollout/slot_utilization": float(self.utilization),
             "health/bad_rows": float(getattr(self.task.prompts, "bad_rows", 0)),
             "rollout/length_capped": float(sum(1 for s in fin if s.finish_reason == "length_cap"))}
        if fin:
            m.update({"train/reward_mean": sum(rewards) / len(rewards),
                      "rollout/response_length_mean": sum(lengths) / len(lengths),
                      "rollout/response_length_max": float(max(lengths)),
                      "rollout/windows_per_finished": sum(s.windows for s in fin) / len(fin)})
        return m

    def _seed(self, seed: int) -> Optional[int]:
        """``seed`` when rollout.seeded (None: on CPU only) asks for reproducible generation, else None."""
        from megatron_tppo.platform import resolve_device

        seeded = self.cfg.rollout.seeded
        return seed if (resolve_device(self.cfg.parallel.device) == "cpu" if seeded is None else seeded) else None

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """pass@1 averaged over k samples on the held-out prompts, full-length generation, with its
        bootstrap standard error over prompts (:mod:`megatron_tppo.evaluation`, the code
        ``python -m megatron_tppo.evaluate`` runs too)."""
        d, r = self.cfg.data, self.cfg.rollout
        t0 = time.perf_counter()
        sampling = Sampling(temperature=r.temperature, top_p=r.top_p, seed=self._seed(self.cfg.seed))
        report, _ = evaluate_policy(self.rollout, self.task.eval_prompts, d.eval_samples_per_prompt,
                                    r.max_response_tokens, sampling, self.task.decode,
                                    lambda text, meta: self.task.score(text, meta)[0], seed=self.cfg.seed)
        return {**report.metrics("eval/"), "perf/eval_s": time.perf_counter() - t0}
