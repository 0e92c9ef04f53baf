"""``sortgate plan check | sign``: sort plans at the box and for central teams.

``plan check FILE`` validates a plan the way the agent does before it applies one: the plan file
(TOML, as in config/plans/example.toml, or JSON: a plan, or a whole ``sortgate.plan/1`` message)
must parse, and it must fit the line's lanes (``--config``): every lane it names exists and has the
class its rule needs, hold lanes take the reasons sent to them, and every declared hold reason and
group is placed by a rule. Every problem is printed; exit 0 fits, 2 does not.

``plan sign`` turns a plan into the signed message central publishes on ``{root}/plan``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config import ConfigError, load_config
from agent.pipeline.sortplan import SortPlan, check
from agent.service.local_cli import DEFAULT_CONFIG


def read_plan(path: Path) -> dict[str, Any]:
    """The plan in ``path`` as a dict (a plan message's ``plan``). Raises ValueError, saying why."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
    if isinstance(data, dict) and data.get("schema") == "sortgate.plan/1":
        data = data.get("plan")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a plan (a table / an object)")
    return data


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        plan = SortPlan.model_validate(read_plan(args.file))
    except ValidationError as exc:
        print(f"{args.file}: not a valid plan:", file=sys.stderr)
        for e in exc.errors():
            where = ".".join(str(x) for x in e["loc"])
            print(f"  {where}: {e['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"cannot check against the line: {exc.problems[0]}", file=sys.stderr)
        return 2
    problems = check(plan, cfg.lanes)
    if problems:
        print(f"{len(problems)} problem(s): {args.file} does not fit the lanes of {args.config}:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK — plan {plan.name!r} version {plan.version}, {len(plan.rules)} rules, "
          f"fits the {len(cfg.lanes)} lanes of {cfg.line.site}/{cfg.line.line}")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from agent.central.security import sign_item

    try:
        plan = SortPlan.model_validate(read_plan(args.file))
    except (ValueError, ValidationError) as exc:
        print(f"sortgate plan sign: {exc}", file=sys.stderr)
        return 2
    message = {
        "schema": "sortgate.plan/1", "site": args.site, "line": args.line,
        "issued_at": datetime.now(UTC).isoformat(), "plan": plan.model_dump(mode="json"),
    }
    json.dump(sign_item(message, args.key.read_text().strip(), args.key_id), sys.stdout, indent=2)
    print()
    return 0


def add_commands(sub: Any) -> None:
    plan = sub.add_parser("plan", help="sort plans: check one against a line, sign one for MQTT").add_subparsers(
        dest="plan_command", required=True)
    p = plan.add_parser("check", help="validate a plan file against the line's lanes; print every problem")
    p.add_argument("file", type=Path,
                   help="a plan: TOML (config/plans/example.toml) or JSON (a plan or a plan message)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"the line's config (default {DEFAULT_CONFIG})")
    p.set_defaults(func=_cmd_check)
    p = plan.add_parser("sign", help="make the signed sortgate.plan/1 message central publishes on {root}/plan")
    p.add_argument("file", type=Path)
    p.add_argument("--key", type=Path, required=True, help="private key file from `sortgate keys gen`")
    p.add_argument("--key-id", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--line", required=True)
    p.set_defaults(func=_cmd_sign)
