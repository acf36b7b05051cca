"""The model forward the engine runs: one interface, per-architecture implementations, one selector.

- interface.py: `Forward`, what the engine calls for a prefill or a decode step;
- transformers_forward.py: transformers' own forward, right for every model (the fallback);
- lean.py: the lean forward for the Llama-shaped architectures it reproduces, one layer loop
  over a set of steps (plain PyTorch ops: `TorchSteps`);
- cpu_backend.py: the same loop's steps as compiled CPU kernels, and the C++ batch-1 decode loop
  built from the lean forward's own layers (a backend, not another model);
- masks.py, fuse.py: attention masks and fused projections the lean forward uses;
- probe.py: the agreement check with transformers a lean forward passes before it is used;
- select.py: `select_forward`, the one place that decides which forward a model gets.
"""
