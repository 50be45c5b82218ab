"""``verl-mtp demo``: the MTP regimes side by side on a small RL-from-verifiable-rewards task, on CPU.

What is real: a megatron-core GPTModel with one MTP depth (``verl_mtp.local_megatron.tiny_gpt``),
prepared by verl's ``patch_engine_mtp`` with verl-mtp's patches; rollouts sampled from it; GRPO
advantages from verl's ``core_algos``; updates through verl's ``BaseEngine.train_batch``, verl's
Megatron engine forward and the installed actor loss (verl's ``ppo_loss`` + verl-mtp's MTP term).
What is not: the Megatron engine's CUDA-only parts (optimizer wrapper, DDP) are replaced by
``CpuStandInEngine`` (Adam here), there is no inference engine (sampling is a plain loop over the
model, whose log-probs serve as the old log-probs, as an engine's rollout log-probs can in verl),
and the task is a toy.

The task: a prompt is ``BOS a a+d a+2d a+3d`` (digits, mod 10) and the response should continue
the pattern for ``RESPONSE_LEN`` digits; the reward is the fraction of digits right. Every regime
starts from the same warmed-up weights (a short supervised phase trains the trunk and the MTP
head, so rewards are not all zero) and sees the same prompts and sampling seeds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

from verl_mtp.errors import VerlMtpError, invalid_value

# torch, verl and megatron are imported inside the functions that use them: `verl-mtp --help`
# imports this module for the regime names and must stay fast.

BOS = 10
VOCAB = 16  # digits 0-9, BOS, unused ids (sampled like any token; a non-digit is simply wrong)
PROMPT_DIGITS = 4
PROMPT_LEN = 1 + PROMPT_DIGITS
RESPONSE_LEN = 6

REGIME_LABELS = {
    "none": "no MTP head (reference)",
    "disabled": "disabled (head frozen)",
    "standalone": "standalone CE",
    "joint": "joint CE",
    "rl": "rl, fixed lambda",
    "rl_occ": "rl + OCC",
    "standalone_kl": "standalone KL",
    "standalone_tv": "standalone TV",
    "decoupled_occ_tv": "decoupled rl+OCC, TV head",
}
REGIMES = tuple(REGIME_LABELS)
DEFAULT_REGIMES = (
    "disabled", "standalone", "joint", "rl", "rl_occ", "standalone_kl", "standalone_tv", "decoupled_occ_tv",
)


class DemoOptionsError(VerlMtpError, ValueError):
    """A bad demo option (the CLI prints it and exits 2)."""


class DemoRunError(VerlMtpError, RuntimeError):
    """The demo's model did not behave as the demo builds it (a bug, not a bad option)."""


def regime_config(name: str, coef: float = 0.1):
    """The ExtendedMtpConfig of a demo regime (the same keys a real run sets)."""
    from verl_mtp.config import ExtendedMtpConfig

    if name == "none":  # the model is built without an MTP head at all
        return ExtendedMtpConfig()
    if name == "disabled":  # verl loads the head but never trains it
        return ExtendedMtpConfig(enable=True, mtp_training_mode="disabled")
    if name in ("standalone", "joint"):
        return ExtendedMtpConfig(mtp_training_mode=name, mtp_loss_scaling_factor=coef)
    if name == "rl":
        return ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl", mtp_loss_scaling_factor=coef)
    if name == "rl_occ":
        return ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ")
    if name in ("standalone_kl", "standalone_tv"):  # the head alone, toward the policy's distribution
        return ExtendedMtpConfig(
            mtp_training_mode="standalone", mtp_drafter_loss=name.rsplit("_", 1)[1], mtp_loss_scaling_factor=coef
        )
    if name == "decoupled_occ_tv":  # OCC's lambda * the rl term on the shared parameters, TV on the MTP module
        return ExtendedMtpConfig(
            mtp_training_mode="decoupled", mtp_loss_type="rl", mtp_coef_mode="occ", mtp_drafter_loss="tv",
            mtp_loss_scaling_factor=coef,
        )
    raise DemoOptionsError(f"unknown demo regime {name!r}; valid choices are {', '.join(REGIMES)}")


