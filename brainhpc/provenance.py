"""Which code a cell ran: a hash of the ``brainhpc/`` sources, and the git commit when there is one.

``code_version()`` is recorded in every cell's result (``brainhpc.cell.Context.finish``) and in
the sweep's cell markers, so a table can say which code its numbers came from and
``sweep --rerun-stale`` can redo the cells whose code changed. The hash is over the sources
themselves (not the commit): it is the same in a container image or an installed copy, where
there is no ``.git``, and it sees uncommitted edits. Git is asked only for the commit and
whether tracked sources under ``brainhpc/`` differ from it; without git both are None.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # the brainhpc/ package whose sources are hashed
HASH_CHARS = 16
GIT_TIMEOUT_S = 5.0


def source_hash(root: str | Path = ROOT) -> str:
    """First ``HASH_CHARS`` hex of a sha256 over every ``*.py`` under ``root``, in sorted
    relative-path order, each as path + NUL + bytes (a renamed or moved file changes it)."""
    root = Path(root)
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py") if p.is_file())
    h = hashlib.sha256()
    for rel, path in files:
        h.update(rel.encode("utf-8") + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:HASH_CHARS]


def _git(root: Path, *args: str) -> str | None:
    """stdout of ``git -C root ARGS``; None when git is missing, fails or hangs: provenance
    must never stop a cell. No optional locks: a concurrent ``git`` elsewhere is not disturbed."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=GIT_TIMEOUT_S, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(root: str | Path = ROOT) -> tuple[str | None, bool | None]:
    """(HEAD commit, uncommitted changes to tracked files under ``root``), or (None, None) when
    ``root`` is not tracked by a git work tree (no git, no .git, an installed copy that merely
    sits inside some other repository)."""
    root = Path(root)
    tracked = _git(root, "ls-files", "--", ".")
    if not tracked or not tracked.strip():
        return None, None
    commit = _git(root, "rev-parse", "HEAD")
    if not commit or not commit.strip():
        return None, None
    changes = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit.strip(), None if changes is None else bool(changes.strip())


@functools.cache
def _version(root: str) -> tuple[str, str | None, bool | None]:
    commit, dirty = git_state(root)
    return source_hash(root), commit, dirty


def code_version(root: str | Path | None = None) -> dict:
    """``{"code_hash", "commit", "dirty"}`` of the code under ``root`` (default ``ROOT``), computed
    once per process and root: a long run keeps recording the code it started with."""
    code_hash, commit, dirty = _version(str(Path(ROOT if root is None else root).resolve()))
    return {"code_hash": code_hash, "commit": commit, "dirty": dirty}


def recorded_code(result: dict) -> str | None:
    """The code hash a finished cell recorded (its result, or a sweep cell marker, under
    ``"code"``); None for cells finished before brainhpc recorded it."""
    code = result.get("code") if isinstance(result, dict) else None
    got = code.get("code_hash") if isinstance(code, dict) else None
    return got if isinstance(got, str) and got else None


def describe(code: dict | None) -> str:
    """``code 1a2b3c4d5e6f7a8b (commit 0123456789ab, uncommitted changes)`` for logs and tables."""
    if not code or not code.get("code_hash"):
        return "code not recorded"
    text = f"code {code['code_hash']}"
    if code.get("commit"):
        dirty = ", uncommitted changes" if code.get("dirty") else ""
        text += f" (commit {code['commit'][:12]}{dirty})"
    return text
