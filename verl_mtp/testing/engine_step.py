"""Drive verl's Megatron engine forward and actor loss on a tiny CPU model (tests, benchmark, demo).

Real parts: verl's ``patch_engine_mtp`` (with verl-mtp's patches), ``gptmodel_forward_model_engine``
in the padded (BSHD) layout, the engine's ``_lm_head_logits_processor``, verl's un-packing and the
actor loss ``verl.workers.engine_workers.ppo_loss``.

CPU boundary: verl's BSHD path hands the model a [batch, seq] padding mask that only
TransformerEngine attention accepts; ``build_engine_model`` gives megatron's local attention the
equivalent 4-D causal mask instead (right padding + causal attention: valid positions never
attend to padding). The engine object itself (optimizer, DDP, checkpointing) is not built.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import torch

from verl_mtp.testing.tiny_megatron import TinyGPTSpec, build_tiny_gpt, causal_mask, cpu_megatron


def nested(tensors):
    return torch.nested.nested_tensor(list(tensors), layout=torch.jagged)


def build_engine_model(mtp, spec: TinyGPTSpec):
    """A tiny GPTModel prepared as verl's engine prepares it for ``mtp`` (an ExtendedMtpConfig)."""
    import verl.workers.engine.megatron.transformer_impl as engine_module

    model = build_tiny_gpt(spec)
    if mtp.enable and spec.mtp_num_layers:
        engine_module.patch_engine_mtp(model, SimpleNamespace(mtp=mtp))  # verl's patch + verl-mtp's
    inner = model.forward

    def forward_with_causal_mask(*args, attention_mask=None, **kwargs):
        return inner(*args, attention_mask=causal_mask(kwargs["input_ids"].shape[1]), **kwargs)

    model.forward = forward_with_causal_mask
    return model


def engine_forward(model, prompts, responses, temperature: float = 1.0, mtp_enable_train: bool = True):
    """verl's engine forward on [prompt; response] sequences; returns verl's model_output dict."""
    import verl.workers.engine.megatron.transformer_impl as engine_module
    from verl.models.mcore.model_forward import gptmodel_forward_model_engine
    from verl.utils.torch_functional import expand_as_nested

    input_ids = nested(torch.cat([p, r]) for p, r in zip(prompts, responses))
    fake_engine = SimpleNamespace(engine_config=SimpleNamespace(entropy_from_logits_with_chunking=False))
    processor = partial(
        engine_module.MegatronEngineWithLMHead._lm_head_logits_processor,
        fake_engine,
        calculate_sum_pi_squared=False,
        calculate_entropy=True,
        distillation_use_topk=False,
        distillation_only=False,
        logits_processor_func=None,
        batch=None,
        data_format="bshd",
    )
    args = {
        "label": input_ids.clone(),
        "temperature": expand_as_nested(torch.full((len(prompts),), float(temperature)), input_ids),
        "loss_mask": nested(torch.ones(len(r)) for r in responses),
    }
    with cpu_megatron():
        return gptmodel_forward_model_engine(
            model, input_ids, {}, logits_processor=processor, logits_processor_args=args,
            data_format="bshd", mtp_enable_train=mtp_enable_train,
        )


def actor_loss_inputs(prompts, responses, old_log_probs, advantages, mtp, **actor):
    """verl's ActorConfig (with ``mtp`` as its model config's) and the loss's TensorDict."""
    import verl.utils.tensordict_utils as tu
    from verl.workers.config.actor import ActorConfig

    config = ActorConfig(strategy="megatron", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1, **actor)
    config.model_config = SimpleNamespace(mtp=mtp)
    data = tu.get_tensordict(
        {
            "prompts": nested(prompts),
            "responses": nested(responses),
            "response_mask": nested(torch.ones(len(r)) for r in responses),
            "old_log_probs": nested(old_log_probs),
            "advantages": nested(advantages),
        },
        {"dp_size": 1, "batch_num_tokens": sum(len(r) for r in responses), "global_batch_size": len(prompts)},
    )
    return config, data
