"""Command line: ``sortgate run | check-config | status | maintenance | gate | reader | plan | sim | bench ...``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import agent
from agent.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from hw_sim.plan import Plan


def _cmd_migrate_config(args: argparse.Namespace) -> int:
    import tomllib

    from agent.config_migrate import migrate_file

    try:
        changes = migrate_file(args.config, args.write)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"sortgate migrate-config: {args.config}: {exc}", file=sys.stderr)
        return 2
    for line in changes:
        print(("changed " if args.write else "would change ") + line)
    if not changes:
        print(f"{args.config}: nothing to migrate")
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{len(exc.problems)} problem(s) in {exc.path}:", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    errors, warnings = _environment(cfg, args.config)
    for w in warnings:
        print(f"{args.config}: warning: {w}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} problem(s) in {args.config}:", file=sys.stderr)
        for e in errors:
            print(f"  {args.config}: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.config}: OK — site {cfg.line.site}, line {cfg.line.line}, "
        f"controller {cfg.controller.transport}, {len(cfg.readers)} reader(s), {len(cfg.lanes)} lanes, "
        f"broker {cfg.mqtt.host}:{cfg.mqtt.port}, sort plan "
        + (f"{cfg.plan.name!r} version {cfg.plan.version} ({len(cfg.plan.rules)} rules)" if cfg.plan else "default")
    )
    return 0


def _environment(cfg: Config, path: Path) -> tuple[list[str], list[str]]:
    """What check-config can check beyond the file: (problems, warnings). Creates nothing."""
    import os
    import tomllib

    errors: list[str] = []
    warnings: list[str] = []
    if "mqtt" not in tomllib.loads(path.read_text(encoding="utf-8")):
        errors.append("[mqtt] is missing: the agent would look for a broker on 127.0.0.1:1883; say where it is")
    state = Path(cfg.storage.state_dir)
    existing = next((p for p in (state, *state.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        errors.append(f"storage.state_dir: {state} cannot be written (nearest existing: {existing})")
    devices = [(f"readers[{i}].device", r.device) for i, r in enumerate(cfg.readers)]
    if cfg.controller.transport == "rtu" and cfg.controller.device:
        devices.append(("controller.device", cfg.controller.device))
    for key, device in devices:
        if not os.path.exists(device):
            warnings.append(f"{key}: {device} does not exist (yet: a udev name appears when the device is plugged)")
    if cfg.vision.mode != "off":
        from agent.vision.check import Classifier, ModelError

        try:
            Classifier(cfg.vision.model)  # loads and checks the model; starts nothing, writes nothing
        except ModelError as exc:
            errors.append(f"vision.model: {exc}")
    return errors, warnings


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.service.local_cli import load_or_refuse

    cfg = load_or_refuse(args.config, "sortgate")
    if cfg is None:
        return 2
    from agent.service import logs
    from agent.service.runtime import run_agent

    logs.configure(cfg.logging.level, cfg.logging.format)
    return run_agent(cfg)


def _cmd_sim(args: argparse.Namespace) -> int:
    from hw_sim.harness import LineRun, RunSpec
    from hw_sim.view import LiveView

    try:
        readers, sorting = _reader_spec(args), _sort_spec(args)
    except ValueError as exc:
        print(f"sortgate sim: {exc}", file=sys.stderr)
        return 2
    plan = _parcels(args, sorting)
    spec = RunSpec(parcels=args.parcels, rate=args.rate, seed=args.seed, speed_mps=args.speed,
                   readers=args.readers, transport=args.transport, plan=plan, images=args.images,
                   console=not args.no_console, **readers, **sorting)
    view = LiveView(sys.stdout, plain=args.plain)
    run = LineRun(spec, on_progress=view.update)
    run.on_console = lambda url: print(f"console: {url} (open it in a browser; read-only, no users_file)",
                                       file=sys.stderr, flush=True)
    try:
        metrics = asyncio.run(run.run())
        run.add_process_figures()
    except KeyboardInterrupt:  # Ctrl-C: the run has stopped everything it started; say what it saw
        print("\ninterrupted: figures for the parcels fed so far", file=sys.stderr)
        partial = run.partial_figures()
        if partial is not None:
            view.summary(run, partial)
        return 130
    finally:
        run.cleanup()
    view.summary(run, metrics)
    return 0 if metrics["wrongly_released"] == 0 else 1


def _cmd_bench_line(args: argparse.Namespace) -> int:
    from hw_sim import chaos
    from hw_sim.harness import RunSpec, run_line

    try:
        names = [f.name for f in chaos.parse(args.chaos)] if args.chaos else []
        readers = _reader_spec(args)
        sorting = _sort_spec(args)
    except ValueError as exc:
        print(f"sortgate bench line: {exc}", file=sys.stderr)
        return 2
    plan = _parcels(args, sorting)
    spec = RunSpec(parcels=args.parcels, rate=args.rate, seed=args.seed, speed_mps=args.speed,
                   readers=args.readers, transport=args.transport, plan=plan, chaos=names,
                   images=args.images, require_signatures="verdict-flood" in names, idle_s=args.idle_s,
                   console_clients=args.console_clients, **readers, **sorting)
    if "verdict-flood" in names:
        from hw_sim.harness import forged_batches

        spec.forged = forged_batches(plan)
    _, metrics = asyncio.run(run_line(spec))
    metrics = {"bench": "line", "rate": args.rate, "transport": args.transport, "images": args.images, **metrics}
    if args.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            print(f"{k:>20}: {v}")
    return 0


def _parcels(args: argparse.Namespace, sorting: dict[str, Any]) -> Plan:
    """The planned parcels of ``sim`` and ``bench line``; with a sort plan, their hold reasons and
    groups too, and central replaces the plan 40 % into the run (``sorting`` is completed)."""
    from hw_sim.plan import Mix, make_plan

    mix = Mix(hidden_item=0.06) if args.images else Mix()
    plan = make_plan(args.parcels, args.rate, args.seed, args.speed, args.readers, mix=mix,
                     sort=sorting.pop("mix", None))
    if sorting:
        sorting["plan_update_at"] = plan.duration_s * 0.4
    return plan


def _sort_spec(args: argparse.Namespace) -> dict[str, Any]:
    """``--plan FILE``: the simulated line with a sort plan (hw_sim/sortline.py), the plan central
    sends mid-run (``--plan-update FILE``, or the same plan one version up with its first container
    out of use). Raises ValueError naming what is wrong."""
    if args.plan is None:
        if args.plan_update is not None:
            raise ValueError("--plan-update needs --plan")
        return {}
    from agent.service.plan_cli import read_plan
    from hw_sim import sortline

    plans = [read_plan(args.plan)]
    plans.append(read_plan(args.plan_update) if args.plan_update else sortline.derive_update(plans[0]))
    for path, body in zip((args.plan, args.plan_update or "the derived update"), plans, strict=True):
        problems = sortline.problems(body)
        if problems:
            raise ValueError(f"{path} does not fit the simulated line (hw_sim/sortline.py): " + "; ".join(problems))
    return {"sort_plan": plans[0], "plan_update": plans[1], "mix": sortline.MIX}


def _cmd_bench_sweep(args: argparse.Namespace) -> int:
    from hw_sim import sweep

    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
        if not rates or min(rates) <= 0:
            raise ValueError
    except ValueError:
        print(f"sortgate bench sweep: --rates: a comma-separated list of positive rates (got {args.rates!r})",
              file=sys.stderr)
        return 2
    if args.out is not None:
        try:
            import matplotlib  # noqa: F401 - a development extra: fail before an hour of runs, not after
        except ImportError:
            print("sortgate bench sweep: --out needs matplotlib (pip install 'sortgate[dev]')", file=sys.stderr)
            return 2

    def progress(row: dict[str, Any]) -> None:
        print(f"rate {row['rate']:g}/s at {row['speed_mps']:g} m/s: decision p99 {row['decision_p99_ms']} ms, "
              f"cpu {row['cpu_pct']} %, late {row['late']}, wrongly released {row['wrongly_released']}",
              file=sys.stderr)

    rows = sweep.run_sweep(rates, args.seconds, idle_s=args.idle_s, seed=args.seed, on_row=progress)
    result = {"bench": "sweep", "machine": sweep.machine(), "seconds": args.seconds,
              "rows": [{k: v for k, v in r.items() if k != "line"} for r in rows],
              "runs": [r["line"] for r in rows]}
    text = sweep.table(rows)
    if args.out is not None:
        sweep.plot(rows, args.out / "sweep.png")
        command = f"sortgate bench sweep --rates {args.rates} --seconds {args.seconds:g} --idle-s {args.idle_s:g}"
        (args.out / "sweep.md").write_text(
            f"# `{command}`\n\nMachine: {result['machine']}. Plot: [sweep.png](sweep.png).\n\n{text}\n\n"
            f"```json\n{json.dumps(result, indent=1)}\n```\n"
        )
    print(json.dumps(result) if args.json else text)
    return 0


def _cmd_bench_identity(args: argparse.Namespace) -> int:
    from hw_sim.identity import IdentitySpec, IdentityViolation, run_identity
    from hw_sim.reader_faults import FAULTS

    faults = tuple(FAULTS if args.faults == "all" else (n for n in args.faults.split(",") if n))
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        print(f"sortgate bench identity: unknown fault(s) {unknown}; known: {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    spec = IdentitySpec(
        parcels=args.parcels, seed=args.seed, readers=args.readers, counter=args.counter, faults=faults,
        fault_rate=args.fault_rate, restart_every=args.restart_every,
    )
    try:
        figures = run_identity(spec)
    except IdentityViolation as exc:
        print(f"sortgate bench identity: VIOLATION: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:>28}: {v}")
    return 0


def _reader_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The simulated readers' settings and faults from the command line."""
    from hw_sim.reader_faults import FAULTS

    names = [n for n in (args.faults or "").split(",") if n]
    if names == ["all"]:
        names = list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown reader fault(s) {unknown}; known: {', '.join(FAULTS)} (or all)")
    if not 0 <= args.fault_rate <= 0.2:
        raise ValueError("--fault-rate must be between 0 and 0.2")
    return {"reader_faults": names, "fault_rate": args.fault_rate, "reader_counter": not args.no_counter}


