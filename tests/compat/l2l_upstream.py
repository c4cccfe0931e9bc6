"""learn2learn 0.2.0's own tests and examples, fetched from PyPI and pointed at metagrad's compat layer.

``fetch_sdist`` downloads learn2learn's source distribution with pip (once, into ``.bench/`` beside the
checkout, the folder ``benchmarks/setup_peers.sh`` uses; ``$METAGRAD_L2L_SDIST`` names an
existing one) and checks its SHA-256. ``extract`` unpacks the files asked for with the import line
rewritten: ``import learn2learn as l2l`` -> ``import metagrad.compat.learn2learn as l2l`` and
``from learn2learn...`` likewise. Nothing else in them changes, and nothing of learn2learn is vendored.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.2.0"
SHA256 = "69f1d7cb0d0a6be7a2c6ad8e83e2ebbe70fb05e51d61e45e63078b40c75ea419"  # PyPI's, for the sdist
ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".bench"
COMPAT = "metagrad.compat.learn2learn"

_IMPORTS = [
    (re.compile(r"^(\s*)import learn2learn as l2l\b", re.MULTILINE), rf"\1import {COMPAT} as l2l"),
    (re.compile(r"^(\s*)from learn2learn(\.[\w.]+)? import", re.MULTILINE), rf"\1from {COMPAT}\2 import"),
    (re.compile(r"^(\s*)import learn2learn(\.[\w.]+) as", re.MULTILINE), rf"\1import {COMPAT}\2 as"),
]


class FetchError(RuntimeError):
    """The sdist could not be fetched (offline, or PyPI answered something else)."""


def rewrite_imports(source: str) -> str:
    """``source`` with learn2learn's import lines pointed at the compat layer; nothing else changed."""
    for pattern, replacement in _IMPORTS:
        source = pattern.sub(replacement, source)
    if re.search(r"^\s*(import|from) learn2learn\b", source, re.MULTILINE):
        raise ValueError("an import of learn2learn has a form the rewrite does not know")
    return source


def fetch_sdist() -> Path:
    """The path of learn2learn 0.2.0's sdist, downloading it with pip if needed.

    Raises:
        FetchError: pip could not download it (the message ends with pip's last line), or its
            SHA-256 differs from PyPI's.
    """
    if os.environ.get("METAGRAD_L2L_SDIST"):
        path = Path(os.environ["METAGRAD_L2L_SDIST"])
    else:
        path = CACHE / f"learn2learn-{VERSION}.tar.gz"
        if not path.is_file():
            CACHE.mkdir(parents=True, exist_ok=True)
            # --no-binary: the sdist, which carries tests/ and examples/ (the wheels do not).
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "learn2learn",
                 "--disable-pip-version-check", "-q", f"learn2learn=={VERSION}", "-d", str(CACHE)],
                check=False, capture_output=True, text=True, timeout=600,
            )
            if result.returncode != 0 or not path.is_file():
                last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise FetchError(f"pip could not download learn2learn=={VERSION}: {last}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise FetchError(f"{path} has SHA-256 {digest}, not PyPI's {SHA256}; delete it to download again")
    return path


def extract(sdist: Path, dest: Path, prefixes: tuple[str, ...]) -> Path:
    """Unpack the sdist's members under ``prefixes`` (e.g. ``"tests/"``) into ``dest``, imports rewritten.

    Returns:
        ``dest``, holding e.g. ``tests/unit/algorithms/maml_test.py``.
    """
    top = f"learn2learn-{VERSION}/"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix(top)
            if not member.isfile() or not name.startswith(prefixes):
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if name.endswith(".py"):
                data = rewrite_imports(data.decode()).encode()
            target.write_bytes(data)
    return dest
