"""The `viewpipe` command. Problems the user can fix are printed as one line, never a traceback."""

from __future__ import annotations

import argparse
import re
import sys

from viewpipe import __version__
from viewpipe.errors import ViewpipeError


_WORKER_ERROR = re.compile(r"^viewpipe\.[\w.]*Error: (.*)$")


def _worker_error(exc: BaseException) -> str | None:
    """The message of a viewpipe error that a DataLoader worker re-raised with its traceback, if it is one:
    the traceback's last line reads `viewpipe.<module>.<Class>Error: <message>`."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    match = _WORKER_ERROR.match(lines[-1]) if lines else None
    return match.group(1) if match else None


def state_main(args: argparse.Namespace) -> int:
    from viewpipe.state import SHM_DIR, list_segments, reclaim_stale

    if args.action == "list":
        segs = list_segments()
        for s in segs:
            status = "alive" if s.alive else "stale (owner gone)"
            print(f"{s.name}\t{s.size} bytes\towner pid {s.owner_pid}\t{status}")
        print(f"{len(segs)} sample state segment(s) in {SHM_DIR}")
        return 0
    removed = reclaim_stale()
    for s in removed:
        print(f"removed {s.path} ({s.size} bytes, owner pid {s.owner_pid} is gone)")
    print(f"removed {len(removed)} stale segment(s); segments of running processes are kept")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import bench, convert, evaluate, pretrain, quality

    parser = argparse.ArgumentParser(prog="viewpipe", description="Contrastive-learning views at GPU speed.")
    parser.add_argument("--version", action="version", version=f"viewpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench.add_parser(sub)
    convert.add_parser(sub)
    pretrain.add_parser(sub)
    evaluate.add_parser(sub)
    quality.add_parser(sub)
    st = sub.add_parser("state", help="list or clean shared sample-state segments",
                        description="Shared sample-state segments live in /dev/shm; `clean` removes those whose "
                        "owning process is gone (left by kill -9 or a crash).")
    st.add_argument("action", choices=["list", "clean"])
    st.set_defaults(func=state_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ViewpipeError as exc:
        print(f"viewpipe: error: {_worker_error(exc) or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("viewpipe: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # DataLoader re-raises some worker errors as another type
        if message := _worker_error(exc):
            print(f"viewpipe: error: {message}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
