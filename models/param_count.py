"""Parameter counts per stage, and a table per preset.

    python -m echostream.models.param_count [--preset NAME ...] [--markdown]

Models are built on the ``meta`` device (shapes only, no memory, no init cost). Tied tensors are
counted once in ``total``; buffers (BatchNorm statistics) are not parameters. ``total`` excludes
the vocoder, as StreamSpeech's 70 M does (its CodeHiFiGAN is a separate, frozen model).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
from torch import nn

from echostream.config import PRESETS, EchoStreamConfig, get_preset

# Report label -> model attribute(s) counted under it. The T2U encoder lives inside unit_decoder.
STAGES: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder",),
    "asr_ctc": ("asr_ctc",),
    "st_ctc": ("st_ctc",),
    "mt_decoder": ("mt_decoder",),
    "t2u+unit_decoder": ("t2u", "unit_decoder"),
    "vocoder": ("vocoder",),
}
NOT_IN_TOTAL = ("vocoder",)

# streamspeech-facts.md §9 (released StreamSpeech, computed from its configs).
STREAMSPEECH_REFERENCE = {
    "encoder": 33.45e6,
    "asr_ctc": 1.54e6,
    "st_ctc": 1.54e6,
    "mt_decoder": 18.84e6,
    "t2u+unit_decoder": 6.31e6 + 8.92e6,
    "vocoder": 13.5e6,  # §7, "about"
    "total": 70.6e6,
}


def _stage_params(model: nn.Module, attrs: tuple[str, ...]) -> dict[int, nn.Parameter] | None:
    """Parameters (by id, tied ones once) of the model's submodules named ``attrs``; None if it
    has none of them."""
    modules = [getattr(model, a) for a in attrs if isinstance(getattr(model, a, None), nn.Module)]
    if not modules:
        return None
    return {id(p): p for m in modules for p in m.parameters()}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{stage: parameters}`` for the stages the model has (see ``STAGES``), plus ``other``
    (parameters outside every stage, only when there are some) and ``total`` (every parameter,
    tied ones once, except those only the vocoder uses)."""
    counts: dict[str, int] = {}
    staged: set[int] = set()
    excluded: set[int] = set()
    kept: set[int] = set()
    for label, attrs in STAGES.items():
        params = _stage_params(model, attrs)
        if params is None:
            continue
        counts[label] = sum(p.numel() for p in params.values())
        staged |= params.keys()
        (excluded if label in NOT_IN_TOTAL else kept).update(params)
    everything = list(model.parameters())  # nn.Module.parameters() yields a tied tensor once
    other = sum(p.numel() for p in everything if id(p) not in staged)
    if other:
        counts["other"] = other
    counts["total"] = sum(p.numel() for p in everything if id(p) in kept or id(p) not in excluded)
    return counts


def build_for_counting(cfg: EchoStreamConfig,
                       factory: Callable[[EchoStreamConfig], nn.Module] | None = None) -> nn.Module:
    """``factory(cfg)`` on the meta device (falls back to CPU for modules that cannot be built
    there)."""
    if factory is None:
        from .weights import default_factory

        factory = default_factory()
    try:
        with torch.device("meta"):
            return factory(cfg)
    except (NotImplementedError, RuntimeError):
        return factory(cfg)


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f} M"


def format_table(preset: str, counts: dict[str, int], markdown: bool = False) -> str:
    """One preset's counts as text (or a markdown table), with the released StreamSpeech
    reference and the deviation for the ``streamspeech`` preset."""
    ref = STREAMSPEECH_REFERENCE if preset == "streamspeech" else {}
    header = ["stage", "parameters", "millions"] + (["reference", "deviation"] if ref else [])
    rows = []
    for label, n in counts.items():
        row = [label, f"{n:,}", _millions(n)]
        if ref:
            r = ref.get(label)
            row += [_millions(r), f"{100 * (n - r) / r:+.2f} %"] if r else ["", ""]
        rows.append(row)
    title = f"preset {preset}" + (" (total excludes the vocoder)" if "vocoder" in counts else "")
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([title, fmt(header), *(fmt(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echostream.models.param_count",
                                     description="Parameter counts per stage for each preset.")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="preset to count (repeatable; default: all)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args(argv)
    tables = []
    for name in args.preset or list(PRESETS):
        counts = count_parameters(build_for_counting(get_preset(name)))
        tables.append(format_table(name, counts, args.markdown))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
