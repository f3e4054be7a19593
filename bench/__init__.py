"""Benchmarks (``echostream bench``): the command and its measurement parts, FLOP counting, report.

``command`` (the CLI: runs the parts, writes bench.json / bench.md / bench.png) beside one concept
per module: ``timing`` (warm-up + min/median/max), ``machine`` (CPU, versions, measured GEMM peak),
``flops`` (FLOPs of an ONNX graph), ``position`` (cost vs stream position), ``pipeline`` (translate
RTF and per-stage breakdown), ``streams`` (throughput and latency vs concurrent streams),
``stage_times`` (per-stage backend times), ``memory`` (peak RSS of translate), ``windows`` (what
sentence-sized windows cost), ``speech`` (espeak-ng input), ``soak`` (hours of audio) and
``report`` (targets, markdown, plot).
"""
