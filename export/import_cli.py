"""``echostream import SOURCE ...``: convert a released model's checkpoint into an EchoStream
checkpoint folder (``config.json`` + ``weights.safetensors`` + vocabularies + CMVN) that
``echostream export --checkpoint`` takes. One source today: ``streamspeech`` (a fairseq checkpoint
of StreamSpeech, read without fairseq; see ``export/streamspeech_import.py``).

Argument parsing only here (no torch), so ``echostream --help`` stays cheap.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    p = sub.add_parser("streamspeech", help="a StreamSpeech fairseq checkpoint (+ its data folder "
                       "and unit vocoder)", description="Convert a StreamSpeech fairseq checkpoint "
                       "into an EchoStream checkpoint folder, checking every tensor and setting.")
    p.add_argument("checkpoint", type=Path, help="the fairseq checkpoint (.pt), e.g. "
                   "streamspeech.simultaneous.fr-en.pt")
    p.add_argument("--data", type=Path, required=True, help="StreamSpeech's data folder "
                   "(configs/<lang>-en: yaml files, gcmvn.npz, SentencePiece models, dictionaries)")
    p.add_argument("--vocoder", type=Path, help="unit HiFi-GAN checkpoint ({'generator': ...}, "
                   "e.g. g_00500000); without it the vocoder is seeded noise")
    p.add_argument("--vocoder-config", type=Path, help="the vocoder's config.json")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from echostream.export.streamspeech_import import import_streamspeech

    summary = import_streamspeech(args.checkpoint, data=args.data, out=args.out,
                                  vocoder=args.vocoder, vocoder_config=args.vocoder_config,
                                  force=args.force, progress=not args.quiet)
    print(summary.line())
    return 0
