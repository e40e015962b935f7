"""The test objects: files of random bytes in the run's temporary directory."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# Object name -> size. `huge` is only made when a scenario needs it.
SIZES = {"small": 16 * KIB, "medium": 256 * KIB, "large": 4 * MIB}


@dataclass(frozen=True)
class Obj:
    name: str  # file name on the origin, and the image id through the proxy
    size: int
    sha256: str
    path: Path


def make_object(root: Path, name: str, size: int) -> Obj:
    path = root / name
    digest = hashlib.sha256()
    block = 4 * MIB
    with path.open("wb") as f:
        left = size
        while left > 0:
            chunk = os.urandom(min(block, left))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    path.chmod(0o644)  # nginx workers may run as another user
    return Obj(name, size, digest.hexdigest(), path)


def make_objects(root: Path, huge_size: int = 0) -> dict[str, Obj]:
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    objs = {key: make_object(root, f"{key}.bin", size) for key, size in SIZES.items()}
    if huge_size:
        objs["huge"] = make_object(root, "huge.bin", huge_size)
    return objs
