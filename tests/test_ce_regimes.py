"""mtp_loss_type=ce through verl-mtp's MTP forward.

Through verl's real Megatron engine in bf16 (verl_mtp/testing/real_engine.py: Float16Module,
DDP gradient buffers, the engine's ``forward_backward_batch`` through megatron's schedule): the
step weights' scaling of each depth's gradient and the draft-agreement metric.

On the bare fp32 model with the engine's forward pieces (``engine_step``: verl's
``gptmodel_forward_model_engine`` (BSHD), verl's ``patch_engine_mtp`` wrapped by verl-mtp, the
engine's logits processor, megatron's MTP loss tracker): the per-depth CE against an independent
reference to 1e-5 and the equality with stock verl's loss and gradients to 1e-6. Those two compare
different code paths number for number, which bf16 rounding cannot resolve. CPU boundary as in
test_rl_forward_e2e.py (4-D causal mask instead of TE's padding mask).
"""

import pytest
import torch

from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.local_megatron import engine_step
from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec
from verl_mtp.testing import real_engine
from verl_mtp.testing.grad_reach import param_group

pytestmark = pytest.mark.megatron

PROMPTS, RESPONSES, DEPTHS = [3, 2, 4], [4, 5, 2], 2


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 64, (p,), generator=g) for p in PROMPTS]
    responses = [torch.randint(0, 64, (r,), generator=g) for r in RESPONSES]
    return prompts, responses


def tracked_ce_losses():
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    values = MTPLossLoggingHelper.tracker["values"].clone()
    MTPLossLoggingHelper.clean_loss_in_tracker()
    return values


def run(mtp, seed=0, stock_verl=False, capture=None):
    """One forward+backward of the MTP CE term (main head x 0); returns (model, per-depth tracked CE)."""
    import verl.workers.engine.megatron.transformer_impl as engine_module
    from verl.utils.megatron_utils import patch_engine_mtp as stock_patch

    torch.manual_seed(1234)
    if stock_verl:  # the same model prepared by verl's own patch only
        original = engine_module.patch_engine_mtp
        engine_module.patch_engine_mtp = stock_patch
    try:
        model = engine_step.build_engine_model(mtp, TinyGPTSpec(mtp_num_layers=DEPTHS))
    finally:
        if stock_verl:
            engine_module.patch_engine_mtp = original
    if capture is not None:
        model.mtp.register_forward_hook(lambda module, args, output: capture.__setitem__("hidden", output))
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    if MTPLossLoggingHelper.tracker:
        MTPLossLoggingHelper.clean_loss_in_tracker()
    prompts, responses = batch(seed)
    out = engine_step.engine_forward(model, prompts, responses)
    (out["log_probs"].values().sum() * 0.0).backward()
    return model, tracked_ce_losses(), out, (prompts, responses)


def grads(model, groups):
    return {n: p.grad.clone() for n, p in model.named_parameters() if param_group(n) in groups and p.grad is not None}


def test_per_depth_ce_covers_exactly_the_response_tokens():
    # Independent reference from the MTP block's own hidden states: depth k at hidden position t
    # predicts token t+k+1, and counts only where that token is a response token.
    captured = {}
    mtp = ExtendedMtpConfig(mtp_training_mode="joint")
    model, tracked, _, (prompts, responses) = run(mtp, capture=captured)
    chunks = torch.chunk(captured["hidden"], 1 + DEPTHS, dim=0)
    weight = model.output_layer.weight.detach().double()
    for k in range(1, DEPTHS + 1):
        losses = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            tokens = torch.cat([p, r])
            for t in range(len(tokens)):
                target = t + k + 1
                if len(p) <= target < len(tokens):  # a response token
                    logp = torch.log_softmax(chunks[k][t, i].double() @ weight.T, dim=-1)
                    losses.append(-logp[tokens[target]])
        reference = torch.stack(losses).mean()
        # tokens whose depth-k prediction needs a position before the sequence start are absent
        assert len(losses) == sum(min(len(r), len(p) + len(r) - k - 1) for p, r in zip(prompts, responses))
        assert tracked[k - 1].item() == pytest.approx(reference.item(), abs=1e-5)


