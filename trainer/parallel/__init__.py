"""How the trainer spreads one MUGDiT over processes: tensor, sequence, context and pipeline parallelism, the plan
that records who holds what, and the collectives over gradients and state dicts.

    from trainer.parallel import parallelize
    plan = parallelize(model, layout, sequence_parallel=stage.sequence_parallel, recompute=stage.recompute)

- ``plan.py``: ``parallelize`` (applies everything below in order) and ``ParallelPlan`` / ``ParamRole``;
- ``tensor_parallel.py``: megatron-core column/row-parallel linears (local or Transformer Engine), sequence parallel;
- ``context_parallel.py``: the CP and SP token splits (any token count: the model pads);
- ``recompute.py``: activation recomputation per block;
- ``pipeline.py``: pipeline stages and megatron-core's 1F1B schedule;
- ``grads.py``: gradient sync and clipping; ``state_dict.py``: full / sharded / dist_checkpointing state dicts.

docs/parallelism.md explains each with what was measured.
"""
from trainer.parallel.plan import ParallelPlan, ParamRole, parallelize

__all__ = ["ParallelPlan", "ParamRole", "parallelize"]
