"""The runtime runs with torch absent: a subprocess whose importer refuses 'torch' loads the tiny
artifacts and runs a few chained steps of every stage on ONNX Runtime."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"

SCRIPT = textwrap.dedent('''
    import sys

    class BlockTorch:
        """Refuse torch (and anything under it) like an environment where it is not installed."""
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, BlockTorch())

    import numpy as np
    from echostream.errors import BackendUnavailable
    from echostream.runtime.artifacts import load_artifacts
    from echostream.runtime.backends import load_stages, load_stage

    artifacts = load_artifacts(sys.argv[1])
    stages = load_stages(artifacts, "onnxruntime", threads=1)
    rng = np.random.default_rng(0)
    cfg, B = artifacts.config, 2

    def data(spec, stage):
        shape = spec.concrete_shape(B)
        if spec.name == "is_pad":
            return np.zeros(shape, np.int32)
        if spec.dtype == "int32":
            high = cfg["ctc"]["tgt_vocab_size"] if stage == "mt_decoder" else cfg["vocoder"]["num_units"]
            low = 0 if stage == "mt_decoder" else -1
            return rng.integers(low, high, shape).astype(np.int32)
        return rng.standard_normal(shape).astype(np.float32)

    source = stages["mt_source"]
    source_state = source.initial_state(B)
    for name, stage in stages.items():
        contract = stage.contract
        state = stage.initial_state(B) if contract.states else None
        for step in range(3):
            if name == "mt_decoder":  # context comes from mt_source, as in the runtime
                _, source_state = source.run({"x": data(source.contract.data_inputs[0], "mt_source")},
                                             source_state)
            context = source_state if contract.context else None
            inputs = {s.name: data(s, name) for s in contract.data_inputs}
            outputs, state = stage.run(inputs, state, context)
            for spec in contract.data_outputs:
                value = outputs[spec.name]
                assert value.shape == spec.concrete_shape(B), (name, spec.name, value.shape)
                assert np.isfinite(value).all(), (name, spec.name)
        if contract.states:
            counter = [s.name for s in contract.states if s.dtype == "int32"][0]
            assert state[counter].min() >= 1, (name, state[counter])
        print("ran", name)

    from echostream.runtime.translator import Translator
    translator = Translator.from_loaded(artifacts, "onnxruntime", threads=1)
    streams = [translator.create_stream() for _ in range(2)]
    for s in streams:
        s.accept_waveform(16000, (0.1 * rng.standard_normal(16000)).astype(np.float32))
        s.input_finished()
    assert all(events[-1].kind == "end" for events in translator.decode_streams(streams))
    leaked = [m for m in sys.modules if m.startswith(("echostream.models", "echostream.export"))]
    assert not leaked, leaked
    print("translated without models/export")

    try:
        load_stage(artifacts, "encoder", backend="torch")
    except BackendUnavailable as exc:
        print("torch backend unavailable:", exc)
    else:
        raise AssertionError("the torch backend loaded although torch is blocked")
    assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
    print("no torch imported")
''')


def test_runtime_runs_every_stage_without_torch(tiny_artifacts_dir):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_artifacts_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in ("encoder", "st_ctc", "mt_source", "mt_decoder", "unit_decoder", "duration", "vocoder"):
        assert f"ran {stage}" in proc.stdout
    assert "translated without models/export" in proc.stdout
    assert "torch backend unavailable" in proc.stdout
    assert "no torch imported" in proc.stdout


def _runtime_imports() -> list[tuple[str, int, str]]:
    """(file name, line, imported module) of every import statement under ``runtime/``."""
    found = []
    for path in sorted(RUNTIME.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path.name, node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.append((path.name, node.lineno, node.module))
    return found


def test_runtime_sources_never_import_torch():
    """Static twin of the subprocess test: no runtime module mentions torch in an import."""
    offenders = [f"{f}:{line} {n}" for f, line, n in _runtime_imports()
                 if n == "torch" or n.startswith("torch.")]
    assert not offenders, offenders


def test_runtime_sources_never_import_models_or_export():
    """The runtime depends on nothing of ours but the core (``echostream/``): no import statement
    names ``echostream.models`` or ``echostream.export`` (the torch backend is reached through the
    registry by module name, only when asked for)."""
    offenders = [f"{f}:{line} {n}" for f, line, n in _runtime_imports()
                 if n.startswith(("echostream.models", "echostream.export"))]
    assert not offenders, offenders
