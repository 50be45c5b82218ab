"""Step time and memory of the MTP regimes, side by side in one run (a benchmark, not a test).

One training step = verl's Megatron engine forward (padded layout) + the installed actor loss +
backward + an SGD step, on a small megatron-core GPT on CPU (see verl_mtp/testing/engine_step.py
for what is real and where the CPU boundary is). Configurations run interleaved, round after
round, so machine noise hits them alike; the table reports medians and ratios to standalone CE.

Memory: on CPU, the bytes autograd saves for the backward pass (activations, the part MTP
changes); on CUDA also torch.cuda.max_memory_allocated.

    python scripts/bench_mtp_step.py [--rounds 7] [--depths 1] [--seq-len 256] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def saved_tensor_bytes(step):
    """Run ``step`` and return the bytes of distinct storages autograd saved for backward."""
    storages = {}

    def pack(tensor):
        flat = tensor.values() if getattr(tensor, "is_nested", False) else tensor
        try:
            storage = flat.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:  # tensors without an accessible storage (views of nested buffers)
            storages[id(tensor)] = flat.numel() * flat.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--depths", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256, help="prompt + response length")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import verl  # noqa: F401 - activates the plugin
    import verl.workers.engine_workers as engine_workers

    from verl_mtp.config import ExtendedMtpConfig
    from verl_mtp.testing import engine_step
    from verl_mtp.testing.tiny_megatron import TinyGPTSpec

    torch.set_num_threads(max(1, torch.get_num_threads()))
    configs = {
        "no MTP": ExtendedMtpConfig(),
        "standalone CE": ExtendedMtpConfig(mtp_training_mode="standalone"),
        "joint CE": ExtendedMtpConfig(mtp_training_mode="joint"),
        "rl+OCC standalone": ExtendedMtpConfig(mtp_training_mode="standalone", mtp_loss_type="rl", mtp_coef_mode="occ"),
        "rl+OCC joint": ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ"),
    }
    g = torch.Generator().manual_seed(0)
    response_len = args.seq_len - args.prompt_len
    prompts = [torch.randint(0, args.vocab, (args.prompt_len,), generator=g) for _ in range(args.batch)]
    responses = [torch.randint(0, args.vocab, (response_len,), generator=g) for _ in range(args.batch)]
    old = [-torch.rand(response_len, generator=g) * 3 - 6 for _ in range(args.batch)]
    advantages = [torch.randn(response_len, generator=g) for _ in range(args.batch)]

    runs = {}
    for name, mtp in configs.items():
        spec = TinyGPTSpec(
            vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=8,
            ffn_hidden_size=4 * args.hidden, max_sequence_length=args.seq_len,
            mtp_num_layers=args.depths if mtp.enable else 0, seed=1,
        )
        model = engine_step.build_engine_model(mtp, spec)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        config, data = engine_step.actor_loss_inputs(prompts, responses, old, advantages, mtp)

        def step(model=model, optimizer=optimizer, config=config, data=data, mtp=mtp):
            optimizer.zero_grad(set_to_none=True)
            out = engine_step.engine_forward(model, prompts, responses, mtp_enable_train=mtp.enable_train)
            loss, _ = engine_workers.ppo_loss(config, out, data)
            loss.backward()
            optimizer.step()

        step()  # warm-up
        runs[name] = {"step": step, "times": [], "saved": saved_tensor_bytes(step)}

    for _ in range(args.rounds):
        for run in runs.values():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            run["step"]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            run["times"].append(time.perf_counter() - start)

    base = runs["standalone CE"]
    base_time, base_saved = statistics.median(base["times"]), base["saved"]
    print(f"tiny GPT: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.depths} MTP depth(s), "
          f"batch {args.batch} x {args.seq_len} tokens, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"{'config':<20}{'step s (median)':>16}{'x standalone CE':>17}{'saved MiB':>11}{'x standalone CE':>17}")
    for name, run in runs.items():
        t = statistics.median(run["times"])
        print(f"{name:<20}{t:>16.3f}{t / base_time:>17.3f}{run['saved'] / 2**20:>11.1f}{run['saved'] / base_saved:>17.3f}")


if __name__ == "__main__":
    main()
