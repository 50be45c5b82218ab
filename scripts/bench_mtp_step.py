"""Step time and peak memory of the MTP regimes at several sequence lengths, through verl's real engine.

A benchmark, not a test. Each configuration is verl 0.9.1's ``MegatronEngineWithLMHead`` built
as a ``main_ppo`` actor builds it (verl_mtp/testing/real_engine.py: bf16, megatron's
``Float16Module``, DDP and distributed optimizer, from a random MiMo-layout checkpoint of the
sizes given here). One RL step's actor work is timed in two parts: the old log-probs (the
worker's ``infer_batch``; once per length, every round with ``--time-old-log-probs``) and the
actor update (the worker's ``train_mini_batch``: every
mini-batch of the step, each through megatron's schedule and ``optimizer.step``; with OCC the
first mini-batch is on-policy, and ``occ_scope=mini_batch`` adds its no-grad pre-pass).

All configurations are built once and run interleaved, round after round (the order rotates each
round), so machine noise hits them alike; the tables report medians. Peak memory: ``resident`` =
the engine's own tensors (bf16 weights, DDP gradient buffer, fp32 main weights and Adam states),
``step peak`` = the most bytes of tensors created during one update and alive at once
(verl_mtp.testing.memory, any device); ``peak`` = the two together. On CUDA also
``torch.cuda.max_memory_allocated`` over the update, less what was allocated before it, plus
``resident`` (comparable with ``peak``).

    python scripts/bench_mtp_step.py [--seq-lens 512,1024,2048] [--rounds 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from typing import NamedTuple, Optional

import torch

class Regime(NamedTuple):
    """One row of the tables: ExtendedMtpConfig settings and what it must reach against standalone CE."""

    settings: dict  # ExtendedMtpConfig keywords; ``chunk=0`` turns MTP logits chunking off
    time_vs_ce: Optional[float] = None  # update time target, x standalone CE, at the longest length
    peak_vs_ce: Optional[float] = None  # peak memory target, x standalone CE, at the longest length
    default: bool = True  # run without --configs


_OCC = dict(mtp_training_mode="standalone", mtp_loss_type="rl", mtp_coef_mode="occ")
# One line per regime. "no MTP" is every ratio's base and always runs; "standalone CE" is the base
# of the x std CE ratios and of the per-regime targets.
REGIMES = {
    "no MTP": Regime(dict(enable=False)),  # verl drops the checkpoint's MTP depths
    "standalone CE": Regime(dict(mtp_training_mode="standalone")),
    "standalone kl": Regime(dict(mtp_training_mode="standalone", mtp_drafter_loss="kl"), 1.10, 1.05),
    "standalone tv": Regime(dict(mtp_training_mode="standalone", mtp_drafter_loss="tv"), 1.10, 1.05),
    "joint CE": Regime(dict(mtp_training_mode="joint")),
    "rl fixed": Regime(dict(mtp_training_mode="standalone", mtp_loss_type="rl")),
    "rl+OCC": Regime(dict(occ_scope="micro_batch", **_OCC), 1.10),
    "rl+OCC mini_batch": Regime(dict(occ_scope="mini_batch", **_OCC), 1.10),
    "rl+OCC unchunked": Regime(dict(occ_scope="micro_batch", chunk=0, **_OCC), default=False),
    "decoupled tv": Regime(dict(mtp_training_mode="decoupled", mtp_loss_type="rl", mtp_coef_mode="occ",
                                mtp_drafter_loss="tv"), default=False),
}
CONFIG_NAMES = tuple(REGIMES)
DEFAULT_CONFIGS = tuple(name for name, regime in REGIMES.items() if regime.default)


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        lengths = []
    if not lengths or lengths[0] <= 0:
        raise argparse.ArgumentTypeError(f"--seq-lens={text!r}: expected comma-separated positive integers")
    return lengths


def parse_configs(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in CONFIG_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"--configs={text!r}: unknown {', '.join(map(repr, bad)) or 'empty list'}; valid: {', '.join(CONFIG_NAMES)}")
    if "no MTP" not in names:
        names.insert(0, "no MTP")  # every ratio is taken against it
    if "standalone CE" not in names and any(REGIMES[n].time_vs_ce or REGIMES[n].peak_vs_ce for n in names):
        names.insert(1, "standalone CE")  # the targets are taken against it
    return names


def mtp_configs(names: list[str], depths: int, chunk_tokens: int) -> dict:
    """ExtendedMtpConfig per regime name (built, so validated, here)."""
    from verl_mtp.config import ExtendedMtpConfig

    out = {}
    for name in names:
        settings = dict(REGIMES[name].settings)
        if settings.get("enable", True):
            settings = dict(enable=True, enable_train=True, mtp_logits_chunk_tokens=settings.pop("chunk", chunk_tokens),
                            **settings)
        out[name] = ExtendedMtpConfig(**settings)
    return out


def write_checkpoint(path: str, args, max_len: int) -> str:
    """A random MiMo checkpoint (Qwen2 trunk + ``args.depths`` MTP depths) of the benchmark's sizes."""
    from verl_mtp.testing import tiny_hf
    from verl_mtp.testing.real_engine import write_tiny_engine_checkpoint

    write_tiny_engine_checkpoint(path, mtp_depths=args.depths, vocab_size=args.vocab)  # tokenizer, config class
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(hidden_size=args.hidden, intermediate_size=args.ffn or 4 * args.hidden,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  max_position_embeddings=max_len)
    tensors = tiny_hf.random_tensors(config, seed=0)
    # init scale of a trained model's order, so bf16 activations stay in a sane range at any width
    tensors = {n: t if "norm" in n else t * (0.02 / 0.2) for n, t in tensors.items()}
    tiny_hf.write_checkpoint(path, config, tensors)
    return path


