"""Serving on Triton Inference Server: the generated model repository, the real ``tritonserver`` on
127.0.0.1 (CPU, the ``tiny`` artifacts), the gRPC streaming client and the ``translate --server`` /
``serve`` commands.

Every server a test starts is stopped by it (module fixtures stop theirs at the end of the module);
request loops are bounded. The tests skip, with the reason, when no ``tritonserver``, no
``tritonclient`` or no model environment (NumPy < 2 for the Python-backend stub) is installed:
``scripts/setup.sh`` installs all three.
"""
from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from echostream.cli import main as cli_main
from echostream.runtime import triton_protocol as wire
from echostream.runtime.events import SpeechChunk
from echostream.runtime.triton_repo import write_repository

from test_translator import translate

RATE = 16000
SEGMENT = 5120  # 320 ms at 16 kHz
IDLE_S = 1.0


def _speech_like(seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 100 + 25 * seed
    phase = 2 * np.pi * np.cumsum(pitch + 30 * np.sin(2 * np.pi * 0.8 * t)) / rate
    voiced = sum(np.sin(h * phase) / h for h in range(1, 20))
    envelope = np.clip(np.sin(2 * np.pi * (1.5 + 0.2 * seed) * t), 0, None) ** 2
    return (0.25 * envelope * voiced + 0.002 * rng.standard_normal(t.size)).astype(np.float32)


# ---- what it takes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_setup():
    """(server binary, model environment), or a skip naming what is missing."""
    from echostream.errors import EchoStreamError
    from echostream.runtime.triton_server import find_tritonserver, resolve_model_env

    try:
        importlib.import_module("tritonclient.grpc")
    except ImportError as exc:
        pytest.skip(f"tritonclient[grpc] is not installed ({exc}); scripts/setup.sh installs it")
    try:
        binary = find_tritonserver()
        env = resolve_model_env(None, binary)
    except EchoStreamError as exc:
        pytest.skip(f"Triton cannot run here: {exc}")
    return binary, env


@pytest.fixture(scope="module")
def repo(tiny_artifacts_dir, tmp_path_factory) -> Path:
    # --threads 1: the same ONNX Runtime settings as the in-process reference below.
    return write_repository(tiny_artifacts_dir, tmp_path_factory.mktemp("triton") / "repo",
                            copy=False, idle_timeout_s=IDLE_S, max_sequences=16, threads=1)


def _server(repo: Path, setup, log: Path | None = None):
    from echostream.runtime.triton_server import TritonServer, free_port

    binary, env = setup
    return TritonServer(repo, free_port(), free_port(), free_port(), binary, env, log).start(60)


@pytest.fixture(scope="module")
def server(repo, triton_setup, tmp_path_factory):
    srv = _server(repo, triton_setup, tmp_path_factory.mktemp("triton-log") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(tiny_artifacts_dir):
    from echostream.runtime.endpoint import EndpointConfig
    from echostream.runtime.translator import Translator

    # The served model's rules: `triton-repo` defaults to `translate`'s (endpointing on).
    return Translator.from_artifacts(tiny_artifacts_dir, threads=1, endpoint=EndpointConfig())


def _in_process(translator, audio: np.ndarray, rate: int = RATE, segment: int = SEGMENT):
    return translate(translator, audio, segment, rate)[0]


def _remote(client, audio: np.ndarray, rate: int = RATE, segment: int = SEGMENT, sequence_id=None):
    with client.create_stream(sequence_id) as stream:
        events = []
        for i in range(0, len(audio), segment):
            events += stream.accept_waveform(rate, audio[i:i + segment])
        return events + stream.finish()


def _assert_same_events(got, want) -> None:
    """Ids, texts, delays exactly; speech samples within 1e-5."""
    assert [e.kind for e in got] == [e.kind for e in want]
    for g, w in zip(got, want):
        if isinstance(w, SpeechChunk):
            assert (g.unit_ids, g.source_ms, g.sample_rate, len(g.samples)) == \
                (w.unit_ids, w.source_ms, w.sample_rate, len(w.samples))
            if len(w.samples):
                assert float(np.max(np.abs(g.samples - w.samples))) <= 1e-5
        else:
            assert g == w


def _metrics(server):
    from echostream.runtime.triton_server import read_metrics

    return read_metrics(server.metrics_url)


def _metric(server, name: str, **labels) -> float:
    from echostream.runtime.triton_server import metric_sum

    return metric_sum(_metrics(server), name, **labels)


def _counted(server, name: str, before: float, expected: int) -> float:
    """Triton's counter ``name`` minus ``before``, once it reached ``expected`` (the backend
    records a request's statistics just after its response went out) or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        value = _metric(server, name, model="echostream") - before
        if value >= expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# ---- the wire format and the repository (no server) ------------------------------------------


def test_events_cross_the_wire_exactly(local):
    events = _in_process(local, _speech_like(2.0, 1))
    assert {e.kind for e in events} >= {"asr", "translation", "speech", "end_of_sentence", "end"}
    payload, speech = wire.encode_events(events)
    assert speech.dtype == np.float32
    assert speech.size == sum(len(e.samples) for e in events if isinstance(e, SpeechChunk))
    back = wire.decode_events(payload, speech)
    _assert_same_events(back, events)
    assert [getattr(e, "compute_ms") for e in back] == [e.compute_ms for e in events]
    with pytest.raises(wire.WireError, match="claim"):
        wire.decode_events(payload, speech[:-1])
    with pytest.raises(wire.WireError, match="wire version"):
        wire.decode_events(json.dumps({"v": 99, "events": []}).encode(), np.zeros(0))


def test_triton_repo_writes_the_sequence_batched_python_model(tiny_artifacts_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    rc = cli_main(["triton-repo", str(tiny_artifacts_dir), "--out", str(out), "--instances", "3",
                   "--max-sequences", "12", "--idle-timeout-s", "7.5", "--max-queue-delay-us", "500"])
    assert rc == 0, capsys.readouterr().err
    config = (out / "echostream" / "config.pbtxt").read_text()
    for line in ('name: "echostream"', 'backend: "python"', "max_batch_size: 12",
                 "max_sequence_idle_microseconds: 7500000", "max_candidate_sequences: 12",
                 "max_queue_delay_microseconds: 500", "kind: CONTROL_SEQUENCE_START",
                 "kind: CONTROL_SEQUENCE_END", "kind: CONTROL_SEQUENCE_CORRID",
                 "data_type: TYPE_UINT64", 'name: "AUDIO"', "allow_ragged_batch: true",
                 'name: "SAMPLE_RATE"', 'name: "EVENTS"', "data_type: TYPE_STRING",
                 'name: "SPEECH"', "count: 3", "kind: KIND_CPU", 'key: "manifest_sha256"'):
        assert line in config, line
    assert "oldest {" in config and "direct" not in config
    assert "TritonPythonModel" in (out / "echostream" / "1" / "model.py").read_text()
    # The artifacts were copied, and still verify.
    from echostream.runtime.artifacts import load_artifacts

    load_artifacts(out / "echostream" / "1" / "artifacts", rehash=True)
    # No clobbering without --force; tensorrt instances are GPU instances.
    assert cli_main(["triton-repo", str(tiny_artifacts_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"echostream triton-repo: error: --out {out} exists; pass --force to replace it"]
    assert cli_main(["triton-repo", str(tiny_artifacts_dir), "--out", str(out), "--force",
                     "--reference", "--stage-backend", "tensorrt"]) == 0
    config = (out / "echostream" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in config and str(Path(tiny_artifacts_dir).resolve()) in config
    assert not (out / "echostream" / "1" / "artifacts").exists()


def test_triton_repo_refuses_bad_input_before_writing(tiny_artifacts_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    for argv, fragment in (
        (["--instances", "0"], "--instances expected an integer >= 1, got 0"),
        (["--segment-ms", "100"], "segment size the encoder cannot serve: segment_ms=100"),
        (["--idle-timeout-s", "0"], "--idle-timeout-s expected a positive number"),
        (["--threads", "2", "--stage-backend", "tensorrt"], "--threads applies to"),
    ):
        assert cli_main(["triton-repo", str(tiny_artifacts_dir), "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
        assert not out.exists()


# ---- the server ----------------------------------------------------------------------------------


def test_eight_concurrent_streams_each_equal_the_in_process_run(server, local):
    from echostream.runtime.triton_client import TritonTranslator

    client = TritonTranslator(server.grpc_url, timeout_s=60)
    assert client.segment_ms == 320
    audios = [_speech_like(1.6 + 0.35 * k, k) for k in range(8)]
    rates = [RATE] * 6 + [8000, 44100]  # two streams resampled on the server
    audios[6] = _speech_like(2.0, 6, rate=8000)
    audios[7] = _speech_like(2.0, 7, rate=44100)
    before_requests = _metric(server, "nv_inference_count", model="echostream")
    before_execs = _metric(server, "nv_inference_exec_count", model="echostream")
    results, errors = {}, {}

    def run(k):
        try:
            seg = rates[k] * 320 // 1000
            results[k] = _remote(client, audios[k], rates[k], seg)
        except Exception as exc:  # reported below
            errors[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for k in range(8):
        want = _in_process(local, audios[k], rates[k], rates[k] * 320 // 1000)
        assert want[-1].kind == "end" and any(e.kind == "translation" for e in want)
        _assert_same_events(results[k], want)
    expected = sum(-(-len(a) // (r * 320 // 1000)) + 1 for a, r in zip(audios, rates))
    requests = _counted(server, "nv_inference_count", before_requests, expected)
    execs = _metric(server, "nv_inference_exec_count", model="echostream") - before_execs
    assert requests == expected
    assert execs < requests  # one execute served several sequences' chunks (one decode round)
    assert _metric(server, "echostream_live_sequences") == 0


def test_a_nan_stream_gets_a_clear_error_and_the_others_carry_on(server, local):
    from echostream.runtime.triton_client import ChunkRefused, TritonTranslator

    client = TritonTranslator(server.grpc_url, timeout_s=60)
    audios = [_speech_like(2.0, 10 + k) for k in range(3)]
    bad = audios[1].copy()
    bad[2 * SEGMENT + 100] = np.nan  # in the third chunk
    results, refused = {}, []

    def run(k):
        with client.create_stream() as stream:
            events = []
            audio = bad if k == 1 else audios[k]
            for c, i in enumerate(range(0, len(audio), SEGMENT)):
                try:
                    events += stream.accept_waveform(RATE, audio[i:i + SEGMENT])
                except ChunkRefused as exc:
                    refused.append((k, c, str(exc)))
            results[k] = events + stream.finish()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(refused) == 1, refused
    k, chunk, message = refused[0]
    assert (k, chunk) == (1, 2)
    assert "refused chunk 3 of sequence" in message and "1 NaN/Inf sample(s)" in message
    assert "\n" not in message
    for k in (0, 2):
        _assert_same_events(results[k], _in_process(local, audios[k]))
    # The refused chunk left its stream as it was: the rest of it decoded as if never sent.
    skipped = np.concatenate([bad[:2 * SEGMENT], bad[3 * SEGMENT:]])
    _assert_same_events(results[1], _in_process(local, skipped))


_VANISHING_CLIENT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from echostream.runtime.triton_client import TritonTranslator
    client = TritonTranslator(sys.argv[1])
    streams = [client.create_stream() for _ in range(int(sys.argv[2]))]
    rng = np.random.default_rng(0)
    for _ in range(4):
        for s in streams:
            s.send(16000, (0.1 * rng.standard_normal(5120)).astype(np.float32))
        for s in streams:
            s.receive()
    print("sent", flush=True)
    time.sleep(60)
""")


def test_a_vanished_client_is_reclaimed_after_the_idle_timeout(server, local):
    from echostream.runtime.triton_client import TritonTranslator

    client = TritonTranslator(server.grpc_url)
    [stub] = server.stub_pids()

    def rss_mib() -> float:
        for line in Path(f"/proc/{stub}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    # Warm up with the same load, ended properly, so the baseline holds ORT's batch-16 buffers.
    threads = [threading.Thread(target=_remote, args=(client, _speech_like(1.3, k))) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert _metric(server, "echostream_live_sequences") == 0

    def vanish(n: int) -> tuple[float, float]:
        """n sequences left open by a client that is killed: (RSS while they live, seconds from
        the kill until the model reclaimed them all)."""
        proc = subprocess.Popen([sys.executable, "-c", _VANISHING_CLIENT, server.grpc_url, str(n)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "sent", proc.stderr.read()
            assert _metric(server, "echostream_live_sequences") == n
            during = rss_mib()
        finally:
            proc.kill()  # the client vanishes mid-sequence: no END, its gRPC streams just drop
            proc.wait()
        gone = time.monotonic()
        _wait_for(lambda: _metric(server, "echostream_live_sequences") == 0, IDLE_S + 10,
                  f"the {n} abandoned sequences to be reclaimed")
        return during, time.monotonic() - gone

    # A first round puts the heap where reclaiming leaves it (the reaper trims the C heap), the
    # level the second round must come back to.
    reclaimed = _metric(server, "echostream_sequences_total", outcome="reclaimed")
    vanish(16)
    time.sleep(0.5)
    level = rss_mib()
    during, took = vanish(16)
    assert IDLE_S <= took <= IDLE_S + 5
    assert _metric(server, "echostream_sequences_total", outcome="reclaimed") == reclaimed + 32
    time.sleep(0.5)  # the reaper trims just after it dropped them
    after = rss_mib()
    held = during - level  # what 16 live tiny streams hold: several MiB
    assert held > 2.0, (level, during, after)
    assert after <= level + 0.25 * held, (level, during, after)
    # The server serves on as before.
    audio = _speech_like(1.0, 3)
    _assert_same_events(_remote(client, audio), _in_process(local, audio))


def test_a_reclaimed_or_unknown_sequence_is_refused_by_name(server):
    from echostream.runtime.triton_client import ChunkRefused, RemoteStream

    stream = RemoteStream(server.grpc_url, "echostream", 424242)
    stream.sent = 1  # continue a sequence that was never started
    with pytest.raises(ChunkRefused, match="sequence 424242 .*must specify the START flag"):
        stream.accept_waveform(RATE, np.zeros(100, np.float32))
    stream.close()


def test_translate_with_server_prints_the_in_process_events(server, tiny_artifacts_dir, tmp_path,
                                                            capsys):
    wav = tmp_path / "in.wav"
    soundfile.write(str(wav), _speech_like(2.5, 4, rate=22050), 22050)
    assert cli_main(["translate", str(wav), "--artifacts", str(tiny_artifacts_dir), "--threads", "1",
                     "--json", str(tmp_path / "a.json")]) == 0
    local_out = capsys.readouterr().out.splitlines()
    for extra in ([], ["--realtime"]):
        assert cli_main(["translate", str(wav), "--server", server.grpc_url, *extra, "--force",
                         "--json", str(tmp_path / "b.json"), "--out", str(tmp_path / "b.wav")]) == 0
        remote_out = capsys.readouterr().out.splitlines()
        events = [line for line in local_out if line.startswith("[")]
        assert events and events == [line for line in remote_out if line.startswith("[")]
        for prefix in ("asr:", "translation:"):
            assert [x for x in local_out if x.startswith(prefix)] == \
                [x for x in remote_out if x.startswith(prefix)]
        a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
        assert b["server"] == server.grpc_url and b["artifacts"] is None
        strip = lambda evs: [{k: v for k, v in e.items() if k not in ("compute_ms", "wall_ms")}
                             for e in evs]
        assert strip(a["events"]) == strip(b["events"])
        assert a["metrics"]["text"]["AL"] == b["metrics"]["text"]["AL"]


def test_two_replicas_sequences_routed_by_id(server, repo, triton_setup, local):
    from echostream.runtime.triton_client import TritonTranslator, route

    other = _server(repo, triton_setup)
    try:
        urls = [server.grpc_url, other.grpc_url]
        ids = list(range(1000, 1040))
        routed = {u: [i for i in ids if route(i, urls) == u] for u in urls}
        assert all(len(v) >= 5 for v in routed.values()), routed  # both servers get sequences
        assert route(1000, list(reversed(urls))) == route(1000, urls)  # order does not matter
        chosen = routed[urls[0]][:3] + routed[urls[1]][:3]
        started = {u: _metric(s, "echostream_sequences_total", outcome="started")
                   for u, s in zip(urls, (server, other))}
        client = TritonTranslator(urls)
        audios = {i: _speech_like(1.2, i % 7) for i in chosen}
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, _remote(client, audios[i], sequence_id=i))) for i in chosen]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for u, s in zip(urls, (server, other)):
            assert _metric(s, "echostream_sequences_total", outcome="started") - started[u] == 3
        for i in chosen:
            _assert_same_events(results[i], _in_process(local, audios[i]))
    finally:
        other.stop()


def test_the_repository_carries_the_sentence_options_to_the_server(tiny_artifacts_dir, tmp_path,
                                                                   triton_setup, server, capsys):
    from echostream.runtime.endpoint import EndpointConfig
    from echostream.runtime.translator import Translator
    from echostream.runtime.triton_client import TritonTranslator

    out = tmp_path / "gated"
    assert cli_main(["triton-repo", str(tiny_artifacts_dir), "--out", str(out), "--reference",
                     "--threads", "1", "--endpoint-after-text-ms", "800", "--endpoint-no-text-ms",
                     "2000", "--endpoint-silence-floor", "-15"]) == 0, capsys.readouterr().err
    config = (out / "echostream" / "config.pbtxt").read_text()
    assert '\\"silence_floor\\": -15.0' in config and 'key: "fidelity"' in config
    rules = EndpointConfig(800, 2000, silence_floor=-15.0)
    gated = Translator.from_artifacts(tiny_artifacts_dir, threads=1, endpoint=rules)
    audio = np.concatenate([_speech_like(1.6, 1), np.zeros(2 * RATE, np.float32), _speech_like(1.6, 2)])
    want = _in_process(gated, audio)
    assert [e.reason for e in want if e.kind == "end_of_sentence"] == ["pause", "end_of_input"]
    srv = _server(out, triton_setup)
    try:
        _assert_same_events(_remote(TritonTranslator(srv.grpc_url, timeout_s=60), audio), want)
    finally:
        srv.stop()
    # The default repository has translate's default rules: no gate, so no pause on these weights.
    default = _remote(TritonTranslator(server.grpc_url, timeout_s=60), audio)
    assert [e.reason for e in default if e.kind == "end_of_sentence"] == ["end_of_input"]
    # A repository refuses what the model could not honour, in one line, before writing.
    assert cli_main(["triton-repo", str(tiny_artifacts_dir), "--out", str(tmp_path / "x"),
                     "--no-endpoint", "--endpoint-silence-floor", "-15"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--endpoint-silence-floor gates the endpoint rules" in err[0], err
    assert not (tmp_path / "x").exists()


def test_translate_with_server_refuses_the_models_options(server, tmp_path, capsys):
    wav = tmp_path / "in.wav"
    soundfile.write(str(wav), _speech_like(0.5, 1), RATE)
    for argv, flag in ((["--fidelity", "exact"], "--fidelity"), (["--no-endpoint"], "--endpoint"),
                       (["--endpoint-after-text-ms", "500"], "--endpoint-after-text-ms"),
                       (["--backend", "torch"], "--backend")):
        assert cli_main(["translate", str(wav), "--server", server.grpc_url, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"echostream translate: error: {flag}"), err
        assert "the served repository's (set them with `echostream triton-repo`)" in err[0]
    assert cli_main(["translate", str(wav), "--realtime", "--artifacts", "x"]) == 2
    assert capsys.readouterr().err.strip() == \
        "echostream translate: error: --realtime applies to --server only"


# ---- failures ----------------------------------------------------------------------------------


def test_a_server_killed_mid_stream_gives_the_client_one_line(repo, triton_setup, tmp_path):
    srv = _server(repo, triton_setup)
    try:
        wav = tmp_path / "long.wav"
        soundfile.write(str(wav), _speech_like(20.0, 2), RATE)
        proc = subprocess.Popen([sys.executable, "-m", "echostream.cli", "translate", str(wav),
                                 "--server", srv.grpc_url, "--realtime"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()
            assert first.startswith("["), first + proc.stderr.read()
            srv.kill()
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        srv.stop()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"echostream translate: error: the Triton server at {srv.grpc_url} "
                               "went away mid-stream (sequence ")


def test_tampered_artifacts_fail_to_load_and_serve_exits_non_zero(tiny_artifacts_copy, tmp_path,
                                                                   triton_setup):
    from echostream.runtime.triton_server import free_port

    repo = write_repository(tiny_artifacts_copy, tmp_path / "repo", copy=False)
    graph = tiny_artifacts_copy / "st_ctc.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    graph.write_bytes(bytes(data))
    log = tmp_path / "server.log"
    binary, env = triton_setup
    proc = subprocess.run(
        [sys.executable, "-m", "echostream.cli", "serve", str(repo), "--http-port", str(free_port()),
         "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--quiet",
         "--log", str(log), "--model-env", str(env.executable), "--tritonserver", str(binary.path)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"echostream serve: error: model 'echostream' failed to load: {graph}: "
                           "sha256 expected "), last
    assert "(file changed after export)" in last
    assert any(f"{graph}: sha256 expected" in line for line in log.read_text().splitlines())
    assert "ready" not in proc.stdout


def test_serve_says_where_it_listens_and_ctrl_c_stops_it(repo, triton_setup):
    from echostream.runtime.triton_server import free_port

    binary, env = triton_setup
    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "echostream.cli", "serve", str(repo), "--http-port", str(ports[0]),
         "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--quiet",
         "--model-env", str(env.executable), "--tritonserver", str(binary.path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        assert ready.startswith(f"echostream serve: ready: model 'echostream' on gRPC 127.0.0.1:{ports[1]}, "
                                f"HTTP 127.0.0.1:{ports[0]}, metrics http://127.0.0.1:{ports[2]}/metrics"), \
            ready + proc.stderr.read()
        children = _children(proc.pid)
        assert children  # tritonserver
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()
    assert "stopped (tritonserver exit status 0)" in proc.stderr.read()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def test_the_client_says_when_no_server_is_there():
    from echostream.runtime.triton_client import ServerGone, TritonTranslator
    from echostream.runtime.triton_server import free_port

    pytest.importorskip("tritonclient.grpc")
    url = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServerGone, match=f"cannot reach the Triton server at {url}"):
        TritonTranslator(url, timeout_s=5).create_stream()


# ---- the bench part ------------------------------------------------------------------------------


def test_bench_triton_part_measures_both_sides(tiny_artifacts_dir, triton_setup):
    from echostream.bench.report import check_targets, render_markdown
    from echostream.bench.triton import triton_streams

    pool = [_speech_like(1.0 + 0.3 * k, k) for k in range(3)]
    part = triton_streams(tiny_artifacts_dir, pool, [1, 3], threads=1, segment_ms=320,
                          log=lambda _m: None)
    assert part["available"] and [r["streams"] for r in part["runs"]] == [1, 3]
    for row in part["runs"]:
        local, remote = row["in_process"], row["triton"]
        n = row["streams"]
        assert local["audio_s"] == pytest.approx(remote["audio_s"])
        assert remote["audio_s"] == pytest.approx(sum(len(pool[i % 3]) for i in range(n)) / RATE)
        # every chunk of every stream plus its END request, and nothing else
        assert remote["requests"] == sum(-(-len(pool[i % 3]) // SEGMENT) + 1 for i in range(n))
        assert 1 <= remote["requests_per_execute"] <= n
        assert row["throughput_ratio"] == pytest.approx(remote["throughput"] / local["throughput"])
        assert 0 < remote["chunk_latency_p50_ms"] <= remote["chunk_latency_p95_ms"]
    rows = {r["target"]: r for r in check_targets({"triton": part})}
    row = rows["triton_over_in_process_16"]
    assert row["value"] == part["runs"][-1]["throughput_ratio"] and "at 3 streams" in row["what"]
    md = render_markdown({"machine": {"cpu_model": "x", "logical_cpus": 2, "gpu": None,
                                      "versions": {}},
                          "settings": {"threads": 1, "repeats": 1, "warmup": 0}, "mode": "quick",
                          "preset": "tiny", "command": "c", "targets": [row], "triton": part})
    assert "## 9. Serving through Triton vs in process" in md
    assert md.count("\n| 1 | ") == 1 and md.count("\n| 3 | ") == 1
    unavailable = {r["target"]: r for r in check_targets(
        {"triton": {"available": False, "note": "no tritonserver found"}})}
    assert unavailable["triton_over_in_process_16"]["met"] is None
    assert unavailable["triton_over_in_process_16"]["note"] == "no tritonserver found"
