"""Planning: pure arithmetic on a config and a cluster (no torch, ray, vLLM or megatron import).

- :mod:`.layout`: the GPU of every actor (the placement the Ray code applies) and the weights'
  route there (the rule of :mod:`megatron_tppo.weight_route`);
- :mod:`.memory` and :mod:`.hardware`: bytes per component, the GPU's and the host's numbers;
- :mod:`.occupancy`: what one trainer rank or engine worker holds on its GPU in a state;
- :mod:`.schedule`: the memory schedule, every phase on every GPU, and the moves the controller
  applies between phases (split trainers at once, shared ones in turns);
- :mod:`.time_model`: a step's roofline, the start-up and the waits sized from them;
- :mod:`.plan`: all of it for one config and cluster (``python -m megatron_tppo.plan``);
- :mod:`.projection` and :mod:`.simulate`: PPO against both T-PPO modes, per finished response
  and per slot-iteration.
"""
