"""Benchmarks of issue #6 (``echostream bench``): measurement parts, FLOP counting, report and plot.

The command lives in ``echostream.export.bench``; this package holds one concept per module:
``timing`` (warm-up + min/median/max), ``machine`` (CPU, versions, measured GEMM peak), ``flops``
(FLOPs of an ONNX graph), ``position`` (cost vs stream position), ``pipeline`` (translate RTF and
per-stage breakdown), ``stage_times`` (per-stage backend times), ``memory`` (peak RSS of translate),
``speech`` (espeak-ng input) and ``report`` (targets, markdown, plot).
"""
