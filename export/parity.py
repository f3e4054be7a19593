"""``echostream parity``: every stage graph on a backend vs the PyTorch reference it was exported from.

Checks (DESIGN §8; reference/tensorrt-onnx-deployment.md §3.5 — drift through caches is what a
single call misses, so states are compared too, every step):

- ``zero-state chain``: ``--steps`` chained steps from a fresh stream, batch 2; each side is fed its
  own next state; data outputs and next states are compared at every step;
- ``random-state chain``: the same from random caches and random counters;
- ``batch positions`` (stateful stages): 3 streams warmed up to different positions, run batched on
  the backend == each stream run alone on the backend (a per-stream counter must make them
  independent);
- ``full utterance`` (encoder, st_ctc): the backend's step chain over a whole random utterance ==
  the PyTorch full-utterance ``forward`` (the streaming graph computes the offline model).

With ``--backend tensorrt`` each stage also gets a ``polygraphy single step`` row: polygraphy's
``TrtRunner`` on the stage's plan and ``OnnxrtRunner`` on its ONNX graph (CPU provider), driven by
polygraphy's ``Comparator`` from the same feeds (random data, context and states as graph inputs),
one independent step per feed; it tells an engine bug from an export bug without PyTorch in the
loop. The chained checks stay ours: a comparator cannot feed a runner its own next state.

The reference is PyTorch: without it the command stops with one line saying what to install.

Metrics per check: max and mean absolute error and the lowest cosine similarity over all compared
tensors and steps; integer tensors (counters) must match exactly. Verdicts use the tolerance of the
backend and precision (DESIGN §8): fp32 ONNX Runtime max abs 1e-4, fp32 TensorRT 1e-3, fp16 cosine
>= 0.999. The comparison is plain numpy: a polygraphy ``Comparator`` drives each runner from a data
loader, which cannot feed a runner's own next state back step after step.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from echostream.contract import ALL_STAGE_NAMES
from echostream.runtime.artifacts import PRECISIONS
from echostream.runtime.backends import BACKENDS
from echostream.errors import BackendUnavailable

POLYGRAPHY_CHECK = "polygraphy single step (TensorRT vs ONNX Runtime)"
BATCH = 2
POSITIONS = (0, 1, 3)  # warm-up steps of the streams batched in the ``batch positions`` check


@dataclass(frozen=True)
class Tolerance:
    """A verdict rule: ``max_abs`` bound (fp32) or ``cosine`` lower bound (fp16)."""

    max_abs: float | None = None
    cosine: float | None = None

    def passes(self, max_abs: float, cosine: float) -> bool:
        if not math.isfinite(max_abs):  # NaN/inf outputs fail whatever the rule
            return False
        if self.max_abs is not None and not max_abs <= self.max_abs:
            return False
        return self.cosine is None or cosine >= self.cosine

    def __str__(self) -> str:
        return f"max abs <= {self.max_abs:.0e}" if self.max_abs is not None else f"cosine >= {self.cosine}"


def tolerance(backend: str, precision: str) -> Tolerance:
    """DESIGN §8 tolerances. The torch backend is the reference itself: chains are exact, and
    batched vs alone differs only by BLAS blocking (~1e-6)."""
    if precision == "fp16":
        return Tolerance(cosine=0.999)
    return {"onnxruntime": Tolerance(max_abs=1e-4), "tensorrt": Tolerance(max_abs=1e-3),
            "torch": Tolerance(max_abs=1e-5)}[backend]


@dataclass
class Comparison:
    """Running error statistics over every tensor compared for one check."""

    max_abs: float = 0.0
    abs_sum: float = 0.0
    count: int = 0
    cosine: float = 1.0
    worst: str = ""
    int_mismatch: list[str] = field(default_factory=list)

    def add(self, name: str, want: np.ndarray, got: np.ndarray) -> None:
        """Compare one tensor (``want`` = reference). Shapes must agree exactly."""
        if want.shape != got.shape:
            raise ValueError(f"{name}: shape expected {list(want.shape)}, got {list(got.shape)}")
        if np.issubdtype(want.dtype, np.integer):
            if not np.array_equal(want, got):
                self.int_mismatch.append(name)
            return
        w, g = want.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        diff = np.abs(w - g)
        worst = float(diff.max()) if diff.size else 0.0
        if not np.isfinite(worst):
            worst = math.inf
        if worst > self.max_abs:
            self.max_abs, self.worst = worst, name
        self.abs_sum += float(diff.sum())
        self.count += diff.size
        self.cosine = min(self.cosine, cosine_similarity(w, g))

    def add_all(self, prefix: str, want: Mapping[str, np.ndarray] | None,
                got: Mapping[str, np.ndarray] | None) -> None:
        want, got = want or {}, got or {}
        if set(want) != set(got):
            raise ValueError(f"{prefix}: tensors expected {sorted(want)}, got {sorted(got)}")
        for name in want:
            self.add(f"{prefix}{name}", np.asarray(want[name]), np.asarray(got[name]))

    @property
    def mean_abs(self) -> float:
        return self.abs_sum / self.count if self.count else 0.0


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two flat vectors; 1.0 when both are (numerically) zero, 0.0 when only one is."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na < 1e-30 and nb < 1e-30:
        return 1.0
    if na < 1e-30 or nb < 1e-30 or not (np.isfinite(na) and np.isfinite(nb)):
        return 0.0
    cos = float(np.dot(a, b) / (na * nb))
    return cos if math.isfinite(cos) else 0.0


@dataclass
class CheckResult:
    stage: str
    check: str
    max_abs: float
    mean_abs: float
    cosine: float
    tolerance: Tolerance
    passed: bool
    detail: str = ""


def _result(stage: str, check: str, cmp: Comparison, tol: Tolerance) -> CheckResult:
    passed = tol.passes(cmp.max_abs, cmp.cosine) and not cmp.int_mismatch
    detail = f"integer mismatch: {', '.join(cmp.int_mismatch)}" if cmp.int_mismatch else \
        (f"worst: {cmp.worst}" if cmp.worst else "")
    return CheckResult(stage, check, cmp.max_abs, cmp.mean_abs, cmp.cosine, tol, passed, detail)


# ---- the checks -----------------------------------------------------------------------------------


class _Feeds:
    """Seeded random inputs shared by both sides (torch generator -> numpy)."""

    def __init__(self, cfg: dict[str, Any], seed: int):
        import torch

        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(seed)

    def data(self, contract, batch: int) -> dict[str, np.ndarray]:
        from echostream.export.onnx_export import random_data

        return _to_numpy(random_data(contract, self.cfg, batch, self.gen))

    def context(self, contract, batch: int) -> dict[str, np.ndarray] | None:
        from echostream.export.onnx_export import random_context

        return _to_numpy(random_context(contract, batch, self.gen)) if contract.context else None

    def state(self, contract, batch: int) -> dict[str, np.ndarray] | None:
        from echostream.models.state import random_state

        return _to_numpy(random_state(contract, batch, self.gen)) if contract.states else None


def chain_check(ref, dut, feeds: _Feeds, steps: int, init: str, batch: int = BATCH) -> Comparison:
    """``steps`` chained steps on both sides from the same zero or random state."""
    contract = ref.contract
    state = ref.initial_state(batch) if init == "zero" else feeds.state(contract, batch)
    state_r = state_d = state if contract.states else None
    context = feeds.context(contract, batch)
    cmp = Comparison()
    for step in range(steps):
        inputs = feeds.data(contract, batch)
        out_r, state_r = ref.run(inputs, state_r, context)
        out_d, state_d = dut.run(inputs, state_d, context)
        cmp.add_all(f"step {step} ", out_r, out_d)
        if contract.states:
            cmp.add_all(f"step {step} next_", state_r, dut.state_to_host(state_d))
    return cmp


def batch_positions_check(ref, dut, feeds: _Feeds, steps: int) -> Comparison:
    """Streams at ``POSITIONS`` run batched on ``dut`` == each run alone on ``dut``."""
    contract = ref.contract
    streams = []
    for warmup in POSITIONS:  # warm each stream up alone on the reference
        state, context = ref.initial_state(1), feeds.context(contract, 1)
        for _ in range(warmup):
            _, state = ref.run(feeds.data(contract, 1), state, context)
        streams.append((state, context))
    stack = lambda dicts: None if dicts[0] is None else {  # noqa: E731
        k: np.concatenate([d[k] for d in dicts]) for k in dicts[0]}
    batched_state = stack([s for s, _ in streams])
    batched_context = stack([c for _, c in streams])
    alone = [s for s, _ in streams]
    cmp = Comparison()
    for step in range(steps):
        inputs = feeds.data(contract, len(POSITIONS))
        out_b, batched_state = dut.run(inputs, batched_state, batched_context)
        host_b = dut.state_to_host(batched_state)
        for i, (_, context) in enumerate(streams):
            row = {k: v[i:i + 1] for k, v in inputs.items()}
            out_i, alone[i] = dut.run(row, alone[i], context)
            cmp.add_all(f"step {step} stream {i} ", out_i, {k: v[i:i + 1] for k, v in out_b.items()})
            cmp.add_all(f"step {step} stream {i} next_", dut.state_to_host(alone[i]),
                        {k: v[i:i + 1] for k, v in host_b.items()})
    return cmp


def full_utterance_check(model, stage: str, dut, feeds: _Feeds, steps: int) -> Comparison:
    """The backend's step chain over a whole utterance == the PyTorch full-utterance forward.

    The chunk Conformer's utterance ends inside its last chunk (``valid_frames`` < 4C there), and
    where a block holds two chunks the reference is each chunk as the pass over the prefix ending
    there computes it (``ChunkConformerEncoder.chunk_outputs``; the full pass at every block end).
    """
    import torch

    from echostream.contract import encoder_has_valid_input, encoder_hop_frames, encoder_step_frames

    cfg, S = feeds.cfg, encoder_step_frames(feeds.cfg)
    hop, partial = encoder_hop_frames(cfg), stage == "encoder" and encoder_has_valid_input(cfg)
    # Emformer: 4(steps * S + R) frames, T = steps * S output frames, every window on real frames.
    frames = hop * steps + 4 * cfg["encoder"]["right_context"] - (hop // 2 - 1 if partial else 0)
    features = torch.randn(1, frames, cfg["encoder"]["input_dim"], generator=feeds.gen)
    with torch.inference_mode():
        enc = _reference_frames(model.encoder, features)  # [1, T, D]
        want = {"y": enc, "asr_log_probs": model.asr_ctc(enc)} if stage == "encoder" else \
            {"y": model.st_ctc(enc.transpose(0, 1)).transpose(0, 1)}
    state, cmp = dut.initial_state(1), Comparison()
    for k in range(steps):
        inputs = _encoder_feed(cfg, features, k) if stage == "encoder" else \
            {"x": enc[:, k * S:(k + 1) * S].numpy()}
        out, state = dut.run(inputs, state)
        n = min(S, enc.shape[1] - k * S)  # valid frames of this step (fewer in a partial chunk)
        for name, value in out.items():
            cmp.add(f"frames {k * S}-{k * S + n - 1} {name}", want[name][:, k * S:k * S + n].numpy(),
                    value[:, :n])
    return cmp


def _reference_frames(encoder, features):
    """``[1, T, D]`` what the chained encoder steps must emit for ``features`` ``[1, F, 80]``."""
    if hasattr(encoder, "chunk_outputs"):
        return encoder.chunk_outputs(features[0]).unsqueeze(0)
    return encoder(features)["encoder_out"][0].transpose(0, 1)


def _encoder_feed(cfg: dict[str, Any], features, k: int) -> dict[str, np.ndarray]:
    """Encoder step ``k``'s inputs over a whole utterance ``[1, F, 80]``."""
    from echostream.contract import (encoder_has_valid_input, encoder_hop_frames,
                                     encoder_window_frames, encoder_window_lead)
    from echostream.models.subsampling import step_window

    hop = encoder_hop_frames(cfg)
    x = step_window(features, k, hop, encoder_window_frames(cfg), encoder_window_lead(cfg))
    feed = {"x": x.numpy()}
    if encoder_has_valid_input(cfg):
        feed["valid_frames"] = np.array([min(hop, features.shape[1] - k * hop)], np.int32)
    return feed


