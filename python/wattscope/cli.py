"""The `wattscope` command."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# Each layer on top of the public API adds its own subcommands: a module here has ``register(subparsers)``, which
# adds parsers whose defaults hold ``run=callable(args) -> exit code``. Modules must import cheaply (no torch).
_COMMAND_MODULES = (
    "wattscope.calibration.command",
    "wattscope.sweep.command",
    "wattscope.compare",
    "wattscope.embed.command",
    "wattscope.analysis.command",
    "wattscope.webapp.command",
    "wattscope.quickstart",
)


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor

    if args.fake:
        from .testing import FakeNvml

        FakeNvml.install(1)
    report = doctor.diagnose(seconds=args.seconds)
    print(json.dumps(report.to_dict(), indent=2) if args.json else doctor.render(report))
    if report.problem and not args.fake and not args.json:
        print("\nNo usable GPU here. To see the native sampler work anyway: wattscope doctor --fake "
              "(a bundled fake NVML serving a simulated power trace).", file=sys.stderr)
    return 1 if report.problem else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wattscope", description="Precise energy measurement of GPU work.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="versions, driver, GPUs, and which power sources work at what rate")
    p.add_argument("--seconds", type=float, default=2.0, help="how long to sample each source (default 2)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--fake", action="store_true", help="run against the bundled fake NVML (no GPU needed)")
    p.set_defaults(run=_doctor)
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "seconds", 1.0) <= 0:
        print("wattscope: --seconds must be positive", file=sys.stderr)
        return 2
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
