"""The bf16 engine path on one GPU, in one run: a table of what a real run's actor does with MTP.

verl 0.9.1's ``MegatronEngineWithLMHead`` is built as a ``main_ppo`` actor builds it (bf16,
``Float16Module``, DDP, distributed optimizer; verl_mtp/testing/real_engine.py) from a random
MiMo-layout checkpoint written to a temporary directory (nothing is downloaded), on CUDA with
none of the CPU redirections (``real_engine.engine_device("cuda")``, nccl, world size 1). Rows:

- forward: old log-probs through the worker's ``infer_batch`` (finite; median time);
- an rl+OCC update through the worker's ``train_mini_batch`` (two mini-batches: the first is
  on-policy by the schedule, the second follows an optimizer step): grad norm, median time;
- chunked vs unchunked MTP log-probs: the same weights, ``mtp_logits_chunk_tokens`` = N vs 0,
  one training-mode forward each; max |difference| over valid positions;
- on-policy delta_RL: RMS per token of log pi_theta (training forward) - log pi_old
  (``infer_batch``) on the on-policy mini-batch (``actor/mtp_1/occ_delta_rl_rms``), and on the
  off-policy one for contrast;
- step time (old log-probs + update, median of interleaved rounds) and peak memory (the engine's
  resident tensors + the update's peak; on CUDA from ``max_memory_allocated``) for no MTP,
  standalone CE and rl+OCC, with the ratios the README states targets for.

    python scripts/gpu_check.py --device cuda          # what scripts/gpu_check.sh runs
    python scripts/gpu_check.py --device cpu --quick   # the same on tiny sizes (CI, tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time

import torch

# sizes per mode: (seq_len, prompt_len, batch, mini_batch, micro_batch, infer_micro_batch,
#                  hidden, ffn, layers, heads, vocab, chunk_tokens, rounds)
SIZES = {
    # a 0.46B-parameter model with a Qwen-sized vocabulary, 4k tokens per sequence: ~40 GB on an H200
    "full": dict(seq_len=4096, prompt_len=512, batch=4, mini_batch=2, micro_batch=1, infer_micro_batch=2,
                 hidden=1024, ffn=2816, layers=12, heads=16, vocab=151936, chunk_tokens=1024, rounds=3),
    "quick": dict(seq_len=64, prompt_len=16, batch=4, mini_batch=2, micro_batch=1, infer_micro_batch=2,
                  hidden=64, ffn=128, layers=2, heads=4, vocab=512, chunk_tokens=16, rounds=1),
}

ROWS = (
    "forward (infer_batch) s",
    "forward: old log-probs finite",
    "rl+OCC update (train_mini_batch) s",
    "rl+OCC grad norm",
    "chunked vs unchunked MTP log-probs max abs diff",
    "on-policy delta_RL RMS per token",
    "off-policy delta_RL RMS per token",
    "step s, no MTP",
    "step s, standalone CE",
    "step s, rl+OCC",
    "step rl+OCC / standalone CE",
    "peak MiB, no MTP",
    "peak MiB, standalone CE",
    "peak MiB, rl+OCC",
    "peak rl+OCC / no MTP",
)


def _values(tensor):
    return tensor.values() if getattr(tensor, "is_nested", False) else tensor


def mtp_log_probs(engine, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth-1..K MTP log-probs and their validity from one training-mode forward (zero loss, so
    the backward through the chunked path runs but changes nothing; gradients are zeroed after)."""
    from verl_mtp.megatron.keys import MTP_LOG_PROBS_KEY, MTP_VALID_KEY

    seen = []

    def capture(model_output, data, dp_group=None):
        seen.append((_values(model_output[MTP_LOG_PROBS_KEY]).detach().float().cpu(),
                     _values(model_output[MTP_VALID_KEY]).detach().bool().cpu()))
        return _values(model_output[MTP_LOG_PROBS_KEY]).sum() * 0.0, {}

    engine.forward_backward(engine.mini_batch_data(batch), capture)
    engine.zero_grad()
    if not seen:
        raise RuntimeError("the engine's forward delivered no MTP log-probs to the loss function")
    return torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])


