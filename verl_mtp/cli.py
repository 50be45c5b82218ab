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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
