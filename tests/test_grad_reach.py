"""Gradient reach of each MTP regime, measured on a real tiny megatron-core model on CPU.

The measurement applies each regime the way verl's Megatron engine does (the engine's
``patch_engine_mtp``; labels only when MTP trains) and compares it with the tables verl-mtp
documents (``verl_mtp.megatron.compat``) and prints in ``explain``: what verl-mtp does, and what
stock verl would do on the installed megatron-core.
"""

import pytest
import torch

from verl_mtp.local_megatron.single_process import cpu_megatron
from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec, build_tiny_gpt, random_batch
from verl_mtp.megatron.compat import STOCK_VERL_GRADIENT_REACH, expected_gradient_reach, megatron_core_version, mtp_api
from verl_mtp.testing.grad_reach import PARAM_GROUPS, measure_mtp_gradient_reach, param_group

pytestmark = pytest.mark.megatron


@pytest.mark.parametrize("stock_verl", [False, True], ids=["verl-mtp", "stock-verl"])
@pytest.mark.parametrize("depths", [1, 2])
@pytest.mark.parametrize("regime", ["disabled", "standalone", "joint"])
def test_measured_reach_matches_documented_table(regime, depths, stock_verl, capsys):
    spec = TinyGPTSpec(mtp_num_layers=depths)
    norms = measure_mtp_gradient_reach(build_tiny_gpt(spec), regime, random_batch(spec), stock_verl=stock_verl)
    reached = {group for group, norm in norms.items() if norm > 0.0}
    with capsys.disabled():
        print(f"\n[grad-reach] {'stock verl' if stock_verl else 'verl-mtp'} megatron-core {megatron_core_version()} "
              f"({mtp_api()}) {regime} depths={depths}: " + ", ".join(f"{g}={norms[g]:.4g}" for g in PARAM_GROUPS))
    assert reached == set(expected_gradient_reach(regime, stock_verl=stock_verl))
    # Groups outside the reach get exactly zero, not a small number.
    for group in set(PARAM_GROUPS) - reached:
        assert norms[group] == 0.0


def test_installed_version_has_a_known_api():
    assert mtp_api() in STOCK_VERL_GRADIENT_REACH


def test_every_parameter_of_the_tiny_model_has_a_group():
    model = build_tiny_gpt(TinyGPTSpec(mtp_num_layers=2))
    groups = {param_group(name) for name, _ in model.named_parameters()}
    assert groups == set(PARAM_GROUPS)
    with pytest.raises(ValueError, match="belongs to no known group"):
        param_group("vision_tower.weight")


def test_cpu_redirections_are_undone():
    original = torch.cuda.current_device
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    original_fork = CudaRNGStatesTracker.fork
    with cpu_megatron():
        assert torch.cuda.current_device() == "cpu"
    assert torch.cuda.current_device is original
    assert CudaRNGStatesTracker.fork is original_fork


def test_tiny_model_trains_on_cpu():
    # Forward + backward + an optimizer step change the MTP weights and lower the MTP loss.
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    spec = TinyGPTSpec(mtp_num_layers=2)
    model = build_tiny_gpt(spec)
    batch = random_batch(spec, batch_size=4, seq_len=16, seed=3)
    labels = torch.roll(batch["input_ids"], -1, dims=-1)
    loss_mask = torch.ones_like(labels, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    from verl_mtp.local_megatron.tiny_gpt import forward

    mtp_losses = []
    for _ in range(8):
        optimizer.zero_grad()
        if MTPLossLoggingHelper.tracker:  # empty until the first forward
            MTPLossLoggingHelper.clean_loss_in_tracker()
        loss = forward(model, batch, labels=labels, loss_mask=loss_mask)
        (loss * loss_mask).sum().div(loss_mask.sum()).backward()
        optimizer.step()
        mtp_losses.append(MTPLossLoggingHelper.tracker["values"].clone())
    assert mtp_losses[-1].shape == (2,)
    assert torch.all(mtp_losses[-1] < mtp_losses[0])
