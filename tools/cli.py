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


_STATUS = {"alive": "alive", "stale": "stale (owner gone)", "unknown": "unknown (owner not proven alive or gone)"}


def state_main(args: argparse.Namespace) -> int:
    """`viewpipe state list|clean [--force]|show NAME|set-threshold NAME T|bench`. An owner is alive while it
    holds its segment's lock, which holds across PID namespaces (containers sharing /dev/shm); owner pids are as
    the owner saw them."""
    from viewpipe.segments import SHM_DIR, clean_segments, list_segments

    if args.action in ("show", "set-threshold", "bench"):
        from .statecmd import state_command

        return state_command(args)
    if args.action == "list":
        segs = list_segments()
        for s in segs:
            print(f"{s.name}\t{s.size} bytes\towner pid {s.owner_pid}\t{_STATUS[s.status]}: {s.reason}")
        print(f"{len(segs)} sample state segment(s) in {SHM_DIR}")
        return 0
    force = bool(getattr(args, "force", False))
    removed, kept = clean_segments(force=force)
    for s in removed:
        why = "is gone" if s.stale else "not proven alive; --force"
        print(f"removed {s.path} ({s.size} bytes, owner pid {s.owner_pid} {why})")
    for s in kept:
        if s.error:
            print(f"kept {s.path}: {s.reason}; {s.error}", file=sys.stderr)
        else:
            print(f"kept {s.path}: {s.reason}; `viewpipe state clean --force` removes it if its run has ended")
    print(f"removed {len(removed)} segment(s); segments whose owner holds its lock are kept"
          + (f", and {len(kept)} not proven gone or not removable" if kept else ""))
    return 1 if any(s.error for s in kept) else 0


def build_parser() -> argparse.ArgumentParser:
    from . import bench, convert, evaluate, export, pretrain, quality

    parser = argparse.ArgumentParser(prog="viewpipe", description="Contrastive-learning views at GPU speed.")
    parser.add_argument("--version", action="version", version=f"viewpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench.add_parser(sub)
    convert.add_parser(sub)
    pretrain.add_parser(sub)
    evaluate.add_parser(sub)
    export.add_parser(sub)
    quality.add_parser(sub)
    st = sub.add_parser("state", help="list, clean, show or steer shared sample-state segments",
                        description="Shared sample-state segments live in /dev/shm. Their owner holds a lock on "
                        "each for its lifetime (this holds across containers sharing /dev/shm); `clean` removes "
                        "those whose lock is free (owner gone: kill -9, a crash) and keeps the rest. `show NAME` "
                        "prints a state's tables, version and heatmap threshold; `set-threshold NAME T` changes "
                        "the box threshold of a running run (its loaders derive their boxes from the heatmaps at "
                        "T within their prefetch bound; under torchrun on several nodes, set it on each node); "
                        "`bench` measures a state of --n samples (create, attach, publish, derive).")
    st.add_argument("action", choices=["list", "clean", "show", "set-threshold", "bench"])
    st.add_argument("args", nargs="*", metavar="ARG", help="show: NAME; set-threshold: NAME THRESHOLD (NAME as "
                    "`viewpipe state list` shows it)")
    st.add_argument("--n", type=int, default=1_281_167, help="bench: samples (default ImageNet's 1,281,167)")
    st.add_argument("--heatmap", type=int, default=7, help="bench: heatmap side K (default 7)")
    st.add_argument("--neighbours", type=int, default=20, help="bench: neighbours per sample (default 20)")
    st.add_argument("--size", type=int, default=224, help="bench: clean input side boxes are derived at")
    st.add_argument("--force", action="store_true",
                    help="clean: also remove segments whose owner cannot be proven alive or gone (made by a "
                    "viewpipe without owner locks, or unreadable); never one whose owner holds its lock")
    st.set_defaults(func=state_main)
    return parser


def resume_command(argv: list[str], resume: str) -> str:
    """The command line that continues an interrupted `viewpipe` run: its arguments with `--resume RESUME` in
    place of any --resume given, under the same torchrun launch when it ran under torchrun."""
    import os
    import shlex

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    args += ["--resume", resume]
    launch = ["viewpipe"]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1) or 1)
        per_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        launch = ["torchrun", *(["--nnodes", str(nodes)] if nodes > 1 else []), "--nproc-per-node", per_node,
                  "--no-python", "viewpipe"]
    return shlex.join(launch + args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ViewpipeError as exc:
        print(f"viewpipe: error: {_worker_error(exc) or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        resume = getattr(exc, "resume", None)  # (viewpipe.trainers.engine.TrainingInterrupted)
        if resume is None:
            print("viewpipe: interrupted", file=sys.stderr)
        elif getattr(exc, "main", True):
            command = resume_command(sys.argv[1:] if argv is None else argv, resume)
            print(f"viewpipe: {exc}; resume with: {command}", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # DataLoader re-raises some worker errors as another type
        if message := _worker_error(exc):
            print(f"viewpipe: error: {message}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
