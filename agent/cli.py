"""Command line: ``sortgate run | check-config | sim | bench line``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from agent.config import ConfigError, load_config


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{len(exc.problems)} problem(s) in {exc.path}:", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    print(
        f"{args.config}: OK — site {cfg.line.site}, line {cfg.line.line}, "
        f"controller {cfg.controller.transport}, {len(cfg.readers)} reader(s), {len(cfg.lanes)} lanes"
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print("sortgate: refusing to start, the config is invalid:", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    from agent import logs
    from agent.runtime import run_agent

    logs.configure(cfg.logging.level, cfg.logging.format)
    return run_agent(cfg)


def _cmd_sim(args: argparse.Namespace) -> int:
    from hw_sim.harness import RunSpec, run_line
    from hw_sim.view import LiveView

    spec = RunSpec(parcels=args.parcels, rate=args.rate, seed=args.seed, speed_mps=args.speed,
                   readers=args.readers, transport=args.transport)
    view = LiveView(sys.stdout, plain=args.plain)
    run, metrics = asyncio.run(run_line(spec, on_progress=view.update))
    view.summary(run, metrics)
    return 0 if metrics["wrongly_released"] == 0 else 1


def _cmd_bench_line(args: argparse.Namespace) -> int:
    from hw_sim.harness import RunSpec, chaos_steps, run_line
    from hw_sim.plan import make_plan

    plan = make_plan(args.parcels, args.rate, args.seed, args.speed, args.readers)
    names = [n for n in (args.chaos or "").split(",") if n]
    try:
        steps = chaos_steps(names, plan.duration_s)
    except ValueError as exc:
        print(f"sortgate bench line: {exc}", file=sys.stderr)
        return 2
    spec = RunSpec(parcels=args.parcels, rate=args.rate, seed=args.seed, speed_mps=args.speed,
                   readers=args.readers, transport=args.transport, plan=plan, chaos_steps=steps)
    _, metrics = asyncio.run(run_line(spec))
    metrics = {"bench": "line", "rate": args.rate, "transport": args.transport, **metrics}
    if args.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            print(f"{k:>20}: {v}")
    return 0


def _line_args(p: argparse.ArgumentParser, parcels: int, rate: float) -> None:
    p.add_argument("--parcels", type=int, default=parcels, help=f"parcels to run (default {parcels})")
    p.add_argument("--rate", type=float, default=rate, help=f"parcels per second (default {rate})")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--speed", type=float, default=3.0, help="belt speed m/s (default 3.0)")
    p.add_argument("--readers", type=int, default=1, choices=range(1, 5))
    p.add_argument("--transport", choices=("tcp", "rtu"), default="tcp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sortgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the agent (the daemon)")
    p.add_argument("--config", required=True, type=Path)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and print every problem")
    p.add_argument("config", type=Path)
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("sim", help="run a simulated line (simulator, broker, agent) with a live view")
    _line_args(p, parcels=300, rate=5.0)
    p.add_argument("--plain", action="store_true", help="print lines instead of redrawing the screen")
    p.set_defaults(func=_cmd_sim)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("line", help="the whole line against hw_sim; figures on the simulator side")
    _line_args(b, parcels=2000, rate=10.0)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--chaos", default="", help="faults during the run: agent-kill,broker-restart")
    b.set_defaults(func=_cmd_bench_line)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
