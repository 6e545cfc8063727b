"""The ``fxadapt`` command line: ``fxadapt demo`` and ``fxadapt info``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    result = demo.run(
        steps=args.steps,
        compile=not (args.no_compile or args.quick),
        quick=args.quick,
        out=args.out,
        seed=args.seed,
        progress=not args.no_progress,
        threads=args.threads or None,
    )
    return 0 if result["accuracy_after"] >= result["accuracy_before"] else 1


def _info(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from ..registry import method_names
    from ..version import __version__

    print(f"fxadapt {__version__}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"adapter methods: {', '.join(method_names())}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fxadapt",
        description="Parameter-efficient adapters for Hugging Face models as graph passes over torch.fx.",
    )
    from ..version import __version__

    p.add_argument("--version", action="version", version=f"fxadapt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    d = sub.add_parser(
        "demo",
        help="train a LoRA adapter on a tiny random BERT and show every step (sites, graph, merge, save)",
        description="Build a tiny BertForSequenceClassification from a config (nothing is downloaded), "
        "add LoRA, print the site table and the rewritten graph, train with torch.compile on a "
        "synthetic task, and check merge and save.",
    )
    d.add_argument("--steps", type=int, default=None, help="training steps (default: 200; 60 with --quick)")
    d.add_argument("--no-compile", action="store_true", help="run the eager GraphModule, no torch.compile")
    d.add_argument(
        "--quick",
        action="store_true",
        help="very short variant (smaller model, 60 steps, no compile); used by the tests",
    )
    d.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="save the adapter here (default: a temporary folder, removed afterwards)",
    )
    d.add_argument("--seed", type=int, default=0, help="seed for the model init and the data (default: 0)")
    d.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default: 1, the fastest for this tiny model; 0: torch's default)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)

    i = sub.add_parser("info", help="print versions and the registered adapter methods")
    i.set_defaults(func=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
