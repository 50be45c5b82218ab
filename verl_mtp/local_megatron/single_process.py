"""megatron-core in one process, on CPU or one GPU: what the tests, ``verl-mtp demo``, ``verl-mtp
accept-eval`` and ``verl_mtp.local_megatron.hf_model.load_hf_model`` need to build and run a model outside
verl's workers.

megatron-core runs on CPU with gloo, world size 1, the local (non-TransformerEngine) layer spec,
fp32 and fusions off, once two hard-coded CUDA calls are redirected: ``torch.cuda.current_device``
(RoPE, attention buffers, the MTP loss tracker) and the CUDA RNG tracker's ``fork``; and, for MoE
models on megatron-core 0.16, one missing name is bound (``moe_router_gemm_without_te``).
``cpu_megatron()`` applies all three and restores them. ``CPU_TRANSFORMER_OVERRIDES`` are the
TransformerConfig fields such a build needs.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch

# TransformerConfig fields a CPU build needs: no fused kernels (CUDA / Apex / TransformerEngine
# only) and no dropout (runs that repeat exactly).
CPU_TRANSFORMER_OVERRIDES = dict(
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)


@contextlib.contextmanager
def cpu_megatron():
    """Redirect megatron-core's hard-coded CUDA calls to the CPU for the duration."""
    from megatron.core.tensor_parallel import random as mcore_random

    original_current_device = torch.cuda.current_device
    original_fork = mcore_random.CudaRNGStatesTracker.fork
    torch.cuda.current_device = lambda: "cpu"
    mcore_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    try:
        with moe_router_gemm_without_te():
            yield
    finally:
        torch.cuda.current_device = original_current_device
        mcore_random.CudaRNGStatesTracker.fork = original_fork


@contextlib.contextmanager
def moe_router_gemm_without_te():
    """Bind ``megatron.core.transformer.moe.moe_utils.te_general_gemm = None`` for the duration
    when the module lacks the name (megatron-core 0.16 without TransformerEngine); else nothing.

    Every MoE router's gating (``TopKRouter.gating`` -> ``router_gating_linear``) runs
    ``RouterGatingLinearFunction``, whose forward and backward first test ``te_general_gemm is not
    None`` and otherwise multiply with ``torch.mm`` / ``torch.addmm``. megatron-core 0.16.1 imports
    that name only inside its ``try: import transformer_engine`` block, so without TransformerEngine
    the test itself raises ``NameError`` whatever ``moe_router_dtype`` is (the name is read before
    the dtype); 0.18 binds it to None in that case. None here selects the same torch path 0.18
    takes. With TransformerEngine installed the name exists and nothing changes.
    """
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:  # no MoE support in this megatron-core: nothing to bind
        yield
        return
    if hasattr(moe_utils, "te_general_gemm") or not hasattr(moe_utils, "RouterGatingLinearFunction"):
        yield
        return
    moe_utils.te_general_gemm = None
    try:
        yield
    finally:
        if moe_utils.__dict__.get("te_general_gemm", 0) is None:
            del moe_utils.te_general_gemm


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_megatron() -> None:
    """gloo process group of size 1 and megatron's model-parallel state (TP=PP=1). Idempotent."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        # A fresh port of its own, not MASTER_PORT: a process started by one that already holds
        # a group (a test, a tool run from a training script) inherits a port that is in use.
        port = free_port()
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def causal_mask(seq_len: int) -> torch.Tensor:
    """megatron's boolean attention mask: True = masked out."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool), diagonal=1)
