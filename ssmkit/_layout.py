"""Where the shipped CUDA sources and the reference live, installed or in a source checkout.

A wheel carries ``kernels_cu/`` and ``reference/`` inside the package (``ssmkit/kernels_cu``,
``ssmkit/reference``); a source checkout keeps them at the repository root, beside ``ssmkit/``.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def kernels_dir() -> Path:
    """The folder that holds the ``.cu``/``.cuh`` sources."""
    installed = PACKAGE_DIR / "kernels_cu"
    return installed if installed.is_dir() else REPO_ROOT / "kernels_cu"


def checkout_extra_path() -> list[str]:
    """Folders to append to ``ssmkit.__path__`` so ``ssmkit.reference`` resolves in a checkout."""
    if (PACKAGE_DIR / "reference").is_dir():
        return []
    if (REPO_ROOT / "reference" / "__init__.py").is_file():
        return [str(REPO_ROOT)]
    return []
