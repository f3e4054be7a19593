"""User-facing errors: the CLI prints them as one line and exits non-zero (no traceback)."""


class EchoStreamError(Exception):
    """A problem the user can fix (bad input, bad artifacts, missing backend). One line."""

    exit_code = 2


class ArtifactError(EchoStreamError):
    """Artifacts folder, manifest, stage file, hash or contract problem."""


class BackendUnavailable(EchoStreamError):
    """A backend (TensorRT, CUDA, ONNX Runtime) that was asked for is not installed or usable."""


class AudioError(EchoStreamError):
    """Input audio that cannot be read or is not usable (missing, not audio, NaN, ...)."""
