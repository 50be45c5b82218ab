"""Step time and memory of the MTP regimes, side by side in one run (a benchmark, not a test).

One training step = verl's ``BaseEngine.train_batch`` (with verl-mtp's OCC pre-pass patch) over a
CPU stand-in engine: per micro-batch, verl's Megatron engine forward (padded layout) + the
installed actor loss + backward, then an SGD step, on a small megatron-core GPT on CPU (see
verl_mtp/testing/engine_step.py for what is real and where the CPU boundary is). Configurations run interleaved, round after
round, so machine noise hits them alike; the table reports medians and ratios to standalone CE.

Memory: on CPU, the bytes autograd saves for the backward pass (activations, the part MTP
changes); on CUDA also torch.cuda.max_memory_allocated.

    python scripts/bench_mtp_step.py [--rounds 7] [--depths 1] [--seq-len 256] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import functools
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
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
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
        "rl fixed standalone": ExtendedMtpConfig(mtp_training_mode="standalone", mtp_loss_type="rl"),
        "rl+OCC standalone uB": ExtendedMtpConfig(mtp_training_mode="standalone", mtp_loss_type="rl", mtp_coef_mode="occ"),
        "rl+OCC standalone mB": ExtendedMtpConfig(
            mtp_training_mode="standalone", mtp_loss_type="rl", mtp_coef_mode="occ", occ_scope="mini_batch"
        ),
        "rl+OCC joint uB": ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ"),
        "rl+OCC joint mB": ExtendedMtpConfig(
            mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ", occ_scope="mini_batch"
        ),
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
        # verl's BaseEngine.train_batch (with the OCC pre-pass patch) over a CPU stand-in engine.
        engine = engine_step.CpuStandInEngine(
            model, micro_batch_size=args.micro_batch, lr=1e-4, mtp_enable_train=mtp.enable_train
        )
        loss_function = functools.partial(engine_workers.ppo_loss, config=engine_step.actor_config(mtp))
        data = {"prompts": prompts, "responses": responses, "old_log_probs": old, "advantages": advantages}

        def step(engine=engine, loss_function=loss_function, data=data):
            engine.micro_batch_metrics.clear()
            engine.train_batch(data, loss_function)

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
          f"batch {args.batch} x {args.seq_len} tokens in micro-batches of {args.micro_batch}, "
          f"{args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads")
    print("uB = occ_scope=micro_batch, mB = occ_scope=mini_batch (one extra no-grad forward per mini-batch)")
    print(f"{'config':<22}{'step s (median)':>16}{'x standalone CE':>17}{'saved MiB':>11}{'x standalone CE':>17}")
    for name, run in runs.items():
        t = statistics.median(run["times"])
        print(f"{name:<22}{t:>16.3f}{t / base_time:>17.3f}{run['saved'] / 2**20:>11.1f}{run['saved'] / base_saved:>17.3f}")


if __name__ == "__main__":
    main()