def _cmd_keys_gen(args: argparse.Namespace) -> int:
    import os

    from agent.central.security import generate_keypair

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    private, public = generate_keypair()
    key_path, pub_path = out / f"{args.key_id}.key", out / f"{args.key_id}.pub"
    if key_path.exists() and not args.force:
        print(f"sortgate keys gen: {key_path} exists (use --force to replace it)", file=sys.stderr)
        return 2
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(private + "\n")
    pub_path.write_text(f"{args.key_id} {public}\n")
    print(f"private key: {key_path} (keep it at the central system only)")
    print(f"public key:  {pub_path} (append to the agents' trusted_keys_file)")
    return 0


def _cmd_verdicts_sign(args: argparse.Namespace) -> int:
    from agent.central.security import sign_item

    private = args.key.read_text().strip()
    try:
        batch = json.load(sys.stdin)
        batch["verdicts"] = [sign_item(item, private, args.key_id) for item in batch["verdicts"]]
    except (ValueError, KeyError, TypeError) as exc:
        print(f"sortgate verdicts sign: stdin is not a verdict batch: {exc}", file=sys.stderr)
        return 2
    json.dump(batch, sys.stdout, indent=2)
    print()
    return 0


def _cmd_model_eval(args: argparse.Namespace) -> int:
    from agent.vision.check import ModelError
    from agent.vision.model_eval import evaluate

    thresholds = None
    if args.config:
        try:
            thresholds = load_config(args.config).vision.thresholds.model_dump()
        except ConfigError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            return 2
    try:
        report = evaluate(args.images, args.model_dir, thresholds)
    except ModelError as exc:
        print(f"sortgate model eval: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))
    return 0


def _line_args(p: argparse.ArgumentParser, parcels: int, rate: float) -> None:
    p.add_argument("--parcels", type=int, default=parcels, help=f"parcels to run (default {parcels})")
    p.add_argument("--rate", type=float, default=rate, help=f"parcels per second (default {rate})")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--speed", type=float, default=3.0, help="belt speed m/s (default 3.0)")
    p.add_argument("--readers", type=int, default=1, choices=range(1, 5))
    p.add_argument("--transport", choices=("tcp", "rtu"), default="tcp")
    p.add_argument("--faults", default="", help="reader faults: skip,duplicate,delay,reorder,restart,"
                   "eye_miss,eye_double (or all)")
    p.add_argument("--fault-rate", type=float, default=0.01,
                   help="share of parcel-reader pairs that get one of --faults (default 0.01)")
    p.add_argument("--no-counter", action="store_true",
                   help="readers send no trigger counter (frames are tied by their time windows alone)")
    p.add_argument("--plan", type=Path, help="a line with a sort plan (hw_sim/sortline.py: release, hold, "
                   "consolidation, overflow and loop lanes that fill and drain), starting with this plan "
                   "(e.g. config/plans/example.toml); central replaces it 40%% into the run. Adds wrong_lane, "
                   "overflowed, recirculated and lane_full_events")
    p.add_argument("--plan-update", type=Path, help="the plan central sends mid-run (default: --plan one "
                   "version up, with its first consolidation container disabled)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sortgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sortgate {agent.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the agent (the daemon)")
    p.add_argument("--config", required=True, type=Path)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and print every problem")
    p.add_argument("config", type=Path)
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("migrate-config", help="rewrite old defaults that this version names differently "
                       "(comments and layout kept; the installer runs it on upgrade)")
    p.add_argument("config", type=Path)
    p.add_argument("--write", action="store_true", help="change the file (default: only say what would change)")
    p.set_defaults(func=_cmd_migrate_config)

    from agent.service import local_cli, plan_cli

    local_cli.add_commands(sub)
    plan_cli.add_commands(sub)

    p = sub.add_parser("sim", help="run a simulated line (simulator, broker, agent) with a live view")
    _line_args(p, parcels=300, rate=5.0)
    p.add_argument("--plain", action="store_true", help="print lines instead of redrawing the screen")
    p.add_argument("--images", action="store_true", help="X-ray images and the image check; 6%% hide an item")
    p.add_argument("--no-console", action="store_true", help="do not start the local web console")
    p.set_defaults(func=_cmd_sim)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = p.add_subparsers(dest="bench", required=True)
    b = bsub.add_parser("line", help="the whole line against hw_sim; figures on the simulator side")
    _line_args(b, parcels=2000, rate=10.0)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--chaos", default="", help="faults during the run, spread over it: comma-separated names from "
                   "hw_sim/chaos.py (agent-kill, broker-restart, verdict-flood, controller-drop, "
                   "controller-exceptions, controller-slow, controller-restart, controller-freeze, "
                   "reader-unplug, serial-noise, broker-auth, broker-down-at-start, disk-full), or all")
    b.add_argument("--images", action="store_true",
                   help="X-ray images with the image check required; 6%% of parcels hide a prohibited item")
    b.add_argument("--idle-s", type=float, default=20.0,
                   help="seconds of running belt without parcels first, for idle_cpu_pct (0: skip; default 20)")
    b.add_argument("--console-clients", type=int, default=0,
                   help="run the local web console with this many live clients (event stream open, stats and "
                   "a search every 5 s each); adds `console` to the figures")
    b.set_defaults(func=_cmd_bench_line)

    b = bsub.add_parser("sweep", help="bench line at several rates: a table, one JSON object and a plot")
    b.add_argument("--rates", default="2,5,10,15,20", help="parcels per second, comma-separated "
                   "(default 2,5,10,15,20); the belt runs faster where parcels would not fit at 3 m/s")
    b.add_argument("--seconds", type=float, default=60.0, help="seconds of parcels per rate (default 60)")
    b.add_argument("--idle-s", type=float, default=20.0, help="idle belt before each run (default 20)")
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    b.add_argument("--out", type=Path, help="write sweep.png and sweep.md (the table and the JSON) here")
    b.set_defaults(func=_cmd_bench_sweep)

    b = bsub.add_parser(
        "identity",
        help="matching and decisions in virtual time against ground truth (no wires): a code never "
        "reaches another parcel",
    )
    b.add_argument("--parcels", type=int, default=100_000)
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--readers", type=int, default=2, choices=range(1, 5))
    b.add_argument("--counter", choices=("all", "none", "mixed"), default="all",
                   help="which readers send a trigger counter (mixed: the first only; default all)")
    b.add_argument("--faults", default="all", help="reader faults to inject (comma list, or all)")
    b.add_argument("--fault-rate", type=float, default=0.01, help="per parcel and reader (default 0.01)")
    b.add_argument("--restart-every", type=int, default=20_000,
                   help="parcels between agent restarts on average (0: none; default 20000)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=_cmd_bench_identity)

    p = sub.add_parser("model", help="the on-device image-check model")
    msub = p.add_subparsers(dest="model", required=True)
    e = msub.add_parser("eval", help="measure the shipped model on a held-out synthetic set")
    e.add_argument("--images", type=int, default=2500)
    e.add_argument("--model-dir", type=Path, help="a folder with xray_int8.tflite and xray_f32.tflite "
                   "(default: the models shipped with this installation)")
    e.add_argument("--config", type=Path, help="take the per-class thresholds from this config")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_model_eval)

    p = sub.add_parser("keys", help="Ed25519 keys for signed verdicts")
    ksub = p.add_subparsers(dest="keys", required=True)
    k = ksub.add_parser("gen", help="make a key pair: <out>/<key-id>.key (private) and .pub")
    k.add_argument("--key-id", required=True)
    k.add_argument("--out", type=Path, default=Path("."))
    k.add_argument("--force", action="store_true")
    k.set_defaults(func=_cmd_keys_gen)

    p = sub.add_parser("verdicts", help="verdict tools for central teams and tests")
    vsub = p.add_subparsers(dest="verdicts", required=True)
    v = vsub.add_parser("sign", help="sign every item of a verdict batch read from stdin")
    v.add_argument("--key", type=Path, required=True, help="private key file from `keys gen`")
    v.add_argument("--key-id", required=True)
    v.set_defaults(func=_cmd_verdicts_sign)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
