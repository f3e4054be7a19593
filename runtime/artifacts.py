"""Reading and verifying an exported artifacts folder (``engines/<name>/``) without torch.

The folder is written by ``echostream export`` (``echostream.export.commands``) and described by
``manifest.json``: the model config, every stage's I/O contract and files, and the sha256 + size of
every file. Loading refuses anything that does not match (DESIGN §7):

- the folder, the manifest, its format name and ``format_version``;
- every listed file exists and has the recorded size and sha256 (a file whose size, mtime, ctime and
  inode are those it had when its sha256 last matched is not re-read: see :func:`verified_cache_path`;
  ``rehash=True`` / ``--verify`` re-reads everything);
- every stage's contract in the manifest == the contract rebuilt from the config by
  :mod:`echostream.contract` (so a runtime never trusts names/shapes it did not derive itself);
- the graph's own I/O == the contract (checked by a backend when it loads the stage, with
  :func:`check_graph_io`).

Every failure raises :class:`echostream.errors.ArtifactError` naming the file or tensor and what was
expected vs what was found.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from echostream.contract import BATCH, StageContract, TensorSpec, stage_contract
from echostream.atomic import atomic_file
from echostream.errors import ArtifactError

FORMAT_NAME = "echostream-artifacts"
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (2,)  # 2: Conv2D padding 1, sentence capacity
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16")
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (engines can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_fairseq_dict(path: str | Path) -> list[str]:
    """A fairseq ``dict.txt`` (``<piece> <count>`` per line) -> the full symbol table.

    Index 0..3 are fairseq's implicit specials ``<s> <pad> </s> <unk>``; line ``i`` of the file is
    symbol ``4 + i`` (how fairseq's ``Dictionary.load`` numbers them).
    """
    symbols = list(FAIRSEQ_SPECIALS)
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        piece = line.rsplit(" ", 1)[0] if " " in line else line
        if not piece:
            raise ArtifactError(f"{path}: line {lineno} has no symbol: {line!r}")
        symbols.append(piece)
    return symbols


@dataclass(frozen=True)
class Artifacts:
    """A verified artifacts folder.

    Attributes:
        root: the folder.
        manifest: ``manifest.json`` as a dict.
        config: the model config (``EchoStreamConfig.to_dict()``) as a plain dict.
        precision: the precision whose stage files were selected (``"fp32"`` or ``"fp16"``).
        contracts: stage name -> contract rebuilt from ``config`` (equal to the manifest's).
        stage_files: stage name -> path of the selected ONNX graph.
        src_vocab / tgt_vocab: full fairseq symbol tables (``[V]`` strings) or None if absent.
        vocab_placeholder: True when the vocabularies are generated placeholders, not real ones.
        cmvn_mean / cmvn_std: global CMVN statistics ``[num_mel_bins]`` float32.
    """

    root: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    precision: str
    contracts: dict[str, StageContract]
    stage_files: dict[str, Path]
    src_vocab: list[str] | None = None
    tgt_vocab: list[str] | None = None
    vocab_placeholder: bool = False
    cmvn_mean: np.ndarray | None = field(default=None, repr=False)
    cmvn_std: np.ndarray | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.config.get("name", self.root.name))

    @property
    def stages(self) -> list[str]:
        return list(self.stage_files)

    def stage_path(self, stage: str) -> Path:
        try:
            return self.stage_files[stage]
        except KeyError:
            raise ArtifactError(
                f"{self.root}: no {self.precision} graph for stage {stage!r}; "
                f"available: {self.stages}"
            ) from None

    def contract(self, stage: str) -> StageContract:
        self.stage_path(stage)  # same error for a missing stage
        return self.contracts[stage]

    def file(self, name: str) -> Path:
        """Path of a file listed in the manifest (already hash-checked)."""
        if name not in self.manifest["files"]:
            raise ArtifactError(f"{self.root / MANIFEST}: no file {name!r} is listed")
        return self.root / name


# ---- loading ----------------------------------------------------------------------------------


def load_artifacts(path: str | Path, precision: str = "fp32", verify_hashes: bool = True,
                   rehash: bool = False) -> Artifacts:
    """Open and verify an artifacts folder.

    Args:
        path: the folder written by ``echostream export``.
        precision: which stage graphs to select: ``"fp32"`` or ``"fp16"``.
        verify_hashes: check every file's sha256 (on by default; off only for benchmarks that
            reload the same folder many times). A file unchanged since its hash last matched (same
            size, mtime, ctime and inode, recorded in the verified-hash cache) is not re-read, so
            hundreds of MB of plans are not hashed again on every load.
        rehash: ignore the verified-hash cache and re-read every file (``--verify``).
    Raises:
        ArtifactError: naming the file/tensor, expected vs got.
    """
    if precision not in PRECISIONS:
        raise ArtifactError(f"precision expected one of {list(PRECISIONS)}, got {precision!r}")
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"artifacts folder {str(root)!r} does not exist or is not a folder")
    manifest = read_manifest(root)
    _check_files(root, manifest, verify_hashes, rehash)
    config = manifest["config"]
    contracts, stage_files = {}, {}
    for stage, entry in manifest["stages"].items():
        contracts[stage] = _checked_contract(root, stage, entry, config)
        files = entry.get("files", {})
        if precision in files:
            stage_files[stage] = root / files[precision]
    if not stage_files:
        raise ArtifactError(f"{root / MANIFEST}: no stage has a {precision} graph")
    vocab = manifest.get("vocab", {})
    src = _load_vocab(root, vocab.get("src"), config["ctc"]["src_vocab_size"], "source")
    tgt = _load_vocab(root, vocab.get("tgt"), config["ctc"]["tgt_vocab_size"], "target")
    mean, std = _load_cmvn(root, manifest.get("cmvn", {}).get("file"), config)
    return Artifacts(root, manifest, config, precision, contracts, stage_files, src, tgt,
                     bool(vocab.get("placeholder", False)), mean, std)


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse ``manifest.json`` and check its format name, version and required keys."""
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest is missing (was the folder written by `echostream export`?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: manifest is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path}: format expected {FORMAT_NAME!r}, got {got!r}")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        hint = "upgrade echostream" if isinstance(version, int) and version > FORMAT_VERSION \
            else "re-export the model"
        raise ArtifactError(
            f"{path}: format_version {version!r} is not supported by this runtime "
            f"(supported: {list(SUPPORTED_FORMAT_VERSIONS)}); {hint}"
        )
    for key in ("config", "stages", "files"):
        if not isinstance(manifest.get(key), dict):
            raise ArtifactError(f"{path}: required key {key!r} is missing or not an object")
    return manifest


# A file modified within this long of being hashed is not recorded as verified: file timestamps are
# coarse (a few ms), so a change right after the hash could keep the recorded mtime/ctime.
_RACY_NS = 2_000_000_000


def verified_cache_path(root: Path) -> Path:
    """Where the verified hashes of an artifacts folder are recorded (outside the folder, which may
    be read-only): ``$ECHOSTREAM_CACHE_DIR`` or ``$XDG_CACHE_HOME/echostream`` or
    ``~/.cache/echostream``, then ``verified/<hash of the folder's absolute path>.json``."""
    base = os.environ.get("ECHOSTREAM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "echostream")
    key = hashlib.sha256(str(Path(root).resolve()).encode("utf-8")).hexdigest()[:24]
    return Path(base) / "verified" / f"{key}.json"


def file_stamp(path: Path, sha256: str) -> dict[str, Any]:
    """What must be unchanged for a verified file not to be re-read."""
    st = path.stat()
    return {"sha256": sha256, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _read_verified(root: Path) -> dict[str, Any]:
    try:
        data = json.loads(verified_cache_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("root") != str(root.resolve()):
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _write_verified(root: Path, files: dict[str, Any]) -> None:
    """Best effort, atomic: a cache that cannot be written only costs re-hashing next time."""
    path = verified_cache_path(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            Path(tmp).write_text(json.dumps({"root": str(root.resolve()), "files": files}),
                                 encoding="utf-8")
    except OSError:
        pass


def _check_files(root: Path, manifest: Mapping[str, Any], verify_hashes: bool,
                 rehash: bool = False) -> None:
    cached = {} if rehash or not verify_hashes else _read_verified(root)
    verified: dict[str, Any] = {}
    now = time.time_ns()
    for name, entry in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{path}: size expected {entry['bytes']} bytes, got {size}")
        if not verify_hashes:
            continue
        stamp = file_stamp(path, entry["sha256"])
        if cached.get(name) == stamp:
            verified[name] = stamp
            continue
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ArtifactError(
                f"{path}: sha256 expected {entry['sha256']}, got {digest} (file changed after export)"
            )
        if now - max(stamp["mtime_ns"], stamp["ctime_ns"]) > _RACY_NS:
            verified[name] = stamp
    if verify_hashes and verified != cached:
        _write_verified(root, verified)
    for stage, entry in manifest["stages"].items():
        for precision, name in entry.get("files", {}).items():
            if name not in manifest["files"]:
                raise ArtifactError(
                    f"{root / MANIFEST}: {stage} {precision} graph {name!r} has no sha256 entry"
                )


def _checked_contract(root: Path, stage: str, entry: Mapping[str, Any],
                      config: dict[str, Any]) -> StageContract:
    """The contract rebuilt from the config, after checking the manifest records the same one."""
    try:
        expected = stage_contract(stage, config)
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{root / MANIFEST}: cannot build the {stage} contract from the config: {exc}") from None
    try:
        recorded = StageContract.from_dict(entry["contract"])
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{root / MANIFEST}: {stage} contract is malformed: {exc}") from None
    if recorded != expected:
        raise ArtifactError(
            f"{root / MANIFEST}: {stage} contract does not match the one built from the config: "
            + describe_contract_difference(expected, recorded)
        )
    return expected


def describe_contract_difference(expected: StageContract, got: StageContract) -> str:
    """One line naming the first tensor that differs between two contracts."""
    for kind in ("inputs", "outputs"):
        want, have = getattr(expected, kind), getattr(got, kind)
        if [t.name for t in want] != [t.name for t in have]:
            return f"{kind} expected {[t.name for t in want]}, got {[t.name for t in have]}"
        for a, b in zip(want, have):
            if a != b:
                return f"tensor {a.name!r} expected {_spec_str(a)}, got {_spec_str(b)}"
    return "contracts differ"


def _spec_str(spec: TensorSpec) -> str:
    return f"{spec.dtype}{list(spec.shape)}"


def _load_vocab(root: Path, name: str | None, size: int, which: str) -> list[str] | None:
    if not name:
        return None
    symbols = load_fairseq_dict(root / name)
    if len(symbols) != size:
        raise ArtifactError(
            f"{root / name}: {which} vocabulary size expected {size} (4 specials + {size - 4} "
            f"lines), got {len(symbols)}"
        )
    return symbols


def _load_cmvn(root: Path, name: str | None, config: dict[str, Any]):
    if not name:
        return None, None
    dim = config["features"]["num_mel_bins"]
    try:
        with np.load(root / name) as data:
            mean, std = np.asarray(data["mean"], np.float32), np.asarray(data["std"], np.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{root / name}: cannot read global CMVN (mean/std): {exc}") from None
    for key, arr in (("mean", mean), ("std", std)):
        if arr.shape != (dim,):
            raise ArtifactError(f"{root / name}: {key} shape expected [{dim}], got {list(arr.shape)}")
    if not np.all(std > 0):
        raise ArtifactError(f"{root / name}: std must be > 0 everywhere")
    return mean, std


# ---- graph I/O vs contract (used by every backend when it loads a stage) ------------------------


GraphTensor = tuple[str, str, Sequence[int | str | None]]  # (name, numpy dtype name, shape)


def check_graph_io(where: str | Path, contract: StageContract, inputs: Iterable[GraphTensor],
                   outputs: Iterable[GraphTensor]) -> None:
    """Compare a loaded graph's I/O with the contract: names in order, dtypes, static dims.

    Args:
        where: the graph file, for the message.
        inputs / outputs: ``(name, dtype, shape)`` as the backend reports them; a dynamic dim is a
            string or None or -1, and is only allowed (and required) on axis 0.
    Raises:
        ArtifactError naming the tensor, expected vs got.
    """
    for kind, want, got in (("inputs", contract.inputs, list(inputs)),
                            ("outputs", contract.outputs, list(outputs))):
        names = [g[0] for g in got]
        if names != [t.name for t in want]:
            raise ArtifactError(
                f"{where}: {contract.stage} graph {kind} expected {[t.name for t in want]}, got {names}"
            )
        for spec, (name, dtype, shape) in zip(want, got):
            dims = [BATCH if (d is None or isinstance(d, str) or d == -1) else int(d) for d in shape]
            if dtype != spec.dtype or dims != list(spec.shape):
                raise ArtifactError(
                    f"{where}: {contract.stage} tensor {name!r} expected {_spec_str(spec)}, "
                    f"got {dtype}{dims}"
                )
