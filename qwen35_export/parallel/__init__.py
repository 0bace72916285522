"""Tensor and expert parallelism over the ranks of one host (torch.distributed: NCCL on GPUs, gloo on CPU).

- `plan.py`    `ParallelPlan` (tp, ep, world size) and which heads / experts each rank owns
- `shard.py`   one layer's weights -> per-rank shards (and back, for checks), FP8 scales alongside
- `layers.py`  the TP/EP forward of the decoder layers: mixer all-reduce; MoE = replicated tokens + local
               experts + all-reduce
- `model.py`   the reference model on one rank (eager), for tests and validation
- `capture.py` the exporter's layer modules for a sharded build
- `engine.py`  `ShardedEngine`: loads the rank's shard of a sharded engine under torchrun
- `validate.py` a sharded engine vs the sharded reference and vs a 1-rank engine, launched with torchrun

Spike (torch 2.13 cpu, 2026-11-24): a torch.export'ed graph holding
`torch.distributed._functional_collectives.all_reduce` exports as `_c10d_functional.all_reduce` +
`wait_tensor`; `torch._inductor.aoti_compile_and_package` compiles it for CPU into a call of the C shim
`aoti_torch_cpu__c10d_functional_all_reduce_` on group "0" (WORLD); one package, loaded in fresh processes
under gloo with 2 ranks, returns the exact all-reduced result on both. So the collectives stay inside the
layer graphs, and because nothing rank-specific is baked in (the rank's weights and expert map are graph
inputs, the group is WORLD), one compiled graph per (layer kind, phase) serves every rank.
"""