@pytest.mark.parametrize("regime", ["standalone", "joint"])
def test_beta_one_reproduces_verls_loss_and_gradients_where_verl_is_right(regime):
    from verl_mtp.megatron.compat import expected_gradient_reach

    mtp = ExtendedMtpConfig(mtp_training_mode=regime)
    ours, ours_ce, _, _ = run(mtp)
    stock, stock_ce, _, _ = run(mtp, stock_verl=True)
    assert torch.allclose(ours_ce, stock_ce, atol=1e-6)
    # Groups both paths train get the same gradient; verl's leaks/omissions are what differs.
    shared = set(expected_gradient_reach(regime)) & set(expected_gradient_reach(regime, stock_verl=True))
    ours_g, stock_g = grads(ours, shared), grads(stock, shared)
    assert ours_g.keys() == stock_g.keys() and ours_g
    for name in ours_g:
        assert torch.allclose(ours_g[name], stock_g[name], atol=1e-6), name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from verl_mtp.local_megatron.single_process import init_single_process_megatron

    init_single_process_megatron()
    return real_engine.write_tiny_engine_checkpoint(str(tmp_path_factory.mktemp("ce_ckpt")), mtp_depths=DEPTHS)


def real_run(checkpoint, capture=None, **mtp):
    """One training-mode forward+backward of the engine (main head x 0, so only the MTP CE term
    leaves gradient); returns the engine (caller closes it), the loss function's (model_output,
    data) and the DDP gradients by name."""
    engine = real_engine.RealEngine.build(
        checkpoint, ExtendedMtpConfig(enable=True, enable_train=True, **mtp), micro_batch_size=len(PROMPTS))
    if capture is not None:
        engine.gpt_models()[0].mtp.register_forward_hook(lambda module, args, output: capture.__setitem__("hidden", output))
    prompts, responses = batch()
    g = torch.Generator().manual_seed(5)
    width = max(RESPONSES)
    data = engine.mini_batch_data(real_engine.rollout_batch(prompts, responses),
                                  -torch.rand(len(PROMPTS), width, generator=g), torch.randn(len(PROMPTS), width, generator=g))
    seen = []

    def zero_main_loss(model_output, data, dp_group=None):
        seen.append((model_output, data))
        return model_output["log_probs"].values().sum() * 0.0, {}

    engine.zero_grad()
    engine.forward_backward(data, zero_main_loss)
    grads = {n: p.main_grad.detach().clone() for n, p in engine.named_parameters() if getattr(p, "main_grad", None) is not None}
    engine.zero_grad()
    return engine, seen[0], grads, (prompts, responses)


def test_step_weights_scale_each_depths_loss(checkpoint):
    # Depth-2 MTP layer parameters get gradient from depth 2's loss only, so beta=0.5 halves it
    # (a power of two: exact in bf16 too).
    uniform_engine, _, uniform, _ = real_run(checkpoint, mtp_training_mode="standalone")
    decayed_engine, _, decayed, _ = real_run(checkpoint, mtp_training_mode="standalone", mtp_step_weight_beta=0.5)
    uniform_engine.close()
    decayed_engine.close()
    depth2 = [n for n in uniform if n.startswith("mtp.layers.1.") and uniform[n].abs().sum() > 0]
    assert depth2
    for name in depth2:
        torch.testing.assert_close(decayed[name], 0.5 * uniform[name], rtol=1e-5, atol=1e-8, msg=name)


def test_draft_agreement_metric_equals_argmax_reference(checkpoint):
    from verl.workers.engine_workers import ppo_loss  # verl's name, with verl-mtp's wrapper

    captured = {}
    engine, (out, data), _, (prompts, responses) = real_run(checkpoint, capture=captured, mtp_training_mode="joint")
    try:
        _, metrics = ppo_loss(engine.actor_config, out, data)
        model = engine.gpt_models()[0]
    finally:
        engine.close()
    chunks = torch.chunk(captured["hidden"], 1 + DEPTHS, dim=0)
    weight = model.output_layer.weight.detach().double()
    for k in range(1, DEPTHS + 1):
        # the engine's logits are bf16: a near tie (top-2 within 0.05) may go either way
        sure, unsure = 0, 0
        for i, (p, r) in enumerate(zip(prompts, responses)):
            tokens = torch.cat([p, r])
            for j in range(len(r)):
                source = len(p) + j - k - 1  # hidden position whose depth-k prediction is response token j
                if source >= 0:
                    logits = chunks[k][source, i].double() @ weight.T
                    top = logits.topk(2)
                    hit = int(top.indices[0] == tokens[len(p) + j])
                    near = bool(top.values[0] - top.values[1] < 0.05) or bool(logits[tokens[len(p) + j]] > top.values[0] - 0.05)
                    if near:
                        unsure += 1
                    else:
                        sure += hit
        metric = metrics[f"actor/mtp_{k}/draft_agreement"].aggregate() * sum(RESPONSES)
        assert sure - 1e-6 <= metric <= sure + unsure + 1e-6, (k, sure, unsure, metric)
