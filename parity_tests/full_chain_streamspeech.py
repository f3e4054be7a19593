"""The StreamSpeech user's chain once on the full-size ``streamspeech`` preset (issue 11).

Not collected by pytest (it takes ~10 minutes on 2 CPU cores); CI runs the same chain on the
``streamspeech_tiny`` dims in ``test_streamspeech_import.py``. This script writes a synthetic
full-size StreamSpeech checkpoint in fairseq's on-disk format (seeded weights under StreamSpeech's
names, omegaconf ``cfg``, a weight-normed generator, the real fr-en data folder), then runs what a
user runs, each step through the console entry point, and prints the wall time of each::

    python parity_tests/full_chain_streamspeech.py --work /tmp/ss-full

import -> export -> lint -> parity -> translate (incremental, then --fidelity exact) on the first
Common Voice clip. Exits non-zero at the first failing step.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_streamspeech_import import (FR_EN, SHARED, fairseq_checkpoint, model_args,  # noqa: E402
                                      streamspeech_state, vocoder_json, weight_normed_generator)

from echostream import cli  # noqa: E402
from echostream.config import get_preset  # noqa: E402
from echostream.models.weights import build_model  # noqa: E402


def write_checkpoint(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model = build_model(get_preset("streamspeech"))
    ckpt, gen = root / "streamspeech.simultaneous.fr-en.pt", root / "g_00500000"
    torch.save(fairseq_checkpoint(streamspeech_state(model), model_args(model.cfg), "omegaconf"), ckpt)
    torch.save(weight_normed_generator(model.vocoder)[0], gen)
    (root / "config.json").write_text(json.dumps(vocoder_json(model.cfg.vocoder), indent=2))
    return {"checkpoint": ckpt, "vocoder": gen, "vocoder_config": root / "config.json"}


def step(name: str, argv: list[str]) -> None:
    start = time.perf_counter()
    rc = cli.main(argv)
    print(f"[chain] {name}: exit {rc} in {time.perf_counter() - start:.1f} s", flush=True)
    if rc != 0:
        sys.exit(f"full chain failed at {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="an empty or new folder")
    work = parser.parse_args().work
    work.mkdir(parents=True, exist_ok=True)
    files = write_checkpoint(work)
    clip = sorted((SHARED / "example" / "wavs").glob("*.mp3"))[0]
    ckpt, engines = work / "ckpt", work / "engines"
    step("import", ["import", "streamspeech", str(files["checkpoint"]), "--data", str(FR_EN),
                    "--vocoder", str(files["vocoder"]), "--vocoder-config",
                    str(files["vocoder_config"]), "--out", str(ckpt), "--force", "--quiet"])
    step("export", ["export", "--checkpoint", str(ckpt), "--out", str(engines), "--force", "--quiet"])
    step("lint", ["lint", str(engines)])
    step("parity", ["parity", str(engines)])
    for fidelity in ("incremental", "exact"):
        step(f"translate --fidelity {fidelity}",
             ["translate", str(clip), "--artifacts", str(engines), "--fidelity", fidelity,
              "--out", str(work / f"{clip.stem}-{fidelity}.wav"), "--json",
              str(work / f"{clip.stem}-{fidelity}.json"), "--force", "--quiet"])


if __name__ == "__main__":
    main()