@dataclass
class DemoOptions:
    steps: int = 50
    regimes: tuple = DEFAULT_REGIMES
    seed: int = 0
    out_dir: str = "verl_mtp_demo"
    prompts_per_step: int = 8
    samples_per_prompt: int = 8  # GRPO group size
    mini_batches: int = 2  # updates per step; OCC's lambda is measured off-policy from the second on
    micro_batch_size: int = 32
    lr: float = 1e-3  # RL updates (Adam)
    warmup_steps: int = 20  # leaves the policy at about half the reward: room for RL to improve
    warmup_lr: float = 3e-3
    temperature: float = 1.0
    coef: float = 0.1  # lambda of the fixed-coefficient regimes
    figure: bool = True
    progress: Optional[Callable[[str], None]] = print

    def __post_init__(self):
        self.regimes = tuple(self.regimes)
        if not self.regimes:
            raise DemoOptionsError(
                f"--regimes names no regime; valid choices are {', '.join(REGIMES)} (comma-separated)"
            )
        bad = [r for r in self.regimes if r not in REGIMES]
        if bad:
            raise DemoOptionsError(
                f"unknown demo regime(s) {', '.join(bad)}; valid choices are {', '.join(REGIMES)}"
            )
        repeated = sorted({r for r in self.regimes if self.regimes.count(r) > 1})
        if repeated:
            raise DemoOptionsError(f"--regimes names {', '.join(repeated)} more than once; each regime runs once")
        for key in ("steps", "prompts_per_step", "samples_per_prompt", "mini_batches", "micro_batch_size"):
            if getattr(self, key) < 1:
                flag = f"--{key.replace('_', '-')}"
                raise DemoOptionsError(invalid_value(flag, getattr(self, key), "expected >= 1"))
        if self.warmup_steps < 0:
            raise DemoOptionsError(invalid_value("--warmup-steps", self.warmup_steps, "expected >= 0"))
        if self.figure and importlib.util.find_spec("matplotlib") is None:
            raise DemoOptionsError(
                "the figure needs matplotlib, which is not installed: reinstall verl-mtp "
                "(it depends on matplotlib) or pass --no-figure"
            )
        if (self.prompts_per_step * self.samples_per_prompt) % self.mini_batches:
            raise DemoOptionsError(
                f"{self.prompts_per_step * self.samples_per_prompt} rollouts per step do not split into "
                f"{self.mini_batches} mini-batches"
            )


@dataclass
class RegimeResult:
    name: str
    steps: list = field(default_factory=list)  # one dict of metrics per step
    state: dict = field(default_factory=dict)  # final parameters
    seconds: float = 0.0


# --- task ------------------------------------------------------------------------------------


