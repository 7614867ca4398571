"""The stamped-stage engine: runs a stage's action unless its stamp says its inputs are unchanged.

Each stage writes into a fresh staging folder beside `build/<recipe>/<stage>/`; only when it is
complete is the folder swapped into place, and only then is its stamp (the hash of everything the
stage read: validated recipe sections, input file hashes, tool versions) written. A build killed at
any point therefore leaves either the old stage output or the new one, and the next build redoes
exactly the stages without a valid stamp. Stage results are kept as JSON so an up-to-date build
never has to import TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from . import __version__
from .console import Console
from .fsio import folder_lock, replace_folder, sha256_file, write_json_atomic
from .layout import RESULT, STAMP, recipe_build_folder
from .recipe import Recipe
from .sources.fetch import Fetcher

STAGE_LOCK_WAIT_SECONDS = 24 * 3600.0




TOOLS = ("tensorflow", "ai-edge-litert", "onnx", "onnxruntime", "ethos-u-vela", "numpy", "pillow", "onnx2tf")


def code_digest(package: Path = Path(__file__).parent) -> str:
    """One hash of mzconvert's own files (the package's source and data, not its bytecode): a stage result made
    by other code is made again, where a version string alone would leave the result of code since changed (a
    checkout, an edit) standing under the same name."""
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and p.suffix in (".py", ".txt")):
        digest.update(f"{path.relative_to(package).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"mzconvert": __version__, "mzconvert code": code_digest()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def validated(section) -> dict | None:
    """A recipe section as a stage key holds it: validated, with its defaults filled in, so that a changed
    default reruns the stages that read it (and a comment or a reordered field in the YAML does not)."""
    return None if section is None else asdict(section)


def canonical_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StageOutcome:
    folder: Path
    result: dict  # what the stage reported, plus "files": {relative path: sha256}

    def path(self, key: str) -> Path:
        return self.folder / self.result[key]

    def optional_path(self, key: str) -> Path | None:
        """The file the result names under `key`, when it names one (raw_model: post-processing attached)."""
        return self.path(key) if key in self.result else None

    def anchors(self) -> Path | None:
        """A strip stage's anchors.npy, for decoding SSD outputs."""
        return self.folder / "anchors.npy" if "anchors.npy" in self.result.get("extras", []) else None

    def digest(self) -> str:
        """One hash of every file the stage wrote: what a downstream stage's key depends on."""
        return canonical_hash(self.result["files"])

    def sha256(self, key: str) -> str:
        """The sha256 of the output file the result names under `key`."""
        return self.result["files"][self.result[key]]


@dataclass
class BuildOptions:
    out: Path = Path("dist")
    build_root: Path = Path("build")
    force: bool = False
    verify_strict: bool = False
    lock_timeout: float = 600.0
    variants: list[str] | None = None
    jobs: int = 1  # variants built at once, each in a thread (see _in_threads)
    build_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # --force redoes a stage once a build


@dataclass
class Planner:
    recipe: Recipe
    fetcher: Fetcher
    console: Console
    options: BuildOptions
    versions: dict = field(default_factory=tool_versions)
    outcomes: dict = field(default_factory=dict)
    _keys: dict = field(default_factory=dict)  # stage name -> the key of its outcome in this build
    _image_sets: dict = field(default_factory=dict)  # (set, count, at_most) -> _image_paths, read once a build
    _lock: threading.Lock = field(default_factory=threading.Lock)  # -j: the memos above, shared by threads
    _stage_locks: dict = field(default_factory=dict)  # stage name -> the lock a thread running it holds

    @property
    def folder(self) -> Path:
        return recipe_build_folder(self.options.build_root, self.recipe.name)

    @property
    def threads(self) -> int:
        """Threads for running a model (reference, verify): the cores, shared among the build's -j threads."""
        return max(1, (os.cpu_count() or 1) // self.options.jobs)

    def stage(self, name: str, inputs: dict, action: Callable[[Path], dict]) -> StageOutcome:
        """Run `action(staging_folder) -> result` unless the stamp for `inputs` is valid."""
        target = self.folder / name
        key = canonical_hash(inputs)
        with self._lock:
            stage_lock = self._stage_locks.setdefault(name, threading.Lock())
        # With -j, another thread of this build may be running the same shared stage (a calibration can
        # take long): it is run once, the others wait for it. Other builds wait at the stage's folder lock.
        with stage_lock:
            if self._keys.get(name) == key:  # shared by several variants (calibration, float reference)
                return self.outcomes[name]
            with folder_lock(target.parent, STAGE_LOCK_WAIT_SECONDS, name=f".{target.name}.lock"):
                outcome = self._run_stage(name, target, key, inputs, action)
            self._keys[name] = key
            return outcome

    def _run_stage(self, name: str, target: Path, key: str, inputs: dict, action: Callable[[Path], dict]
                   ) -> StageOutcome:
        # --force reruns every stage, once: a stage this build already reran (another worker) stays
        outcome = self._up_to_date(target, key, self.options.build_id if self.options.force else None)
        if outcome is not None:
            self.console.log(f"[{self.recipe.name}] {name}: up to date")
            self.outcomes[name] = outcome
            return outcome
        self.console.log(f"[{self.recipe.name}] {name}: running")
        started = time.perf_counter()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            result = action(staging)
            result["files"] = {str(p.relative_to(staging)): sha256_file(p)
                               for p in sorted(staging.rglob("*")) if p.is_file()}
            write_json_atomic(staging / RESULT, result)
            replace_folder(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_json_atomic(target / STAMP, {"key": key, "inputs": inputs, "build": self.options.build_id})  # last
        self.console.log(f"[{self.recipe.name}] {name}: done in {time.perf_counter() - started:.1f} s")
        outcome = StageOutcome(folder=target, result=result)
        self.outcomes[name] = outcome
        return outcome

    @staticmethod
    def _up_to_date(target: Path, key: str, only_build: str | None = None) -> StageOutcome | None:
        """The stage's outcome if its stamp is `key` (and, with `only_build`, was written by that build)."""
        try:
            stamp = json.loads((target / STAMP).read_text())
            result = json.loads((target / RESULT).read_text())
        except (OSError, ValueError):
            return None
        if stamp.get("key") != key or (only_build and stamp.get("build") != only_build):
            return None
        # Outputs are re-hashed: a damaged or edited build file reruns its stage.
        for relative, digest in result.get("files", {}).items():
            path = target / relative
            if not path.is_file() or sha256_file(path) != digest:
                return None
        return StageOutcome(folder=target, result=result)