def _floats(metrics, key):
    if key not in metrics:
        raise KeyError(f"metric {key!r} missing from the update's metrics: {sorted(metrics)}")
    value = metrics[key]
    return [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def run_check(args) -> dict[str, float]:
    import bench_mtp_step as bench  # this script's folder is on sys.path when it runs as a file

    from verl_mtp.config import ExtendedMtpConfig
    from verl_mtp.testing import real_engine

    cuda = args.device == "cuda"
    real_engine.init_engine_process_group(args.device)
    occ = dict(enable=True, enable_train=True, mtp_training_mode="standalone", mtp_loss_type="rl",
               mtp_coef_mode="occ", occ_scope="micro_batch")
    configs = {
        "no MTP": ExtendedMtpConfig(enable=False),
        "standalone CE": ExtendedMtpConfig(enable=True, enable_train=True, mtp_training_mode="standalone",
                                           mtp_logits_chunk_tokens=args.chunk_tokens),
        "rl+OCC": ExtendedMtpConfig(mtp_logits_chunk_tokens=args.chunk_tokens, **occ),
        "rl+OCC unchunked": ExtendedMtpConfig(mtp_logits_chunk_tokens=0, **occ),
    }
    out: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    response_len = args.seq_len - args.prompt_len
    prompts = [torch.randint(3, args.vocab, (args.prompt_len,), generator=g) for _ in range(args.batch)]
    responses = [torch.randint(3, args.vocab, (response_len,), generator=g) for _ in range(args.batch)]
    advantages = torch.randn(args.batch, response_len, generator=g)
    batch = real_engine.rollout_batch(prompts, responses)

    with tempfile.TemporaryDirectory() as tmp, real_engine.engine_device(args.device):
        bench.write_checkpoint(tmp, args, args.seq_len)
        runs = {}
        try:
            for name, mtp in configs.items():
                engine = real_engine.RealEngine.build(
                    tmp, mtp, micro_batch_size=args.micro_batch, infer_micro_batch_size=args.infer_micro_batch,
                    mini_batch_size=args.mini_batch, lr=1e-5, clip_grad=1.0)
                runs[name] = bench.Run(name, engine, cuda)
                runs[name].set_data(batch, advantages)
            # same weights in every engine until the first update: compare the chunked and unchunked paths now
            chunked, valid = mtp_log_probs(runs["rl+OCC"].engine, batch)
            unchunked, valid_ref = mtp_log_probs(runs["rl+OCC unchunked"].engine, batch)
            if not torch.equal(valid, valid_ref):
                raise RuntimeError("chunked and unchunked MTP forwards disagree on which positions are valid")
            out["chunked vs unchunked MTP log-probs max abs diff"] = float((chunked - unchunked)[valid].abs().max())
            runs.pop("rl+OCC unchunked").engine.close()

            occ_run = runs["rl+OCC"]
            occ_run.infer()
            out["forward: old log-probs finite"] = float(torch.isfinite(occ_run.old).all())
            occ_run.update()  # the first step: its first mini-batch is on-policy, its second is not
            metrics = occ_run.metrics
            out["rl+OCC grad norm"] = max(_floats(metrics, "grad_norm"))
            on_policy = _floats(metrics, "actor/mtp_1/occ_on_policy")
            rms = _floats(metrics, "actor/mtp_1/occ_delta_rl_rms")
            on = [r for r, flag in zip(rms, on_policy) if flag == 1.0]
            off = [r for r, flag in zip(rms, on_policy) if flag == 0.0]
            if not on or not off:
                raise RuntimeError(f"expected on- and off-policy mini-batches, got occ_on_policy={on_policy}")
            out["on-policy delta_RL RMS per token"] = max(on)
            out["off-policy delta_RL RMS per token"] = max(off)

            for run in runs.values():  # warm-up of the others, then each one's peak over an update
                if run is not occ_run:
                    run.infer()
                    run.update()
                run.infer()
                run.measure_peak()
            order = list(runs.values())
            for round_index in range(args.rounds):  # interleaved, the order rotating: noise hits all alike
                shift = round_index % len(order)
                for run in order[shift:] + order[:shift]:
                    run.infer_times.append(run.infer())
                    run.update_times.append(run.update()[0])
            out["forward (infer_batch) s"] = statistics.median(occ_run.infer_times)
            out["rl+OCC update (train_mini_batch) s"] = statistics.median(occ_run.update_times)
            for name, run in runs.items():
                out[f"step s, {name}"] = statistics.median(run.infer_times) + statistics.median(run.update_times)
                out[f"peak MiB, {name}"] = (run.cuda_peak if cuda else run.peak) / 2**20
        finally:
            for run in runs.values():
                run.engine.close()
    out["step rl+OCC / standalone CE"] = out["step s, rl+OCC"] / out["step s, standalone CE"]
    out["peak rl+OCC / no MTP"] = out["peak MiB, rl+OCC"] / out["peak MiB, no MTP"]
    return out


NOTES = {
    "forward: old log-probs finite": "1 = every old log-prob finite",
    "chunked vs unchunked MTP log-probs max abs diff": "bf16 GEMMs of other shapes: ~1e-2 or below expected",
    "on-policy delta_RL RMS per token": "infer_batch vs training forward, same weights: numerics only",
    "off-policy delta_RL RMS per token": "after one optimizer step, for scale",
    "step rl+OCC / standalone CE": "target <= 1.10",
    "peak rl+OCC / no MTP": "target <= 1.15",
}


def print_table(out: dict[str, float]) -> None:
    print("| check | value | note |")
    print("|---|---|---|")
    for row in ROWS:
        value = out[row]
        text = f"{value:.3e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5) else f"{value:.4f}"
        print(f"| {row} | {text} | {NOTES.get(row, '')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds on a CPU)")
    parser.add_argument("--depths", type=int, default=1, help="MTP depths of the checkpoint")
    for key, value in SIZES["full"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"default {value} ({SIZES['quick'][key]} with --quick)")
    args = parser.parse_args(argv)
    for key, value in SIZES["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in SIZES["full"]:
        if getattr(args, key) < (0 if key == "chunk_tokens" else 1):
            parser.error(f"--{key.replace('_', '-')}={getattr(args, key)}: must be >= 1")
    if args.prompt_len >= args.seq_len:
        parser.error(f"--prompt-len={args.prompt_len} must be below --seq-len={args.seq_len}")
    if args.batch != 2 * args.mini_batch or args.mini_batch % args.micro_batch:
        parser.error(f"--batch={args.batch}, --mini-batch={args.mini_batch}, --micro-batch={args.micro_batch}: "
                     "the check needs exactly two mini-batches per step (on- and off-policy) and micro-batches "
                     "that divide a mini-batch")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda: torch sees no CUDA device (valid choices: cuda, cpu)")

    import megatron.core
    import verl  # noqa: F401 - activates the plugin, as in every verl process

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"gpu_check: {where}; torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
          f"verl {verl.__version__}; bf16 MegatronEngineWithLMHead, hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, {args.depths} MTP depth(s); {args.batch} sequences of {args.seq_len} tokens, "
          f"mini-batches of {args.mini_batch}, micro-batches of {args.micro_batch}; MTP logits chunks of "
          f"{args.chunk_tokens} tokens; {args.rounds} timing round(s)", flush=True)
    start = time.perf_counter()
    out = run_check(args)
    print()
    print_table(out)
    bad = [row for row in ROWS if not math.isfinite(out[row])]
    print(f"\n{len(ROWS)} rows in {time.perf_counter() - start:.0f} s; "
          + (f"NOT FINITE: {', '.join(bad)}" if bad else "all finite"), flush=True)
    return 1 if bad or out["forward: old log-probs finite"] != 1.0 else 0


if __name__ == "__main__":
    sys.exit(main())
