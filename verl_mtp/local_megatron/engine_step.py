"""Drive verl's Megatron engine forward and actor loss on a tiny CPU model (demo, tests, benchmark).

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
from verl.workers.engine.base import BaseEngine

from verl_mtp.local_megatron.single_process import causal_mask, cpu_megatron
from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt


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
    fake_engine = SimpleNamespace(engine_config=SimpleNamespace(entropy_from_logits_with_chunking=False), module=[model])
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


def actor_config(mtp, **actor):
    """verl's ActorConfig with ``mtp`` as its model config's MTP config."""
    from verl.workers.config.actor import ActorConfig

    config = ActorConfig(strategy="megatron", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1, **actor)
    config.model_config = SimpleNamespace(mtp=mtp)
    return config


def loss_data(prompts, responses, old_log_probs, advantages, batch_num_tokens=None):
    """The actor loss's TensorDict for one micro-batch; ``batch_num_tokens`` = mini-batch response tokens."""
    import verl.utils.tensordict_utils as tu

    if batch_num_tokens is None:
        batch_num_tokens = sum(len(r) for r in responses)
    return tu.get_tensordict(
        {
            "prompts": nested(prompts),
            "responses": nested(responses),
            "response_mask": nested(torch.ones(len(r)) for r in responses),
            "old_log_probs": nested(old_log_probs),
            "advantages": nested(advantages),
        },
        {"dp_size": 1, "batch_num_tokens": batch_num_tokens, "global_batch_size": len(prompts)},
    )


def actor_loss_inputs(prompts, responses, old_log_probs, advantages, mtp, **actor):
    """verl's ActorConfig (with ``mtp`` as its model config's) and the loss's TensorDict."""
    return actor_config(mtp, **actor), loss_data(prompts, responses, old_log_probs, advantages)


class CpuStandInEngine(BaseEngine):
    """A CPU stand-in for verl's MegatronEngineWithLMHead around a tiny model (demo and tests).

    verl's Megatron engine needs CUDA (DDP buffers, distributed optimizer), so this class supplies
    only what ``BaseEngine.train_batch`` calls: micro-batch split, zero-grad, forward/backward and
    an SGD step. The forward, the loss function and ``train_batch`` itself are verl's real ones
    (with verl-mtp's patches). ``data`` is a dict of per-sequence lists: prompts, responses,
    old_log_probs, advantages. Every micro-batch's loss metrics are kept in ``micro_batch_metrics``.
    """

    def __init__(
        self, model, micro_batch_size: int = 2, lr: float = 0.1, temperature: float = 1.0, mtp_enable_train=True,
        optimizer: str = "sgd",
    ):
        self.module = [model]
        self.mtp_enable_train = mtp_enable_train
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature
        optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
        if optimizer not in optimizers:
            raise ValueError(f"optimizer={optimizer!r}: valid choices are {', '.join(optimizers)}")
        self.optimizer = optimizers[optimizer](model.parameters(), lr=lr)
        self.micro_batch_metrics: list[dict] = []
        self.forward_only_calls = 0

    def optimizer_zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self):
        self.optimizer.step()
        return 0.0

    def is_mp_src_rank_with_outputs(self):
        return True

    def get_data_parallel_group(self):
        return None

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        model = self.module[0]
        total_tokens = sum(len(r) for r in data["responses"])
        n = len(data["prompts"])
        self.forward_only_calls += int(forward_only)
        for start in range(0, n, self.micro_batch_size):
            part = {k: v[start : start + self.micro_batch_size] for k, v in data.items()}
            out = engine_forward(model, part["prompts"], part["responses"], self.temperature, self.mtp_enable_train)
            td = loss_data(part["prompts"], part["responses"], part["old_log_probs"], part["advantages"], total_tokens)
            loss, metrics = loss_function(model_output=out, data=td, dp_group=None)
            if not forward_only:
                self.micro_batch_metrics.append(metrics)
                loss.backward()
        return {"metrics": {}}