def resident_bytes(engine) -> int:
    """Bytes of the engine's own tensors: model weights, DDP param/grad buffers, optimizer shards and states."""
    found: list[torch.Tensor] = []

    def collect(obj, depth=0):
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif depth < 4 and isinstance(obj, dict):
            for value in obj.values():
                collect(value, depth + 1)
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for value in obj:
                collect(value, depth + 1)

    for chunk in engine.engine.module:
        found.extend(chunk.parameters())
        found.extend(p.main_grad for p in chunk.parameters() if getattr(p, "main_grad", None) is not None)
        for buffer in [*getattr(chunk, "buffers", []), *getattr(chunk, "expert_parallel_buffers", [])]:
            collect([getattr(buffer, "param_data", None), getattr(buffer, "grad_data", None)])
    optimizer = engine.engine.optimizer
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        collect(list(getattr(getattr(opt, "optimizer", None), "state", {}).values()))
        for name in ("shard_fp32_from_float16_groups", "shard_fp32_groups", "fp32_from_float16_groups"):
            collect(getattr(opt, name, None))
    storages = {}
    for tensor in found:
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


class Run:
    """One configuration's engine and its measurements at the current sequence length."""

    def __init__(self, name, engine, cuda: bool):
        self.name, self.engine, self.cuda = name, engine, cuda
        self.resident = resident_bytes(engine)
        self.infer_times: list[float] = []
        self.update_times: list[float] = []  # wall clock
        self.update_cpu_times: list[float] = []  # this process's CPU time
        self.step_peak = 0
        self.cuda_peak = None
        self.metrics: dict = {}

    def set_data(self, batch, advantages):
        self.batch, self.advantages = batch, advantages
        self.infer_times, self.update_times, self.update_cpu_times = [], [], []

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def infer(self):
        self._sync()
        start = time.perf_counter()
        self.old = self.engine.compute_log_prob(self.batch)["old_log_probs"]
        self._sync()
        return time.perf_counter() - start

    def update(self):
        self._sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        self.metrics = self.engine.update_actor(self.batch, self.old, self.advantages)
        self._sync()
        return time.perf_counter() - start, time.process_time() - start_cpu

    def measure_peak(self):
        from verl_mtp.testing.memory import peak_tensor_bytes

        if self.cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.update()
            self.cuda_peak = self.resident + torch.cuda.max_memory_allocated() - before
        self.step_peak = peak_tensor_bytes(self.update)

    @property
    def peak(self) -> int:
        return self.resident + self.step_peak


