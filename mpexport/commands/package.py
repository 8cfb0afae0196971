"""``package``: a deployable model repository from a verified bundle."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mpexport.base.errors import MpexportError

if TYPE_CHECKING:
    from mpexport.deploy.triton import PackageResult

FORMATS = ("triton",)


def package(directory: str | Path, out: str | Path, *, format: str = "triton", name: str | None = None,
            max_batch_size: int | None = None, allow_unverified: bool = False, force: bool = False) -> PackageResult:
    """Write the bundle ``directory`` as a model repository of ``format`` into ``out`` (see
    :func:`mpexport.deploy.triton.package_triton`: atomically, checked against the manifest, refused for a bundle
    whose verify did not pass unless ``allow_unverified``)."""
    if format not in FORMATS:
        raise MpexportError(f"unknown repository format '{format}'", stage="package",
                            hint=f"use one of {', '.join(FORMATS)}")
    from mpexport.deploy.triton import package_triton

    return package_triton(directory, out, name=name, max_batch_size=max_batch_size,
                          allow_unverified=allow_unverified, force=force)
