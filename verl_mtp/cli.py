"""The ``verl-mtp`` command."""

from __future__ import annotations

import argparse
import sys


def _explain(args: argparse.Namespace) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from verl_mtp.config import MtpConfigError
    from verl_mtp.explain import build_plan, compose_run_config, plan_as_json, render_plan

    try:
        config = compose_run_config(args.overrides, config_name=args.config_name)
        plan = build_plan(config)
    except MtpConfigError as exc:
        print(f"verl-mtp: invalid MTP config: {exc}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"verl-mtp: the overrides do not compose: {exc}", file=sys.stderr)
        return 2
    print(plan_as_json(plan) if args.json else render_plan(plan), end="" if not args.json else "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from verl_mtp.demo import DemoOptions, run_demo

    try:
        options = DemoOptions(
            steps=args.steps, regimes=tuple(r for r in args.regimes.split(",") if r), seed=args.seed,
            out_dir=args.out, warmup_steps=args.warmup_steps, figure=not args.no_figure,
        )
    except ValueError as exc:
        print(f"verl-mtp demo: {exc}", file=sys.stderr)
        return 2
    run_demo(options)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from verl_mtp.explain import WRAPPER_CONFIG_NAME

    parser = argparse.ArgumentParser(prog="verl-mtp", description="Multi-Token-Prediction for RL with verl.")
    sub = parser.add_subparsers(dest="command", required=True)
    explain = sub.add_parser(
        "explain",
        help="validate a run's MTP settings and print the resolved plan",
        description="Compose verl's Megatron PPO config with the given Hydra overrides (as passed to "
        "`python -m verl.trainer.main_ppo`), validate the MTP settings and print what the run will do.",
    )
    explain.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. actor_rollout_ref.model.mtp.enable=True")
    explain.add_argument(
        "--config-name",
        default=WRAPPER_CONFIG_NAME,
        help=f"primary config: {WRAPPER_CONFIG_NAME} (verl-mtp's wrapper, default) or one of verl's, "
        "e.g. ppo_megatron_trainer (then new keys need '+')",
    )
    explain.add_argument("--json", action="store_true", help="print the plan as JSON")
    explain.set_defaults(func=_explain)

    from verl_mtp.demo import DEFAULT_REGIMES, REGIMES

    demo = sub.add_parser(
        "demo",
        help="run the MTP regimes side by side on a small CPU RL task",
        description="A tiny megatron-core GPT with an MTP head learns to continue digit patterns with "
        "GRPO (verl's advantages, verl's actor loss with verl-mtp's MTP term), once per MTP regime, "
        "from the same warmed-up weights and seeds. Writes metrics.jsonl, summary.json and demo.png.",
    )
    demo.add_argument("--steps", type=int, default=30, help="RL steps per regime (default 30)")
    demo.add_argument(
        "--regimes", default=",".join(DEFAULT_REGIMES),
        help=f"comma-separated, from {', '.join(REGIMES)} (none = a model without MTP head, for reference)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="verl_mtp_demo", help="output directory (default ./verl_mtp_demo)")
    demo.add_argument("--warmup-steps", type=int, default=20, help="supervised warm-up steps (default 20)")
    demo.add_argument("--no-figure", action="store_true", help="skip the PNG (no matplotlib needed)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