# ---- polygraphy single-step rows -----------------------------------------------------------------


def single_step_feeds(contract, feeds: _Feeds, iterations: int, batch: int = BATCH) -> list[dict]:
    """``iterations`` feed dicts holding every graph input (data, context, a random state)."""
    out = []
    for _ in range(iterations):
        feed = dict(feeds.data(contract, batch))
        feed.update(feeds.context(contract, batch) or {})
        feed.update(feeds.state(contract, batch) or {})
        out.append(feed)
    return out


def onnxrt_runner(artifacts, stage: str, name: str | None = None):
    """Polygraphy's ONNX Runtime runner on the stage's graph, CPU provider (the reference side)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(artifacts.stage_path(stage)), providers=["cpu"]),
                        name=name or f"onnxrt {stage}")


def trt_runner(artifacts, stage: str, device: int = 0, name: str | None = None):
    """Polygraphy's TensorRT runner on the stage's plan, refused like ``TrtStage`` refuses it
    (plan built with another TensorRT version or on another GPU)."""
    from echostream.runtime.tensorrt_backend import (check_plan_compatible, engine_entry, gpu_info,
                                                     import_tensorrt, set_device, trt_logger)

    trt = import_tensorrt()
    entry = engine_entry(artifacts.manifest, stage, artifacts.precision)
    check_plan_compatible(entry, trt.__version__, gpu_info(device))
    set_device(device)
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    trt_logger(trt)  # polygraphy's runtime gets the process logger
    return TrtRunner(EngineFromPath(str(artifacts.root / entry["file"])), name=name or f"tensorrt {stage}")


def polygraphy_single_step(ref_runner, dut_runner, feeds: list[dict]) -> Comparison:
    """Both runners on the same feeds through polygraphy's ``Comparator``; every output of every
    iteration compared (``ref_runner`` = reference)."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    with contextlib.redirect_stdout(sys.stderr), G_LOGGER.verbosity(G_LOGGER.WARNING):
        results = Comparator.run([ref_runner, dut_runner], data_loader=feeds)
    cmp = Comparison()
    want_all, got_all = results[ref_runner.name], results[dut_runner.name]
    if len(want_all) != len(feeds) or len(got_all) != len(feeds):
        raise ValueError(f"polygraphy ran {len(want_all)}/{len(got_all)} iterations, expected {len(feeds)}")
    for i, (want, got) in enumerate(zip(want_all, got_all)):
        cmp.add_all(f"iteration {i} ", dict(want), dict(got))
    return cmp


