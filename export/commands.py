"""``echostream export``: a preset or a checkpoint -> ``engines/<name>/`` (per-stage ONNX + manifest).

The folder holds one ``<stage>.onnx`` per stage (``<stage>.fp16.onnx`` too with ``--precision
fp16``), ``config.json`` + ``weights.safetensors`` (the reference model, so ``echostream parity`` can
rebuild the exact PyTorch model), the vocabularies (``src_dict.txt``/``tgt_dict.txt``, fairseq
format), ``gcmvn.npz`` (global CMVN) and ``manifest.json`` (see ``export/manifest.py``).

Everything is written into a temporary sibling folder and renamed into place at the end, so a failed
or interrupted export never leaves a half-written artifacts folder behind.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from echostream.config import PRESETS
from echostream.contract import (ALL_STAGE_NAMES, EXACT_STAGE_NAMES, STAGE_NAMES,
                                 UNIT_SHORT_STAGE, exported_stage_names, stage_contract)
from echostream.atomic import atomic_folder
from echostream.runtime.artifacts import PRECISIONS
from echostream.errors import EchoStreamError

SRC_DICT, TGT_DICT, CMVN = "src_dict.txt", "tgt_dict.txt", "gcmvn.npz"
PLACEHOLDER_NOTICE = ("notice: {name}: the vocabularies are generated placeholders "
                      "(no trained dictionary was given); decoded text will not be real words")


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"export a seeded model of this preset ({', '.join(sorted(PRESETS))})")
    src.add_argument("--checkpoint", type=Path, help="export a checkpoint folder (config.json + *.safetensors)")
    parser.add_argument("--out", type=Path, help="output folder (default: engines/<config name>)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    parser.add_argument("--stages", nargs="+", choices=ALL_STAGE_NAMES, metavar="STAGE",
                        help=f"stages to export (default: all of {', '.join(STAGE_NAMES)}, "
                             f"{UNIT_SHORT_STAGE} when sentence.short_target_tokens is set, and "
                             f"{', '.join(EXACT_STAGE_NAMES)} with --sentence-graphs)")
    parser.add_argument("--sentence-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="also export the sentence graphs of translate --fidelity exact "
                             "(default: yes for StreamSpeech's chunk Conformer, no for the Emformer)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp16 also writes <stage>.fp16.onnx beside every fp32 graph")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    manifest = export_artifacts(
        args.out, preset=args.preset, checkpoint=args.checkpoint, stages=args.stages,
        sentence_graphs=args.sentence_graphs,
        precision=args.precision, force=args.force, progress=not args.quiet,
    )
    out = Path(manifest["_path"])
    total = sum(s["export_s"] for s in manifest["stages"].values())
    width = max(map(len, manifest["stages"]))
    for stage, entry in manifest["stages"].items():
        print(f"  {stage:<{width}} {entry['export_s']:6.1f} s  {entry['nodes']:5d} nodes  "
              f"{', '.join(entry['files'].values())}")
    print(f"exported {len(manifest['stages'])} stage(s) to {out} in {total:.1f} s")
    return 0


# ---- library entry point ----------------------------------------------------------------------


def export_artifacts(out: str | Path | None = None, *, preset: str | None = None,
                     checkpoint: str | Path | None = None, model: Any = None,
                     stages: Iterable[str] | None = None, precision: str = "fp32",
                     sentence_graphs: bool | None = None,
                     force: bool = False, progress: bool = True,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export a model to an artifacts folder; returns the manifest (plus ``"_path"``: the folder).

    Exactly one of ``preset``, ``checkpoint`` or ``model`` (an ``EchoStreamModel``) gives the model.

    Raises:
        EchoStreamError (one line: the stage and the cause) on any failure; nothing is left behind.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if precision not in ("fp32", "fp16"):
        raise EchoStreamError(f"precision expected 'fp32' or 'fp16', got {precision!r}")
    cfg, build, source = _resolve_source(preset, checkpoint, model)
    stages = _resolve_stages(cfg, stages, sentence_graphs)
    make_fp16 = _fp16_converter() if precision == "fp16" else None
    out = Path(out) if out is not None else Path("engines") / cfg.name
    _check_out(out, force)
    model = build()  # after the cheap checks: a full-size model takes seconds to build
    with atomic_folder(out) as tmp:
        manifest = _write_folder(tmp, model, stages, make_fp16, source, progress, log)
    manifest["_path"] = str(out)
    return manifest


def _write_folder(root: Path, model, stages: list[str], make_fp16, source: dict[str, Any],
                  progress: bool, log) -> dict[str, Any]:
    from tqdm import tqdm

    from echostream.export.manifest import build_manifest, write_manifest
    from echostream.export.onnx_export import EXAMPLE_BATCH, EXPORTER, OPSET, export_stage
    from echostream.models.weights import save_checkpoint
    from echostream.runtime.artifacts import load_artifacts

    cfg = model.cfg
    cfg_dict = cfg.to_dict()
    entries: dict[str, dict[str, Any]] = {}
    bar = tqdm(stages, desc=f"export {cfg.name}", unit="stage", disable=not progress, file=sys.stderr)
    for stage in bar:
        bar.set_postfix_str(stage)
        result = export_stage(model, stage, root / f"{stage}.onnx")
        files = {"fp32": result.path.name}
        if make_fp16 is not None:
            fp16 = root / f"{stage}.fp16.onnx"
            try:
                make_fp16(result.path, fp16, stage_contract(stage, cfg_dict))
            except EchoStreamError as exc:
                raise EchoStreamError(f"{stage}: fp16 variant failed: {exc}") from None
            files["fp16"] = fp16.name
        entries[stage] = {"contract": stage_contract(stage, cfg_dict).to_dict(), "files": files,
                          "export_s": round(result.seconds, 3), "nodes": result.nodes}
    save_checkpoint(model, cfg, root)  # config.json + weights.safetensors
    vocab = _write_vocabularies(root, cfg_dict, source.get("dir"))
    cmvn = _write_cmvn(root, cfg_dict, source.get("dir"))
    if vocab["placeholder"]:
        log(PLACEHOLDER_NOTICE.format(name=cfg.name))
    export_info = {"exporter": EXPORTER, "opset": OPSET, "example_batch": EXAMPLE_BATCH,
                   "dynamic_axes": "axis 0 (batch) of every input and output",
                   "precisions": ["fp32"] + (["fp16"] if make_fp16 else []), "source": source["kind"],
                   "source_ref": source["ref"]}
    manifest = build_manifest(root, cfg_dict, entries, export_info, vocab, cmvn)
    write_manifest(root, manifest)
    load_artifacts(root)  # re-read what was written: the runtime must accept it as is
    return manifest


# ---- inputs ------------------------------------------------------------------------------------


def _resolve_source(preset, checkpoint, model):
    """-> (config, a callable building the model, source description for the manifest)."""
    if sum(x is not None for x in (preset, checkpoint, model)) != 1:
        raise EchoStreamError("give exactly one of --preset or --checkpoint")
    if model is not None:
        return model.cfg, model.eval, {"kind": "model", "ref": model.cfg.name}
    from echostream.config import get_preset
    from echostream.models.weights import build_model, load_checkpoint

    if preset is not None:
        try:
            cfg = get_preset(preset)
        except ValueError as exc:
            raise EchoStreamError(str(exc)) from None
        return cfg, lambda: build_model(cfg), {"kind": "preset", "ref": f"{preset} (seed {cfg.seed})"}
    try:
        loaded, cfg = load_checkpoint(checkpoint)
    except ValueError as exc:
        raise EchoStreamError(f"cannot load checkpoint: {exc}") from None
    source_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    return cfg, lambda: loaded, {"kind": "checkpoint", "ref": str(checkpoint), "dir": source_dir}


def _resolve_stages(cfg, stages: Iterable[str] | None, sentence_graphs: bool | None = None
                    ) -> list[str]:
    """Requested stages in pipeline order (both encoder kinds stream: Emformer and chunk
    Conformer), plus the exact mode's sentence graphs when asked (default: for the chunk
    Conformer, StreamSpeech's own structure); a config no stage graph can serve (e.g. a chunk
    size that cannot stream) is refused here, before the model is built."""
    if sentence_graphs is None:
        sentence_graphs = cfg.encoder.kind == "conformer"
    if stages is None:
        stages = exported_stage_names(cfg, sentence_graphs)
    stages = list(stages)
    unknown = [s for s in stages if s not in ALL_STAGE_NAMES]
    if unknown:
        raise EchoStreamError(f"unknown stage(s) {unknown}; expected some of {list(ALL_STAGE_NAMES)}")
    for stage in stages:
        try:
            stage_contract(stage, cfg.to_dict())
        except ValueError as exc:
            raise EchoStreamError(f"{stage}: {exc}") from None
    return [s for s in ALL_STAGE_NAMES if s in stages]


def _fp16_converter():
    if importlib.util.find_spec("echostream.export.fp16") is None:
        raise EchoStreamError("--precision fp16 needs echostream.export.fp16, which this build lacks")
    from echostream.export.fp16 import make_fp16_variant

    return make_fp16_variant


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EchoStreamError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EchoStreamError(f"output folder {out} exists and is not empty; pass --force to replace it")


# ---- vocabularies and CMVN -----------------------------------------------------------------------

_CONSONANTS, _VOWELS = "bdfghklmnprstvz", "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]


def placeholder_pieces(count: int) -> list[str]:
    """``count`` distinct SentencePiece-style pieces: 3 in 4 start a word (``"\u2581"`` prefix).

    Piece ``i`` spells ``i`` in base 75 with consonant-vowel syllables, so the list is the same on
    every machine and pieces read like (nonsense) words when decoded.
    """
    pieces = []
    for i in range(count):
        digits, n = [], i
        while True:
            digits.append(_SYLLABLES[n % len(_SYLLABLES)])
            n = n // len(_SYLLABLES) - 1
            if n < 0:
                break
        word = "".join(reversed(digits))
        pieces.append(word if i % 4 == 3 else "\u2581" + word)
    return pieces


def write_fairseq_dict(path: Path, pieces: list[str]) -> None:
    """fairseq ``dict.txt``: ``<piece> <count>`` per line, counts descending (frequency order)."""
    lines = [f"{p} {len(pieces) - i}" for i, p in enumerate(pieces)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_vocabularies(root: Path, cfg: dict[str, Any], source_dir: Path | None) -> dict[str, Any]:
    """Copy the checkpoint's dictionaries if it has both, else write generated placeholders."""
    if source_dir is not None and (source_dir / SRC_DICT).is_file() and (source_dir / TGT_DICT).is_file():
        shutil.copyfile(source_dir / SRC_DICT, root / SRC_DICT)
        shutil.copyfile(source_dir / TGT_DICT, root / TGT_DICT)
        placeholder = False
    else:
        write_fairseq_dict(root / SRC_DICT, placeholder_pieces(cfg["ctc"]["src_vocab_size"] - 4))
        write_fairseq_dict(root / TGT_DICT, placeholder_pieces(cfg["ctc"]["tgt_vocab_size"] - 4))
        placeholder = True
    return {"src": SRC_DICT, "tgt": TGT_DICT, "format": "fairseq_dict", "placeholder": placeholder}


def _write_cmvn(root: Path, cfg: dict[str, Any], source_dir: Path | None) -> dict[str, Any]:
    """Copy the checkpoint's ``gcmvn.npz`` if present, else identity statistics (mean 0, std 1)."""
    import numpy as np

    if source_dir is not None and (source_dir / CMVN).is_file():
        shutil.copyfile(source_dir / CMVN, root / CMVN)
        return {"file": CMVN, "placeholder": False}
    dim = cfg["features"]["num_mel_bins"]
    np.savez(root / CMVN, mean=np.zeros(dim, np.float32), std=np.ones(dim, np.float32))
    return {"file": CMVN, "placeholder": True}