def sample_prompts(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [n, PROMPT_LEN] and the correct continuations [n, RESPONSE_LEN]."""
    import torch

    start = torch.randint(0, 10, (n, 1), generator=generator)
    step = torch.randint(1, 4, (n, 1), generator=generator)
    digits = (start + step * torch.arange(PROMPT_DIGITS + RESPONSE_LEN)) % 10
    prompts = torch.cat([torch.full((n, 1), BOS), digits[:, :PROMPT_DIGITS]], dim=1)
    return prompts, digits[:, PROMPT_DIGITS:]


def reward(responses: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """The verifiable reward: fraction of response digits equal to the pattern's."""
    return (responses == answers).float().mean(dim=1)


# --- model -----------------------------------------------------------------------------------


def model_spec(with_head: bool = True):
    from verl_mtp.local_megatron.tiny_gpt import TinyGPTSpec

    return TinyGPTSpec(
        vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
        max_sequence_length=PROMPT_LEN + RESPONSE_LEN, mtp_num_layers=1 if with_head else 0, seed=1234,
    )


def build_model(mtp, with_head: bool = True):
    from verl_mtp.local_megatron import engine_step

    with _quiet_model_build():
        return engine_step.build_engine_model(mtp, model_spec(with_head))


@contextlib.contextmanager
def _quiet_model_build():
    """Swallow what verl prints while it prepares a model for MTP.

    verl 0.9.1's ``patch_engine_mtp`` prints the whole module tree and its MTP patches print a line
    each (plain ``print``); in a real run that is once per worker, here once per regime. Only stdout
    is captured, and only around the build: errors still raise.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its "Applying mtp patch..." warning, once per model
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def generate(model, prompts: torch.Tensor, temperature: float, generator: torch.Generator):
    """Sample RESPONSE_LEN tokens per prompt (a plain loop: no KV cache, the sequences are tiny).

    Returns the responses [n, RESPONSE_LEN] and the sampler's log-probs of the sampled tokens
    [n, RESPONSE_LEN], as an inference engine returns them with its rollouts.
    """
    import torch

    from verl_mtp.local_megatron.single_process import cpu_megatron

    model.eval()
    tokens = prompts
    log_probs = []
    with cpu_megatron(), torch.no_grad():
        for _ in range(RESPONSE_LEN):
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            logits = model(input_ids=tokens, position_ids=positions)[:, -1].float()
            scaled = torch.log_softmax(logits / temperature, dim=-1)
            sampled = torch.multinomial(scaled.exp(), 1, generator=generator)
            log_probs.append(scaled.gather(-1, sampled))
            tokens = torch.cat([tokens, sampled], dim=1)
    model.train()
    return tokens[:, prompts.shape[1]:], torch.cat(log_probs, dim=1)


HEAD_METRICS = ("mtp_ce", "draft_agreement", "accept_greedy", "accept_probabilistic")


def mtp_head_on_rollouts(model, prompts: torch.Tensor, responses: torch.Tensor, temperature: float = 1.0) -> dict:
    """The depth-1 head on the step's own rollouts, measured the same way for every regime
    (``disabled`` included), before the step's update; only response tokens count.

    - ``mtp_ce``, ``draft_agreement``: the head's cross-entropy and argmax agreement with the sampled
      token, over every response token (hidden position t predicts token t+2).
    - ``accept_greedy``, ``accept_probabilistic``: speculative sampling's acceptance of the head's
      drafts verified at ``temperature``, as ``accept-eval`` computes it (its functions): greedy
      drafts p(argmax q), probabilistic drafts sum_v min(p, q) = 1 - TV(p, q), where p is the
      policy's distribution at the drafted token's position and q the head's, both at
      ``temperature``. The anchors are those of a speculative rollout (accept-eval's): the draft of
      every response token after the first (the first comes from the prompt's forward).
    """
    import torch

    if getattr(model, "mtp", None) is None:
        return dict.fromkeys(HEAD_METRICS)
    with torch.no_grad():
        return _score_head(model, prompts, responses, temperature)


def _score_head(model, prompts, responses, temperature) -> dict:
    import torch

    from verl_mtp.local_megatron.single_process import cpu_megatron
    from verl_mtp.megatron.mtp_forward import score_mtp_without_grad
    from verl_mtp.tools.accept_eval.acceptance import argmax_draft_acceptance, sampled_acceptance

    tokens = torch.cat([prompts, responses], dim=1)
    captured = {}
    hook = model.mtp.register_forward_hook(lambda module, args, output: captured.__setitem__("hidden", output))
    try:
        model.eval()
        labels = torch.roll(tokens, -1, dims=1)
        with cpu_megatron(), score_mtp_without_grad():
            model(
                input_ids=tokens, position_ids=torch.arange(tokens.shape[1]).expand_as(tokens),
                labels=labels, loss_mask=torch.ones_like(labels, dtype=torch.float32),
            )
    finally:
        hook.remove()
        model.train()
    if "hidden" not in captured:
        raise DemoRunError("the model's forward did not run its MTP block; cannot measure the head")
    # megatron's MTP block returns [main; depth 1] stacked on the sequence dim, each [s, b, h]
    # (the main part after the final norm, as the output layer takes it)
    with cpu_megatron():
        logits, _ = model.output_layer(captured["hidden"])
    main_logits, draft_logits = (part.float().transpose(0, 1) for part in torch.chunk(logits, 2, dim=0))  # [b, s, V]
    log_probs = torch.log_softmax(draft_logits, dim=-1)
    first = PROMPT_LEN - 2  # hidden position whose depth-1 target is the first response token
    targets = tokens[:, PROMPT_LEN:]
    scored = log_probs[:, first : first + RESPONSE_LEN]
    nll = -scored.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    agree = scored.argmax(-1) == targets
    # Anchor i (PROMPT_LEN-1 .. end-3) drafts token i+2 from hidden i; the policy's distribution
    # for that token is the main head's at position i+1.
    anchors = slice(PROMPT_LEN - 1, tokens.shape[1] - 2)
    q = draft_logits[:, anchors].reshape(-1, VOCAB)
    p = main_logits[:, anchors.start + 1 : anchors.stop + 1].reshape(-1, VOCAB)
    return {
        "mtp_ce": nll.mean().item(),
        "draft_agreement": agree.float().mean().item(),
        "accept_greedy": argmax_draft_acceptance(p, q, temperature).mean().item(),
        "accept_probabilistic": sampled_acceptance(p, q, temperature).mean().item(),
    }


def warm_up(options: DemoOptions) -> dict:
    """A short supervised phase (trunk + MTP head, cross-entropy), shared by every regime."""
    import torch

    from verl_mtp.local_megatron.single_process import cpu_megatron

    model = build_model(regime_config("joint"))
    optimizer = torch.optim.Adam(model.parameters(), lr=options.warmup_lr)
    generator = torch.Generator().manual_seed(options.seed + 10_000)
    for _ in range(options.warmup_steps):
        prompts, answers = sample_prompts(64, generator)
        tokens = torch.cat([prompts, answers], dim=1)
        labels = torch.roll(tokens, -1, dims=1)
        loss_mask = torch.zeros_like(labels, dtype=torch.float32)
        loss_mask[:, PROMPT_LEN - 1 : -1] = 1.0  # predict the answer digits only
        with cpu_megatron():
            logits = model(
                input_ids=tokens, position_ids=torch.arange(tokens.shape[1]).expand_as(tokens),
                labels=labels, loss_mask=loss_mask,
            )  # the MTP cross-entropy rides on the hidden states (MTPLossAutoScaler)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
        loss = (ce * loss_mask.reshape(-1)).sum() / loss_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return parameters_of(model)


def parameters_of(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def load_parameters(model, parameters: dict) -> None:
    """Copy ``parameters`` into ``model``; a model without an MTP head takes all but the head's."""
    import torch

    own = dict(model.named_parameters())
    missing = set(own) - set(parameters)
    unused = {n for n in set(parameters) - set(own) if not (n.startswith("mtp.") and getattr(model, "mtp", None) is None)}
    if missing or unused:
        raise DemoRunError(f"parameter names differ: {sorted(missing | unused)}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(parameters[name])


# --- one regime ------------------------------------------------------------------------------


def engine_log_probs(model, prompts, responses, temperature) -> list[torch.Tensor]:
    """Log-probs of the sampled tokens from verl's engine forward (no grad, no MTP).

    What verl's actor recomputes as old log-probs; the demo takes the sampler's instead (equal up
    to rounding, which a test checks), as that forward over every rollout costs a third of a step.
    """
    import torch

    from verl_mtp.local_megatron import engine_step

    with torch.no_grad():
        out = engine_step.engine_forward(
            model, list(prompts), list(responses), temperature, mtp_enable_train=False
        )
    start = PROMPT_LEN - 1  # main-head position that scores the first response token
    return [seq[start : start + RESPONSE_LEN].clone() for seq in out["log_probs"].unbind()]


def _grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    import numpy as np
    import torch
    from verl.trainer.ppo import core_algos

    n = rewards.shape[0]
    token_rewards = torch.zeros(n, RESPONSE_LEN)
    token_rewards[:, -1] = rewards  # outcome reward on the last token
    index = np.array([i // group_size for i in range(n)])
    advantages, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=token_rewards, response_mask=torch.ones(n, RESPONSE_LEN), index=index
    )
    return advantages


def _scalar(value):
    """A float from a metric value (verl's loss returns plain numbers, tensors or its Metric)."""
    if value is None:
        return None
    if hasattr(value, "aggregate"):
        value = value.aggregate()
    return float(value)


def _mean(values):
    values = [_scalar(v) for v in values]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def run_regime(name: str, initial_state: dict, options: DemoOptions) -> RegimeResult:
    import torch
    import verl.workers.engine_workers as engine_workers

    from verl_mtp.local_megatron import engine_step
    from verl_mtp.loss import actor_update_step

    mtp = regime_config(name, options.coef)
    model = build_model(mtp, with_head=name != "none")
    load_parameters(model, initial_state)
    engine = engine_step.CpuStandInEngine(
        model, micro_batch_size=options.micro_batch_size, lr=options.lr, temperature=options.temperature,
        mtp_enable_train=mtp.enable_train, optimizer="adam",
    )
    loss_function = partial(engine_workers.ppo_loss, config=engine_step.actor_config(mtp))
    # Same prompts and sampling randomness for every regime.
    prompt_gen = torch.Generator().manual_seed(options.seed)
    sample_gen = torch.Generator().manual_seed(options.seed + 1)
    result = RegimeResult(name)
    started = time.perf_counter()
    group = options.samples_per_prompt
    for step in range(1, options.steps + 1):  # counted from 1 in the progress lines, metrics.jsonl and the figure
        prompts, answers = sample_prompts(options.prompts_per_step, prompt_gen)
        prompts, answers = prompts.repeat_interleave(group, 0), answers.repeat_interleave(group, 0)
        responses, sampled_log_probs = generate(model, prompts, options.temperature, sample_gen)
        rewards = reward(responses, answers)
        head = mtp_head_on_rollouts(model, prompts, responses, options.temperature)
        old = list(sampled_log_probs.unbind())
        advantages = _grpo_advantages(rewards, group)
        n = prompts.shape[0]
        size = n // options.mini_batches
        engine.micro_batch_metrics.clear()
        with actor_update_step(loss_function):  # as verl's mini-batch loop: OCC knows the on-policy one
            for start in range(0, n, size):
                part = slice(start, start + size)
                data = {
                    "prompts": list(prompts[part]), "responses": list(responses[part]),
                    "old_log_probs": old[part], "advantages": list(advantages[part]),
                }
                engine.train_batch(data, loss_function)
        metrics = engine.micro_batch_metrics
        if mtp.mtp_loss_type == "rl":
            coef = _mean([m.get("actor/mtp_1/coef") for m in metrics])
        else:
            coef = mtp.mtp_loss_scaling_factor if mtp.is_training else 0.0
        record = {
            "step": step,
            "regime": name,
            "reward": rewards.mean().item(),
            "mtp_ce": head["mtp_ce"],
            "draft_agreement": head["draft_agreement"],
            "accept_greedy": head["accept_greedy"],
            "accept_probabilistic": head["accept_probabilistic"],
            "coef": coef,
            "mtp_pg_loss": _mean([m.get("actor/mtp_1/pg_loss") for m in metrics]),
            "pg_loss": _mean([m.get("actor/pg_loss") for m in metrics]),
        }
        result.steps.append(record)
        if options.progress:
            head_text = "no MTP head"
            if head["mtp_ce"] is not None:
                head_text = (
                    f"MTP CE {head['mtp_ce']:.3f}  agreement {head['draft_agreement']:.3f}  "
                    f"accept greedy {head['accept_greedy']:.3f} prob {head['accept_probabilistic']:.3f}  "
                    f"lambda {coef:.3g}"
                )
            options.progress(f"[{name:<16}] step {step:>3}/{options.steps}  reward {record['reward']:.3f}  {head_text}")
    result.seconds = time.perf_counter() - started
    result.state = parameters_of(model)
    return result


# --- outputs ---------------------------------------------------------------------------------


def summary_rows(results: dict, last: int = 5) -> list[dict]:
    rows = []
    for name, result in results.items():
        tail = result.steps[-last:]
        rows.append({
            "regime": REGIME_LABELS[name],
            "reward_first": result.steps[0]["reward"],
            "reward_last": _mean([s["reward"] for s in tail]),
            "mtp_ce_last": _mean([s["mtp_ce"] for s in tail]),
            "agreement_first": result.steps[0]["draft_agreement"],
            "agreement_last": _mean([s["draft_agreement"] for s in tail]),
            "accept_greedy_last": _mean([s["accept_greedy"] for s in tail]),
            "accept_probabilistic_last": _mean([s["accept_probabilistic"] for s in tail]),
            "coef_mean": _mean([s["coef"] for s in result.steps]),
            "seconds": result.seconds,
        })
    return rows


def format_summary(rows: list[dict], last: int = 5) -> str:
    columns = [  # (key, title, width, format)
        ("reward_first", "reward 1st", 11, ".3f"), ("reward_last", f"last {last}", 9, ".3f"),
        ("mtp_ce_last", "MTP CE", 9, ".3f"), ("agreement_first", "agree 1st", 10, ".3f"),
        ("agreement_last", f"last {last}", 9, ".3f"), ("accept_greedy_last", "acc greedy", 11, ".3f"),
        ("accept_probabilistic_last", "acc prob", 9, ".3f"), ("coef_mean", "mean lambda", 12, ".3g"),
        ("seconds", "time s", 8, ".1f"),
    ]
    header = f"{'regime':<26}" + "".join(f"{title:>{width}}" for _, title, width, _ in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = "".join(
            f"{'-' if row[key] is None else format(row[key], fmt):>{width}}" for key, _, width, fmt in columns
        )
        lines.append(f"{row['regime']:<26}{cells}")
    return "\n".join(lines)


# Regimes often coincide (three share lambda = 0.1; the first steps are identical by design): each
# has its own colour, dash pattern and marker, and wider lines are drawn first, so a line drawn on
# top of another leaves the one below visible at its edges.
LINE_STYLES = {
    "none": ("0.35", (0, (1, 1)), "x"),
    "disabled": ("tab:blue", "-", "o"),
    "standalone": ("tab:orange", (0, (6, 3)), "s"),
    "joint": ("tab:green", (0, (3, 2, 1, 2)), "^"),
    "rl": ("tab:red", (0, (1, 2)), "v"),
    "rl_occ": ("tab:purple", (0, (8, 2, 1, 2, 1, 2)), "D"),
    "standalone_kl": ("tab:brown", (0, (4, 1, 4, 4)), "P"),
    "standalone_tv": ("tab:olive", (0, (2, 1)), "X"),
    "decoupled_occ_tv": ("tab:cyan", (0, (10, 3)), "*"),
}


def _line_style(name: str, index: int, points: int) -> dict:
    color, dashes, marker = LINE_STYLES[name]
    every = max(1, points // 8)
    return {
        "color": color, "linestyle": dashes, "marker": marker, "markersize": 5, "fillstyle": "none",
        "linewidth": 3.6 - 2.8 * index / (len(LINE_STYLES) - 1), "zorder": 2 + index,
        # markers of different regimes on different steps, so coinciding lines each show theirs
        "markevery": (min(index * max(1, every // len(LINE_STYLES)), points - 1), every),
    }


def write_figure(results: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    fig = build_figure(results)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_figure(results: dict):
    """The demo's 3x2 figure (a matplotlib Figure; the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [  # (metric, title, y label)
        ("reward", "reward on the step's rollouts", "reward (fraction of digits right)"),
        ("draft_agreement", "draft agreement (depth-1 argmax = sampled token)", "agreement (fraction of tokens)"),
        ("accept_greedy", "acceptance, greedy drafts: p(argmax q)", "acceptance probability"),
        ("accept_probabilistic", "acceptance, probabilistic drafts: sum min(p, q)", "acceptance probability"),
        ("mtp_ce", "MTP head cross-entropy on the rollouts", "cross-entropy (nats/token)"),
        ("coef", "MTP coefficient lambda", "lambda"),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(11, 10.5))
    for ax, (key, title, ylabel) in zip(axes.flat, panels):
        for index, (name, result) in enumerate(results.items()):
            values = [math.nan if s[key] is None else s[key] for s in result.steps]
            ax.plot([s["step"] for s in result.steps], values, label=REGIME_LABELS[name],
                    **_line_style(name, index, len(result.steps)))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        "verl-mtp demo: MTP regimes on a toy verifiable-reward task (CPU); acceptance at the rollout "
        "temperature on the step's rollouts", fontsize=11,
    )
    fig.tight_layout()
    return fig


@contextlib.contextmanager
def _demo_runtime():
    """What the demo changes in its process while it runs, restored afterwards.

    - One torch thread: every op works on a few thousand numbers, where a second intra-op thread
      costs more in synchronisation than it saves (and on a busy machine its spinning multiplies
      the CPU time several-fold).
    - torch.compile off (eager): verl compiles its entropy kernel, and on CPU each compilation
      (two per shape) costs longer than the whole demo spends in that function.
    - Library chatter is dropped, so that the output is the progress lines and the table: the
      warnings of verl and megatron-core about optional packages a CPU run does not have
      (TransformerEngine, Apex, other verl engines) and log records below ERROR (verl's platform
      notes and "Applying mtp patch...", torch's fx note). Errors still show and still raise.
    """
    import torch

    threads = torch.get_num_threads()
    disabled = logging.root.manager.disable
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), torch.compiler.set_stance("force_eager"):
            for module in (r"megatron\.", r"verl\.workers\.engine", r"transformers\."):
                warnings.filterwarnings("ignore", category=UserWarning, module=module)
                warnings.filterwarnings("ignore", category=FutureWarning, module=module)
            import verl  # noqa: F401 - activates the plugin, as in a real run
            import verl.workers.engine_workers  # noqa: F401 - imported here, under the filters

            yield
    finally:
        torch.set_num_threads(threads)
        logging.disable(disabled)


def run_demo(options: DemoOptions) -> dict:
    """Run every regime of ``options``; write metrics.jsonl, summary.json and demo.png to out_dir."""
    with _demo_runtime():
        return _run_demo(options)


def _run_demo(options: DemoOptions) -> dict:
    import torch

    torch.manual_seed(options.seed)
    os.makedirs(options.out_dir, exist_ok=True)
    say = options.progress or (lambda _: None)
    say(f"warm-up: {options.warmup_steps} supervised steps (trunk + MTP head), shared by every regime")
    initial = warm_up(options)
    results = {}
    metrics_path = os.path.join(options.out_dir, "metrics.jsonl")
    with open(metrics_path, "w") as metrics_file:
        for name in options.regimes:
            results[name] = run_regime(name, initial, options)
            for record in results[name].steps:
                metrics_file.write(json.dumps(record) + "\n")
    rows = summary_rows(results)
    with open(os.path.join(options.out_dir, "summary.json"), "w") as f:
        json.dump(rows, f, indent=2)
    figure = None
    if options.figure:
        figure = os.path.join(options.out_dir, "demo.png")
        write_figure(results, figure)
    say("\n" + format_summary(rows))
    say(f"\nmetrics: {metrics_path}" + (f"\nfigure:  {figure}" if figure else ""))
    return {"results": results, "rows": rows, "metrics": metrics_path, "figure": figure, "initial_state": initial}
