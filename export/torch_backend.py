"""The PyTorch reference as a runtime backend (``backend="torch"``).

``TorchStage`` runs ``EchoStreamModel.stage_step(stage)`` with numpy in and numpy out, so the very
same runtime loop (``Translator``/``Stream``) can run on the reference model, and the parity suite
can compare a backend's graph with the code it was exported from. The model is rebuilt from the
artifacts' ``config.json`` + ``weights.safetensors`` (bitwise the weights that were exported).

It lives in ``echostream.export`` because it needs torch; the torch-free runtime reaches it only
through the backend registry (``echostream.runtime.backends``), by module name.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from echostream.contract import StageContract
from echostream.errors import ArtifactError
from echostream.runtime.artifacts import Artifacts
from echostream.runtime.stage import Stage, check_host_feed, zero_host_state

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}
_LOCK = threading.Lock()


def load_reference_model(artifacts: Artifacts) -> torch.nn.Module:
    """The exported model rebuilt from the artifacts (cached per folder and weights hash)."""
    from echostream.models.weights import load_checkpoint

    weights = artifacts.manifest.get("reference", {}).get("weights", "weights.safetensors")
    digest = artifacts.manifest["files"].get(weights, {}).get("sha256")
    if digest is None:
        raise ArtifactError(f"{artifacts.root}: the manifest lists no reference weights {weights!r}")
    key = (str(Path(artifacts.root).resolve()), digest)
    with _LOCK:
        if key not in _MODELS:
            try:
                model, _ = load_checkpoint(artifacts.file(weights))
            except ValueError as exc:
                raise ArtifactError(f"{artifacts.root}: cannot rebuild the reference model: {exc}") from None
            _MODELS[key] = model.eval()
        return _MODELS[key]


class TorchStage(Stage):
    """One stage of the PyTorch reference (fp32, CPU unless ``device`` says otherwise).

    Args:
        model: an ``EchoStreamModel`` in eval mode.
        stage: the stage name.
        device: torch device for the computation (inputs and outputs stay host numpy).
    """

    def __init__(self, model: torch.nn.Module, stage: str, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.contract: StageContract = model.contract(stage)
        self.device = torch.device(device)
        self._step = model.stage_step(stage)

    def initial_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        return zero_host_state(self.contract, batch)

    @torch.inference_mode()
    def run(self, inputs: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray] | None = None,
            context: Mapping[str, np.ndarray] | None = None):
        """One step; same I/O as every other backend (see ``runtime/stage.py``)."""
        check_host_feed(self.contract, inputs, state, context)
        feed = {k: self._tensor(v) for k, v in {**inputs, **(context or {})}.items()}
        torch_state = {k: self._tensor(v) for k, v in (state or {}).items()}
        outputs, next_state = self._step(feed, torch_state)
        out = {t.name: _numpy(outputs[t.name]) for t in self.contract.data_outputs}
        if not self.contract.states:
            return out, None
        return out, {name: _numpy(next_state[name]) for name in self.contract.state_names}

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)


def load_stage(artifacts: Artifacts, stage: str, device: str = "cpu", **_: Any) -> TorchStage:
    """Backend-registry entry point; ignores other backends' options (threads, deterministic)."""
    artifacts.stage_path(stage)  # same "no such stage" error as the other backends
    return TorchStage(load_reference_model(artifacts), stage, device)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").contiguous().numpy().copy()


def exact_agent_factory(artifacts: Artifacts, policy: Any, is_word_start):
    """The exact fidelity mode on this backend: a maker of StreamSpeech agents (the PyTorch
    reference written from the agent's code, ``models/streamspeech_agent.py``), one per sentence,
    on the artifacts' reference model with the policy's knobs."""
    from echostream.contract import sentence_target_tokens
    from echostream.models.streamspeech_agent import AgentConfig, StreamSpeechAgent

    model = load_reference_model(artifacts)
    cfg = AgentConfig(segment_ms=policy.segment_ms, stride_n=policy.stride_n,
                      lagging_k1=policy.lagging_k1, final_max_len=policy.final_max_len,
                      min_len=policy.min_len, capacity=sentence_target_tokens(artifacts.config))
    return lambda: StreamSpeechAgent(model, cfg, is_word_start)
