"""`sam3-serve`: serve, manage weights, and benchmark.

sam3-serve serve [--host ...] [--port ...]      start the server
sam3-serve weights download [NAME ...]          fetch weight sets from the Hugging Face Hub
sam3-serve weights verify                       load each present set, report key mismatches
sam3-serve bench --base-url URL --model M ...   load-test a Segmind-compatible endpoint
"""

from __future__ import annotations

import argparse
import sys

from pipeline.registry import TASKS
from server import bench as bench_module
from server import config as config_module
from server.weights import MANIFEST, DownloadError, download, verify


def _config(args: argparse.Namespace) -> config_module.ServeConfig:
    """The serve configuration as flags (here only --weights-dir) and environment variables give it."""
    return config_module.from_sources(argparse.Namespace(weights_dir=args.weights_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sam3-serve", description="Local inference server for the SAM 3 family.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start the server")
    config_module.add_arguments(serve)

    bench = commands.add_parser("bench", help="load-test any Segmind-compatible endpoint (this server or Segmind's)")
    bench_module.add_arguments(bench)

    weights = commands.add_parser("weights", help="download or verify model weights")
    weight_commands = weights.add_subparsers(dest="weights_command", required=True)
    get = weight_commands.add_parser("download", help="snapshot weight sets from the Hugging Face Hub (uses HF_TOKEN)")
    get.add_argument(
        "sets",
        nargs="*",
        metavar="NAME",
        help=f"weight sets ({', '.join(MANIFEST)}) or models ({', '.join(TASKS)}); default: all",
    )
    check = weight_commands.add_parser(
        "verify", help="load every present weight set; non-zero exit on any key mismatch"
    )
    for sub in (get, check):
        sub.add_argument("--weights-dir", default=None, help="weights directory [env SAM3_SERVE_WEIGHTS_DIR]")

    args = parser.parse_args(argv)
    if args.command == "serve":
        from server.app import serve as run_server

        run_server(config_module.from_sources(args))
        return 0
    if args.command == "bench":
        return bench_module.run(args)

    config = _config(args)
    weights_dir = config.weights_dir
    if args.weights_command == "download":
        unknown = [name for name in args.sets if name not in MANIFEST and name not in TASKS]
        if unknown:
            parser.error(f"unknown name(s) {', '.join(unknown)}; known: {', '.join([*MANIFEST, *TASKS])}")
        options = config.model_dump()
        sets = [ws for name in args.sets for ws in (TASKS[name].weight_sets(**options) if name in TASKS else [name])]
        status = 0
        for name in dict.fromkeys(sets or MANIFEST):
            entry = MANIFEST[name]
            print(f"{name}: downloading {entry.repo} ({entry.size}) into {weights_dir / name}", flush=True)
            try:
                download(name, weights_dir)
                print(f"{name}: done")
            except DownloadError as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                status = 1
        return status

    status = 0
    for result in verify(weights_dir):
        print(f"{result.name}: {'ok' if result.ok else 'FAILED'}: {result.message}")
        status |= not result.ok
    return status


if __name__ == "__main__":
    sys.exit(main())