def polygraphy_rows(artifacts, stages: Iterable[str], iterations: int, seed: int, tol: Tolerance,
                    dut_runner=trt_runner, ref_runner=onnxrt_runner,
                    check: str = POLYGRAPHY_CHECK) -> list[CheckResult]:
    """One ``check`` row per stage: ``dut_runner(artifacts, stage)`` vs
    ``ref_runner(artifacts, stage)`` over ``iterations`` independent steps."""
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise BackendUnavailable("the polygraphy single-step rows need polygraphy (pip install "
                                 "'echostream[gpu-cu13]' or 'echostream[gpu-cu12]')") from None
    rows = []
    for stage in stages:
        contract = artifacts.contract(stage)
        feeds = single_step_feeds(contract, _Feeds(artifacts.config, seed + 100 + ALL_STAGE_NAMES.index(stage)),
                                  iterations)
        cmp = polygraphy_single_step(ref_runner(artifacts, stage), dut_runner(artifacts, stage), feeds)
        rows.append(_result(stage, check, cmp, tol))
    return rows


def require_reference() -> None:
    """The PyTorch reference backend, or the registry's one-line BackendUnavailable."""
    from echostream.runtime.backends import backend_module

    try:
        backend_module("torch")
    except BackendUnavailable as exc:
        raise BackendUnavailable(f"parity compares against the PyTorch reference: {exc}") from None


