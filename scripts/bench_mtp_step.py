"""Step time and peak memory of the MTP regimes at several sequence lengths, side by side in one run.

A benchmark, not a test. One training step = verl's ``BaseEngine.train_batch`` (with verl-mtp's
patches) over a CPU stand-in engine: per micro-batch, verl's Megatron engine forward (padded
layout) + the installed actor loss + backward, then an SGD step, on a small megatron-core GPT
(see verl_mtp/testing/engine_step.py for what is real and where the CPU boundary is).

For each sequence length, the configurations run interleaved, round after round, so machine
noise hits them alike; the table reports median step times and ratios to no MTP (and rl+OCC to
standalone CE). Peak memory: the most bytes of tensors created during one step and alive at
once (verl_mtp.testing.memory, any device; weights excluded, gradients included); on CUDA also
torch.cuda.max_memory_allocated. The growth table fits each configuration's peak to a power of
the sequence length, so its slope class can be compared with no MTP's.

    python scripts/bench_mtp_step.py [--seq-lens 512,1024,2048] [--rounds 3] [--chunk-tokens 512]
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time

import torch


def parse_lengths(text: str) -> list[int]:
    lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    if not lengths or lengths[0] <= 0:
        raise argparse.ArgumentTypeError(f"--seq-lens={text!r}: expected comma-separated positive integers")
    return lengths


def regimes(chunk_tokens: int, with_mini_batch_scope: bool, with_unchunked: bool):
    from verl_mtp.config import ExtendedMtpConfig

    def cfg(**kw):
        return ExtendedMtpConfig(mtp_logits_chunk_tokens=kw.pop("chunk", chunk_tokens), **kw)

    rl_occ = dict(mtp_loss_type="rl", mtp_coef_mode="occ")
    configs = {
        "no MTP": ExtendedMtpConfig(),
        "standalone CE": cfg(mtp_training_mode="standalone"),
        "joint CE": cfg(mtp_training_mode="joint"),
        "rl fixed": cfg(mtp_training_mode="standalone", mtp_loss_type="rl"),
        "rl+OCC": cfg(mtp_training_mode="standalone", **rl_occ),
        "rl+OCC joint": cfg(mtp_training_mode="joint", **rl_occ),
    }
    if with_mini_batch_scope:
        configs["rl+OCC mini_batch"] = cfg(mtp_training_mode="standalone", occ_scope="mini_batch", **rl_occ)
    if with_unchunked:  # what the chunking saves: the same run with whole-sequence MTP logits
        configs["rl+OCC unchunked"] = cfg(mtp_training_mode="standalone", chunk=0, **rl_occ)
    return configs


def build_runs(args, seq_len: int, configs: dict) -> dict:
    import verl.workers.engine_workers as engine_workers

    from verl_mtp.loss import actor_update_step
    from verl_mtp.testing import engine_step
    from verl_mtp.testing.memory import peak_tensor_bytes
    from verl_mtp.testing.tiny_megatron import TinyGPTSpec

    g = torch.Generator().manual_seed(seq_len)
    prompt_len = min(args.prompt_len, seq_len // 2)
    response_len = seq_len - prompt_len
    data = {
        "prompts": [torch.randint(0, args.vocab, (prompt_len,), generator=g) for _ in range(args.batch)],
        "responses": [torch.randint(0, args.vocab, (response_len,), generator=g) for _ in range(args.batch)],
        "old_log_probs": [-torch.rand(response_len, generator=g) * 3 - 6 for _ in range(args.batch)],
        "advantages": [torch.randn(response_len, generator=g) for _ in range(args.batch)],
    }
    runs = {}
    for name, mtp in configs.items():
        spec = TinyGPTSpec(
            vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=args.heads,
            ffn_hidden_size=4 * args.hidden, max_sequence_length=seq_len,
            mtp_num_layers=args.depths if mtp.enable else 0, seed=1,
        )
        model = engine_step.build_engine_model(mtp, spec)
        engine = engine_step.CpuStandInEngine(
            model, micro_batch_size=args.micro_batch, lr=1e-4, mtp_enable_train=mtp.enable_train
        )
        loss_function = functools.partial(engine_workers.ppo_loss, config=engine_step.actor_config(mtp))

        def step(engine=engine, loss_function=loss_function):
            engine.micro_batch_metrics.clear()
            with actor_update_step(loss_function):  # one mini-batch per step (OCC computes its sums all the same)
                engine.train_batch(data, loss_function)

        step()  # warm-up (also creates the gradient buffers, so the peak below is a steady step's)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        peak = peak_tensor_bytes(step)
        cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        runs[name] = {"step": step, "times": [], "peak": peak, "cuda_peak": cuda_peak}
    return runs


def time_runs(runs: dict, rounds: int) -> None:
    for _ in range(rounds):
        for run in runs.values():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            run["step"]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            run["times"].append(time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=parse_lengths, default=parse_lengths("512,1024,2048"),
                        help="prompt + response lengths, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--depths", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--chunk-tokens", type=int, default=512,
                        help="mtp_logits_chunk_tokens for the MTP regimes (the config default is 2048)")
    parser.add_argument("--occ-mini-batch", action="store_true", help="also run rl+OCC with occ_scope=mini_batch")
    parser.add_argument("--no-unchunked", action="store_true", help="skip the unchunked rl+OCC reference")
    args = parser.parse_args()

    import verl  # noqa: F401 - activates the plugin

    configs = regimes(args.chunk_tokens, args.occ_mini_batch, not args.no_unchunked)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"megatron-core GPT: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
          f"{args.depths} MTP depth(s); {args.batch} sequences per step in micro-batches of {args.micro_batch}; "
          f"MTP logits chunks of {args.chunk_tokens} tokens; {args.rounds} interleaved rounds; {device}", flush=True)

    results = {}
    for seq_len in args.seq_lens:
        runs = build_runs(args, seq_len, configs)
        time_runs(runs, args.rounds)
        results[seq_len] = runs
        base = runs["no MTP"]
        base_time, base_peak = statistics.median(base["times"]), base["peak"]
        ce_time = statistics.median(runs["standalone CE"]["times"])
        print(f"\nsequence length {seq_len} ({args.micro_batch * seq_len} tokens per micro-batch)")
        header = f"{'config':<20}{'step s':>9}{'x no MTP':>10}{'x std CE':>10}{'peak MiB':>10}{'x no MTP':>10}"
        if torch.cuda.is_available():
            header += f"{'CUDA MiB':>10}{'x no MTP':>10}"
        print(header)
        for name, run in runs.items():
            t = statistics.median(run["times"])
            line = (f"{name:<20}{t:>9.3f}{t / base_time:>10.3f}{t / ce_time:>10.3f}"
                    f"{run['peak'] / 2**20:>10.1f}{run['peak'] / base_peak:>10.3f}")
            if run["cuda_peak"] is not None:
                line += f"{run['cuda_peak'] / 2**20:>10.1f}{run['cuda_peak'] / base['cuda_peak']:>10.3f}"
            print(line, flush=True)

    if len(args.seq_lens) > 1:
        first, last = args.seq_lens[0], args.seq_lens[-1]
        print(f"\ngrowth of peak memory from {first} to {last} tokens: exponent p in peak ~ length^p "
              f"(1 = linear), and MiB added per 1k tokens")
        print(f"{'config':<20}{'p':>7}{'MiB/1k tok':>12}{'x no MTP':>10}")
        base_slope = None
        for name in configs:
            lo, hi = results[first][name]["peak"], results[last][name]["peak"]
            exponent = math.log(hi / lo) / math.log(last / first)
            slope = (hi - lo) / 2**20 / ((last - first) / 1000)
            base_slope = slope if base_slope is None else base_slope
            print(f"{name:<20}{exponent:>7.2f}{slope:>12.1f}{slope / base_slope:>10.3f}")

    last = results[args.seq_lens[-1]]
    worst = max((n for n in configs if n != "no MTP" and "unchunked" not in n), key=lambda n: last[n]["peak"])
    occ_ratio = statistics.median(last["rl+OCC"]["times"]) / statistics.median(last["standalone CE"]["times"])
    print(f"\ntargets at {args.seq_lens[-1]} tokens: worst MTP peak ({worst}) = "
          f"{last[worst]['peak'] / last['no MTP']['peak']:.3f}x no MTP (target <= 1.15); "
          f"rl+OCC step = {occ_ratio:.3f}x standalone CE (target <= 1.10)")


if __name__ == "__main__":
    main()
