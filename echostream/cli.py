"""`echostream` console script: one sub-command per job, each in its own module.

Sub-command modules expose ``configure(parser)`` (argparse only, cheap) and ``main(args) -> int``
(does the work, imports heavy libraries lazily), so ``echostream --help`` and the torch-free
commands never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from echostream import __version__
from echostream.errors import EchoStreamError

COMMANDS = {
    "import": ("echostream.export.import_cli", "import a released checkpoint (StreamSpeech) as an EchoStream checkpoint"),
    "export": ("echostream.export.commands", "export a preset or checkpoint to per-stage ONNX graphs"),
    "lint": ("echostream.export.lint", "static TensorRT-readiness check of every graph"),
    "parity": ("echostream.export.parity", "compare every stage against the PyTorch reference"),
    "build-engines": ("echostream.export.tensorrt_build", "build TensorRT engines from the ONNX graphs"),
    "translate": ("echostream.runtime.translate_cli", "stream an audio file through the artifacts (or a Triton server)"),
    "triton-repo": ("echostream.runtime.triton_repo", "write a Triton Inference Server model repository for the artifacts"),
    "serve": ("echostream.runtime.serve_cli", "serve a Triton model repository with tritonserver on 127.0.0.1"),
    "bench": ("echostream.bench.command", "benchmarks: cost vs position, RTF, streams, backends, memory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echostream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"echostream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not exc.name or not exc.name.startswith("echostream"):
                raise
            p.set_defaults(_missing=f"sub-command {name!r} is not available in this build")
            continue
        module.configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"echostream: error: {args._missing}", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except EchoStreamError as exc:
        print(f"echostream {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"echostream {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