def run_parity(artifacts, backend: str = "onnxruntime", steps: int = 12, seed: int = 0,
               stages: Iterable[str] | None = None, backend_options: dict[str, Any] | None = None,
               ) -> list[CheckResult]:
    """Every check on every stage of a loaded ``Artifacts``; returns one row per (stage, check)
    (plus, on TensorRT, one polygraphy single-step row per stage)."""
    if steps < 1:
        raise ValueError(f"steps expected >= 1, got {steps}")
    require_reference()
    from echostream.export.torch_backend import TorchStage, load_reference_model
    from echostream.runtime.backends import load_stage

    model = load_reference_model(artifacts)
    tol = tolerance(backend, artifacts.precision)
    options = dict(backend_options or {})
    if backend == "onnxruntime":
        options.setdefault("deterministic", True)
    results = []
    for stage in stages or artifacts.stages:
        ref = TorchStage(model, stage)
        dut = load_stage(artifacts, stage, backend, **options)
        feeds = _Feeds(artifacts.config, seed + ALL_STAGE_NAMES.index(stage))
        first = "zero-state chain" if ref.contract.states else "random inputs"
        checks = [(first, lambda: chain_check(ref, dut, feeds, steps, "zero"))]
        if ref.contract.states:
            checks += [("random-state chain", lambda: chain_check(ref, dut, feeds, steps, "random")),
                       ("batch positions", lambda: batch_positions_check(ref, dut, feeds, min(steps, 4)))]
        if stage == "encoder" or (stage == "st_ctc" and ref.contract.states):
            checks.append(("full utterance", lambda: full_utterance_check(model, stage, dut, feeds, steps)))
        for name, check in checks:
            results.append(_result(stage, name, check(), tol))
        if backend == "tensorrt":
            device = options.get("device", 0)
            results += polygraphy_rows(artifacts, [stage], steps, seed, tol,
                                       dut_runner=lambda a, s: trt_runner(a, s, device))
    return results


