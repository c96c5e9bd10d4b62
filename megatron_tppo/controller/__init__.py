"""The Ray controller: the only package that imports ray.

- :mod:`~megatron_tppo.controller.cluster`: start a local Ray cluster or join one.
- :mod:`~megatron_tppo.controller.workers`: trainer ranks and rollout engines (plain classes).
- :mod:`~megatron_tppo.controller.groups`: those as placed Ray actor groups.
- :mod:`~megatron_tppo.controller.loop`: the T-PPO step loop.
"""
