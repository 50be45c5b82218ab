"""Load a Hugging Face checkpoint into a megatron-core model in this process (CPU or one GPU)
through verl-mtp's corrected mbridge bridges, and export it back under Hugging Face names.

``verl-mtp accept-eval`` and the tests use it; a training run builds its models in verl's workers.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from verl_mtp.local_megatron.single_process import CPU_TRANSFORMER_OVERRIDES, cpu_megatron, init_single_process_megatron
from verl_mtp.models.bridges import bridge_class_for, hf_config_object
from verl_mtp.models.export_check import checked_export
from verl_mtp.models.families import Family, detect_family, mtp_depths
from verl_mtp.models.mtp_bridge import transformer_engine_available


@dataclass
class LoadedModel:
    model: Any  # megatron.core GPTModel (one chunk)
    bridge: Any
    hf_config: dict  # config.json
    family: Family


# TransformerConfig fields a bridge-built model needs to run without TransformerEngine: the CPU
# build's, plus what its MoE layers need.
_BRIDGE_CPU_OVERRIDES = dict(
    CPU_TRANSFORMER_OVERRIDES,
    use_cpu_initialization=True,
    moe_grouped_gemm=False,
    # the alltoall dispatcher creates a CUDA stream; allgather needs fixed sequence lengths
    moe_token_dispatcher_type="allgather",
    variable_seq_lengths=False,
    # megatron asserts the NVTE_* variables match the backend and sets them process-wide; the
    # other CPU models (and stock bridges) use "auto", DeepSeek-V3's bridge "fused".
    attention_backend="auto",
    moe_shared_expert_overlap=False,
    moe_router_dtype=None,
)


def load_hf_model(hf_path: str, *, mtp_num_layers: int | None = None, dtype=torch.float32) -> LoadedModel:
    """Build a megatron-core GPTModel with MTP from a Hugging Face checkpoint and load its weights.

    Single process: initialises gloo and megatron's parallel state (TP=PP=1) when needed; works
    on CPU (local layer spec, fusions off) and on CUDA (the model is moved there when CUDA is
    available). ``mtp_num_layers`` overrides the declared depth count (``None``: the
    checkpoint's). The returned model is in eval mode.
    """
    with open(os.path.join(hf_path, "config.json")) as f:
        config = json.load(f)
    family = detect_family(config)
    bridge_cls = bridge_class_for(config, family)
    depths = mtp_depths(config) if mtp_num_layers is None else mtp_num_layers
    if depths < 1:
        raise ValueError(f"{hf_path}: config.json declares no MTP depth and mtp_num_layers={mtp_num_layers!r}")

    init_single_process_megatron()
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.tracker.clear()  # sized by the first model built in the process
    on_cpu = not torch.cuda.is_available()
    with cpu_megatron() if on_cpu else contextlib.nullcontext():
        bridge = bridge_cls(hf_config_object(hf_path, config), dtype=dtype)
        # Without TransformerEngine (CPU, or a GPU machine without it) the local spec is built,
        # which needs the fused kernels off as well.
        portable = on_cpu or not transformer_engine_available()
        overrides = dict(_BRIDGE_CPU_OVERRIDES) if portable else {}
        overrides.update(mtp_num_layers=depths, mtp_loss_scaling_factor=0.1)
        overrides.update(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype is torch.bfloat16,
                         fp16=dtype is torch.float16)
        bridge.set_extra_args(**overrides)
        provider = bridge._model_provider([])
        model = provider(pre_process=True, post_process=True)
        # megatron's local-spec norms keep fp32 weights (training wraps the model in Float16Module,
        # which casts everything); cast here so a bf16/fp16 model is uniformly that dtype.
        if dtype is not torch.float32:
            model = model.to(dtype)
        if not on_cpu:
            model = model.cuda()
        bridge.load_weights([model], hf_path)
    model.eval()
    return LoadedModel(model=model, bridge=bridge, hf_config=config, family=family)


def export_hf_weights(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Every tensor of the model under its Hugging Face name, MTP head included (CPU copies).

    The export stream is checked for MTP completeness (``verl_mtp.models.export_check``)."""
    on_cpu = not torch.cuda.is_available()
    out: dict[str, torch.Tensor] = {}
    with cpu_megatron() if on_cpu else contextlib.nullcontext():
        stream = checked_export(loaded.bridge.export_weights([loaded.model]), [loaded.model],
                                loaded.bridge, hf_config=loaded.hf_config)
        for name, tensor in stream:
            if name in out:
                raise ValueError(f"export produced {name!r} twice")
            out[name] = tensor.detach().to("cpu", copy=True)
    return out
