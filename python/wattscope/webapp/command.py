"""`wattscope serve` and `wattscope report`.

Imports nothing heavy at module level: `wattscope --help` must not import pandas.
"""

from __future__ import annotations

import argparse
import sys
import threading
import webbrowser
from pathlib import Path

from ..errors import WattscopeError

_DB_HELP = (
    "a sweep database (default: the H100 sweep shipped with wattscope: the copy installed in the package, else "
    "data/h100/sweep.sqlite of the repository checkout)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="an interactive page over a sweep database: accuracy vs energy, the frontier, scores, comparisons",
        description="Serve an interactive page over a sweep database: top-1 accuracy against energy per image with "
        "the Pareto frontier and its fit, filters, the energy-efficiency score, a side-by-side comparison of the "
        "models you click, and the filtered table as CSV. Runs until Ctrl-C.",
    )
    p.add_argument("db", nargs="?", metavar="DB", help=_DB_HELP)
    p.add_argument("--port", type=int, default=8050, help="port to listen on (default 8050; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.set_defaults(run=_serve)

    p = subparsers.add_parser(
        "report",
        help="the same views as `wattscope serve`, written as one self-contained HTML file",
        description="Write the web app's views of a sweep database as one HTML file that works without a server "
        "or network (open it from disk, attach it, publish it).",
    )
    p.add_argument("db", nargs="?", metavar="DB", help=_DB_HELP)
    p.add_argument("-o", "--output", default="report.html", metavar="PATH", help="default report.html")
    p.set_defaults(run=_report)


def _error(command: str, e: object) -> int:
    print(f"wattscope {command}: error: {e}", file=sys.stderr)
    return 2


def _database(db: str | None) -> Path:
    from ..analysis import shipped_database

    return Path(db) if db is not None else shipped_database()


def _serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        return _error("serve", f"--port {args.port}: choose a port between 0 and 65535")
    try:
        from .server import make_server

        db = _database(args.db)
        server = make_server(db, args.host, args.port)
    except (WattscopeError, ModuleNotFoundError) as e:
        return _error("serve", e)
    except OSError as e:
        return _error("serve", f"cannot listen on {args.host}:{args.port} ({e}); choose another --port or --host")
    print(f"wattscope serve: {db} at {server.url} (Ctrl-C to stop)", flush=True)
    if not args.no_browser:
        threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("wattscope serve: stopped")
    finally:
        server.server_close()
    return 0


def _report(args: argparse.Namespace) -> int:
    try:
        from .report import write_report

        out = write_report(_database(args.db), args.output)
    except (WattscopeError, ModuleNotFoundError) as e:
        return _error("report", e)
    except OSError as e:
        return _error("report", f"cannot write {args.output}: {e}")
    print(f"wrote {out}")
    return 0
