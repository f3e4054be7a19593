"""``echostream serve``: run the real ``tritonserver`` on 127.0.0.1 for a model repository written by
``echostream triton-repo``.

    echostream serve triton-repo [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]

waits until the model is ready, prints where it listens, and runs until Ctrl-C (or SIGTERM), which
stops the server cleanly. A model that fails to load (tampered artifacts: the file's sha256 line)
ends the command with that line and exit status 2. Which ``tritonserver`` and which Python the
model runs in: see ``runtime/triton_server.py``; ``--setup-model-env`` makes the model
environment once (NumPy < 2 for the Python-backend stub).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from echostream.errors import EchoStreamError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo", metavar="REPO", nargs="?",
                        help="model repository written by `echostream triton-repo`")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--tritonserver", metavar="PATH",
                        help="the tritonserver executable (default: $ECHOSTREAM_TRITONSERVER, PATH, "
                             "then the nvidia-pytriton wheel's)")
    parser.add_argument("--model-env", metavar="DIR",
                        help="the Python environment the model runs in (NumPy < 2 and echostream; "
                             "default: $ECHOSTREAM_MODEL_ENV, this Python if its NumPy is < 2, else "
                             "the one --setup-model-env made)")
    parser.add_argument("--setup-model-env", action="store_true",
                        help="create the model environment (this Python + numpy<2, layered over this "
                             "environment; into --model-env DIR or the default place) and exit")
    parser.add_argument("--log", metavar="FILE", help="also write the server's log to FILE")
    parser.add_argument("--quiet", action="store_true", help="do not echo the server's log")
    parser.add_argument("--ready-timeout-s", type=float, default=300.0, metavar="S",
                        help="how long to wait for the model to load (default 300)")


def main(args: argparse.Namespace) -> int:
    from echostream.runtime.triton_server import (TritonServer, find_tritonserver,
                                                  resolve_model_env, setup_model_env)

    if args.setup_model_env:
        env = setup_model_env(args.model_env, log=lambda m: print(f"echostream serve: {m}"))
        print("echostream serve: serve with: echostream serve REPO"
              + (f" --model-env {args.model_env}" if args.model_env else ""))
        return 0 if env else 1
    if not args.repo:
        raise EchoStreamError("REPO is required (a folder written by `echostream triton-repo`)")
    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port,
             "--metrics-port": args.metrics_port}
    for name, port in ports.items():
        if not 0 < port < 65536:
            raise EchoStreamError(f"{name} expected 1..65535, got {port}")
    if len(set(ports.values())) < 3:
        raise EchoStreamError("--http-port, --grpc-port and --metrics-port must differ")
    repo = Path(args.repo)
    if not (repo / "echostream" / "config.pbtxt").is_file():
        raise EchoStreamError(f"{repo}: not a model repository written by `echostream triton-repo` "
                              "(no echostream/config.pbtxt)")
    binary = find_tritonserver(args.tritonserver)
    env = resolve_model_env(args.model_env, binary)
    server = TritonServer(repo, args.http_port, args.grpc_port, args.metrics_port, binary, env,
                          Path(args.log) if args.log else None,
                          echo=None if args.quiet else sys.stderr)
    print(f"echostream serve: starting {binary.path} ({binary.source}); model runs on "
          f"{env.describe()}", file=sys.stderr, flush=True)
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum
        raise KeyboardInterrupt

    # SIGINT too: a shell that starts a background job without job control ignores SIGINT in it,
    # and Python then never raises KeyboardInterrupt; Ctrl-C / kill -INT must still stop the server.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server.start(args.ready_timeout_s)
        except KeyboardInterrupt:
            server.stop()
            print("echostream serve: interrupted before the model was ready", file=sys.stderr)
            return 130
        print(f"echostream serve: ready: model 'echostream' on gRPC {server.grpc_url}, HTTP "
              f"{server.http_url}, metrics {server.metrics_url}; Ctrl-C stops", flush=True)
        try:
            while server.running():
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("echostream serve: stopping", file=sys.stderr, flush=True)
            code = server.stop()
            print(f"echostream serve: stopped (tritonserver exit status {code})", file=sys.stderr)
            return 0
        code = server.stop()
        raise EchoStreamError(f"tritonserver stopped by itself: {server.failure(code)}")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
