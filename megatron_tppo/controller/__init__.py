"""The Ray controller: the only package that imports ray.

- :mod:`~megatron_tppo.controller.cluster`: start a local Ray cluster or join one.
- :mod:`~megatron_tppo.controller.workers`: trainer ranks and rollout engines (plain classes).
- :mod:`~megatron_tppo.controller.groups`: those as placed Ray actor groups.
- :mod:`~megatron_tppo.controller.loop`: the T-PPO step loop.
- :mod:`~megatron_tppo.controller.run_checkpoint`: atomic run checkpoints and resume.
- :mod:`~megatron_tppo.controller.errors`: why a run stopped (no ray import).
"""