def sequences(args, seq_len: int):
    g = torch.Generator().manual_seed(seq_len)
    prompt_len = min(args.prompt_len, seq_len // 2)
    response_len = seq_len - prompt_len
    prompts = [torch.randint(3, args.vocab, (prompt_len,), generator=g) for _ in range(args.batch)]
    responses = [torch.randint(3, args.vocab, (response_len,), generator=g) for _ in range(args.batch)]
    advantages = torch.randn(args.batch, response_len, generator=g)
    return prompts, responses, advantages


def median(values):
    return statistics.median(values) if values else float("nan")


def update_time(run: Run, clock: str) -> float:
    return median(run.update_cpu_times if clock == "cpu" else run.update_times)


def print_length_table(seq_len: int, runs: dict, cuda: bool) -> None:
    base, ce = runs["no MTP"], runs.get("standalone CE")
    print(f"\nsequence length {seq_len}")
    header = f"{'config':<20}{'old lp s':>9}"
    clocks = ("wall",) if cuda else ("cpu", "wall")
    for clock in clocks:
        header += f"{'upd ' + clock + ' s':>12}{'x no MTP':>9}{'x std CE':>9}"
    header += f"{'resident':>10}{'step pk':>9}{'peak MiB':>10}{'x no MTP':>9}{'x std CE':>9}{'step pk x':>10}"
    if cuda:
        header += f"{'CUDA MiB':>10}{'x no MTP':>9}{'x std CE':>9}"
    print(header)
    nan = float("nan")
    for name, run in runs.items():
        line = f"{name:<20}{median(run.infer_times):>9.2f}"
        for clock in clocks:
            t = update_time(run, clock)
            ce_t = update_time(ce, clock) if ce else nan
            line += f"{t:>12.2f}{t / update_time(base, clock):>9.3f}{t / ce_t:>9.3f}"
        line += (f"{run.resident / 2**20:>10.1f}{run.step_peak / 2**20:>9.1f}{run.peak / 2**20:>10.1f}"
                 f"{run.peak / base.peak:>9.3f}{run.peak / ce.peak if ce else nan:>9.3f}"
                 f"{run.step_peak / base.step_peak:>10.3f}")
        if cuda:
            line += (f"{run.cuda_peak / 2**20:>10.1f}{run.cuda_peak / base.cuda_peak:>9.3f}"
                     f"{run.cuda_peak / ce.cuda_peak if ce else nan:>9.3f}")
        print(line, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=parse_lengths, default=parse_lengths("512,1024,2048"),
                        help="prompt + response lengths, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per length (median)")
    parser.add_argument("--depths", type=int, default=1, help="MTP depths of the checkpoint")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--mini-batch", type=int, default=1, help="ppo_mini_batch_size (sequences per optimizer step)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (training)")
    parser.add_argument("--infer-micro-batch", type=int, default=1, help="sequences per micro-batch (old log-probs)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=0, help="MLP width (0 = 4 x hidden)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8, help="trunk layers")
    parser.add_argument("--chunk-tokens", type=int, default=512,
                        help="mtp_logits_chunk_tokens of the MTP configs (the config default is 2048)")
    parser.add_argument("--configs", type=parse_configs, default=list(DEFAULT_CONFIGS),
                        help=f"comma-separated, from: {', '.join(CONFIG_NAMES)} (default: all but the unchunked one; "
                             "no MTP, and standalone CE where a target needs it, are added)")
    parser.add_argument("--time-old-log-probs", action="store_true",
                        help="time infer_batch in every round too (default: once per length, before the rounds)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: 1 with --device cpu, where the CPU time per update is the "
                             "least noisy figure on a shared machine; torch's default with cuda)")
    args = parser.parse_args(argv)
    for key in ("rounds", "depths", "batch", "mini_batch", "micro_batch", "infer_micro_batch", "vocab", "hidden",
                "heads", "layers"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')}={getattr(args, key)}: must be >= 1")
    if args.batch % args.mini_batch or args.mini_batch % args.micro_batch:
        parser.error(f"--batch={args.batch}, --mini-batch={args.mini_batch}, --micro-batch={args.micro_batch}: "
                     "each must divide the one before")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda: torch sees no CUDA device (valid choices: cpu, cuda)")

    import verl  # noqa: F401 - activates the plugin, as in every verl process

    from verl_mtp.testing import real_engine
    from verl_mtp.testing.real_engine import init_engine_process_group

    cuda = args.device == "cuda"
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    init_engine_process_group(args.device)
    configs = mtp_configs(args.configs, args.depths, args.chunk_tokens)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"verl MegatronEngineWithLMHead, bf16; MiMo layout: hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads, vocab {args.vocab}, {args.depths} MTP depth(s); {args.batch} sequences per step, "
          f"mini-batches of {args.mini_batch}, micro-batches of {args.micro_batch} (old log-probs: "
          f"{args.infer_micro_batch}); MTP logits chunks of {args.chunk_tokens} tokens; {args.rounds} interleaved "
          f"rounds; {device}", flush=True)

    with tempfile.TemporaryDirectory() as tmp, real_engine.engine_device(args.device):
        checkpoint = write_checkpoint(tmp, args, max(args.seq_lens))
        runs = {}
        for name, mtp in configs.items():
            engine = real_engine.RealEngine.build(
                checkpoint, mtp, micro_batch_size=args.micro_batch, infer_micro_batch_size=args.infer_micro_batch,
                mini_batch_size=args.mini_batch, lr=1e-5, clip_grad=1.0,
            )
            runs[name] = Run(name, engine, cuda)
        results = {}
        try:
            for index, seq_len in enumerate(args.seq_lens):
                prompts, responses, advantages = sequences(args, seq_len)
                batch = real_engine.rollout_batch(prompts, responses)
                for run in runs.values():
                    run.set_data(batch, advantages)
                    if index == 0:  # warm-up: one-time setup out of the timings, optimizer states made
                        run.infer()
                        run.update()
                    run.infer_times.append(run.infer())  # timed once: the rounds time the updates
                    run.measure_peak()
                order = list(runs.values())
                for round_index in range(args.rounds):
                    shift = round_index % len(order)
                    for run in order[shift:] + order[:shift]:
                        if args.time_old_log_probs:
                            run.infer_times.append(run.infer())
                        wall, cpu = run.update()
                        run.update_times.append(wall)
                        run.update_cpu_times.append(cpu)
                print_length_table(seq_len, runs, cuda)
                results[seq_len] = {
                    name: dict(update=median(r.update_times), update_cpu=median(r.update_cpu_times),
                               infer=median(r.infer_times), peak=r.peak,
                               step_peak=r.step_peak, cuda_peak=r.cuda_peak)
                    for name, r in runs.items()
                }
        finally:
            for run in runs.values():
                run.engine.close()

    summarize(args, results)
    return results


def summarize(args, results: dict) -> None:
    names = list(next(iter(results.values())))
    if len(args.seq_lens) > 1:
        first, last = args.seq_lens[0], args.seq_lens[-1]
        print(f"\ngrowth of the step peak from {first} to {last} tokens: exponent p in step peak ~ length^p "
              f"(1 = linear), and MiB added per 1k tokens")
        print(f"{'config':<20}{'p':>7}{'MiB/1k tok':>12}{'x no MTP':>10}")
        base_slope = None
        for name in names:
            lo, hi = results[first][name]["step_peak"], results[last][name]["step_peak"]
            exponent = math.log(hi / lo) / math.log(last / first)
            slope = (hi - lo) / 2**20 / ((last - first) / 1000)
            base_slope = slope if base_slope is None else base_slope
            print(f"{name:<20}{exponent:>7.2f}{slope:>12.1f}{slope / base_slope:>10.3f}")

    longest = args.seq_lens[-1]
    last = results[longest]
    mtp = [n for n in names if n != "no MTP" and "unchunked" not in n]
    lines = []
    if mtp:
        worst = max(mtp, key=lambda n: last[n]["peak"])
        ratio = last[worst]["peak"] / last["no MTP"]["peak"]
        step_ratio = last[worst]["step_peak"] / last["no MTP"]["step_peak"]
        verdict = "met" if ratio <= 1.15 else "MISSED"
        lines.append(f"worst MTP peak ({worst}) = {ratio:.3f}x no MTP (target <= 1.15: {verdict}); "
                     f"step peak alone {step_ratio:.3f}x")
        if last["no MTP"]["cuda_peak"] is not None:
            worst_cuda = max(mtp, key=lambda n: last[n]["cuda_peak"])
            lines.append(f"worst CUDA peak ({worst_cuda}) = "
                         f"{last[worst_cuda]['cuda_peak'] / last['no MTP']['cuda_peak']:.3f}x no MTP")
    ce = last.get("standalone CE")
    for name in names if ce is not None else []:
        regime = REGIMES[name]
        if regime.time_vs_ce is not None:
            for clock, key in (("CPU time", "update_cpu"), ("wall time", "update")):
                if clock == "CPU time" and args.device == "cuda":
                    continue
                ratio = last[name][key] / ce[key]
                verdict = "met" if ratio <= regime.time_vs_ce else "MISSED"
                lines.append(f"{name} update = {ratio:.3f}x standalone CE by {clock} "
                             f"(target <= {regime.time_vs_ce:.2f}: {verdict})")
        if regime.peak_vs_ce is not None:
            peaks = [("peak", "peak")] + ([("CUDA peak", "cuda_peak")] if ce["cuda_peak"] is not None else [])
            for label, key in peaks:
                ratio = last[name][key] / ce[key]
                verdict = "met" if ratio <= regime.peak_vs_ce else "MISSED"
                lines.append(f"{name} {label} = {ratio:.3f}x standalone CE "
                             f"(target <= {regime.peak_vs_ce:.2f}: {verdict}); step peak alone "
                             f"{last[name]['step_peak'] / ce['step_peak']:.3f}x")
    print(f"\ntargets at {longest} tokens:")
    for line in lines:
        print(f"  {line}")


if __name__ == "__main__":
    main()
