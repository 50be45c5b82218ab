"""A real, tiny megatron-core GPTModel with MTP depths, on CPU.

Used by ``verl-mtp demo``, the tests and the benchmarks. It runs in the single-process runtime of
``verl_mtp.local_megatron.single_process`` (gloo, world size 1, ``cpu_megatron()``), with the local
(non-TransformerEngine) layer spec, fp32 and fusions off. Packed (THD) attention needs
TransformerEngine, so this builder covers the padded layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verl_mtp.local_megatron.single_process import (
    CPU_TRANSFORMER_OVERRIDES,
    causal_mask,
    cpu_megatron,
    init_single_process_megatron,
)


@dataclass(frozen=True)
class TinyGPTSpec:
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: int = 64
    max_sequence_length: int = 64
    mtp_num_layers: int = 1
    mtp_loss_scaling_factor: float = 0.1
    seed: int = 1234


def build_tiny_gpt(spec: TinyGPTSpec = TinyGPTSpec()):
    """A GPTModel with ``spec.mtp_num_layers`` MTP depths, initialised deterministically from the seed.

    ``use_cpu_initialization`` draws from torch's CPU generator, so megatron's CUDA RNG tracker
    is never seeded (that would need CUDA); its ``fork`` is a no-op under ``cpu_megatron``.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer import TransformerConfig

    init_single_process_megatron()
    _reset_mtp_loss_tracker()
    torch.manual_seed(spec.seed)
    with cpu_megatron():
        config = TransformerConfig(
            num_layers=spec.num_layers,
            hidden_size=spec.hidden_size,
            num_attention_heads=spec.num_attention_heads,
            ffn_hidden_size=spec.ffn_hidden_size,
            mtp_num_layers=spec.mtp_num_layers or None,
            mtp_loss_scaling_factor=spec.mtp_loss_scaling_factor,
            use_cpu_initialization=True,
            params_dtype=torch.float32,
            **CPU_TRANSFORMER_OVERRIDES,
        )
        layer_spec = get_gpt_layer_local_spec()
        mtp_block_spec = (
            get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False) if spec.mtp_num_layers else None
        )
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.max_sequence_length,
            position_embedding_type="rope",
            mtp_block_spec=mtp_block_spec,
        )
    return model


def _reset_mtp_loss_tracker() -> None:
    # megatron keeps MTP losses in a process-global tracker sized by the first model's depth
    # count; a later model with more depths would index past it.
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.tracker.clear()


def random_batch(spec: TinyGPTSpec, batch_size: int = 2, seq_len: int = 12, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, spec.vocab_size, (batch_size, seq_len), generator=generator)
    return {
        "input_ids": input_ids,
        "position_ids": torch.arange(seq_len).expand(batch_size, seq_len),
        "attention_mask": causal_mask(seq_len),
    }


def forward(model, batch: dict, labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None):
    with cpu_megatron():
        return model(
            batch["input_ids"],
            batch["position_ids"],
            batch["attention_mask"],
            labels=labels,
            loss_mask=loss_mask,
        )