def format_table(results: list[CheckResult]) -> str:
    rows = [("stage", "check", "max abs", "mean abs", "cosine", "tolerance", "verdict", "")]
    for r in results:
        rows.append((r.stage, r.check, f"{r.max_abs:.2e}", f"{r.mean_abs:.2e}", f"{r.cosine:.6f}",
                     str(r.tolerance), "PASS" if r.passed else "FAIL", r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# ---- CLI ------------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", type=Path, help="artifacts folder (engines/<name>)")
    parser.add_argument("--backend", choices=list(BACKENDS), default="onnxruntime")
    parser.add_argument("--steps", type=int, default=12, help="chained steps per check (>= 10 recommended)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--stages", nargs="+", choices=ALL_STAGE_NAMES, metavar="STAGE",
                        help="stages to check (default: every stage in the artifacts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every artifact file (by default a file unchanged since its "
                             "sha256 last matched is not re-read)")


def main(args: argparse.Namespace) -> int:
    from echostream.runtime.artifacts import load_artifacts

    if args.steps < 1:
        print("echostream parity: error: --steps expected >= 1", file=sys.stderr)
        return 2
    require_reference()  # before reading anything: without PyTorch there is nothing to compare to
    artifacts = load_artifacts(args.artifacts, args.precision, rehash=args.verify)
    results = run_parity(artifacts, args.backend, args.steps, args.seed, args.stages)
    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed "
          f"({args.backend}, {args.precision}, {args.steps} steps)")
    return 1 if failed else 0


def _to_numpy(tensors) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tensors.items()}
