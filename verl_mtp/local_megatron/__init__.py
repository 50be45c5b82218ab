"""megatron-core in a single process, on CPU (or one GPU), outside verl's workers.

What ``verl-mtp demo``, ``verl-mtp accept-eval`` and the tests share:

- ``single_process``: a gloo world of size 1 and megatron's parallel state, ``cpu_megatron()`` (the
  hard-coded CUDA calls redirected to the CPU), the CPU TransformerConfig overrides, the causal mask.
- ``tiny_gpt``: a real, tiny megatron-core GPTModel with MTP depths.
- ``engine_step``: verl's Megatron engine forward, actor loss and ``train_batch`` on such a model.
- ``hf_model``: a Hugging Face checkpoint loaded into megatron-core through verl-mtp's bridges.

A training run never needs it: verl's workers build and run the models there. Nothing here
imports ``verl_mtp.testing``.
"""
