"""A stand-in for what a trained ASR head does on silence: blanks.

The seeded presets have random weights; their ASR CTC head emits its prior on anything, silence
included, so the endpoint rules (``runtime/endpoint.py``) would never see a pause. Tests and the
soak wrap the real encoder stage in :class:`SilenceAwareEncoder`: its ASR log-probs are replaced
by a certain blank on every encoder frame whose audio is silent (every fbank bin of the frame's
four 10 ms frames below ``floor`` in raw log-mel, i.e. before CMVN), and left as the graph computed
them elsewhere. Everything else (the encoder output, every other stage) is the real graph.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

SILENCE_LOG_MEL = -15.0  # digital silence gives log(float eps) = -15.9 per bin; speech is far above
NEG = -1.0e4


class SilenceAwareEncoder:
    """The encoder ``stage`` with blanks on silent frames (see the module docstring).

    Args:
        stage: the real encoder stage; ``translator``: whose window layout and CMVN to read.
    """

    def __init__(self, stage: Any, translator: Any, floor: float = SILENCE_LOG_MEL):
        self.stage, self.contract = stage, stage.contract
        self.lead, self.rows = translator.lead, translator.segment_length
        mean, std = translator.cmvn_mean, translator.cmvn_std
        self.mean = np.zeros(80, np.float32) if mean is None else mean
        self.std = np.ones(80, np.float32) if std is None else std
        self.floor, self.blank = floor, translator.cfg.ctc.blank

    def run(self, inputs: Mapping[str, np.ndarray], state=None, context=None):
        out, next_state = self.stage.run(inputs, state, context)
        raw = inputs["x"] * self.std + self.mean  # [B, W, 80] log-mel
        logp = np.array(out["asr_log_probs"], copy=True)  # [B, S, V]
        for u in range(self.rows):
            frames = raw[:, self.lead + 4 * u:self.lead + 4 * u + 4]
            silent = frames.max(axis=(1, 2)) < self.floor  # [B]
            logp[silent, u, :] = NEG
            logp[silent, u, self.blank] = 0.0
        return dict(out, asr_log_probs=logp), next_state

    def __getattr__(self, name: str):  # initial_state, copy_state, stack_states, ...
        return getattr(self.stage, name)


def silence_aware(translator: Any) -> Any:
    """Wrap ``translator``'s encoder stage in place; returns the translator."""
    if not isinstance(translator.stages["encoder"], SilenceAwareEncoder):
        translator.stages["encoder"] = SilenceAwareEncoder(translator.stages["encoder"], translator)
    return translator
