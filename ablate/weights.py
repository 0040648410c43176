"""``ablate weights fetch NAME [--to DIR]``: the one place in ablate that downloads anything.

Each name in :data:`REGISTRY` is a list of files at an immutable revision (a Hugging Face
commit, a GitHub release asset) with the sha256 and size published for them where we found
them. A download streams into a temp file next to its destination, hashing as it goes; it is
installed (``os.replace``) only when its size matches the Content-Length and the published
size, and its sha256 matches:

- the sha256 pinned here (every file but two: taken from the files' published listings), or
- where none was found, the checksum the server declares for that revision: the sha256 of an
  LFS file (Hugging Face's ``X-Linked-Etag``) or the git blob id of a small file (``ETag``).
  That proves the bytes are what the server says that commit holds, no more; the output says
  which check each file passed. A file with neither is refused.

A file set (a model folder) is assembled in a hidden temp folder and renamed into place only
when every file passed, with a manifest (``ablate-weights.json``) of the sha256 of each; a
re-run re-hashes what is there against it and downloads nothing when it matches. A wrong
checksum, a short read, an HTTP error or Ctrl-C leaves nothing behind and exits non-zero with
one line naming the file. Runs, tests and evaluation never download: they read local paths.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

from ablate.config import ConfigError
from ablate.utils import atomic_write_bytes

MANIFEST = "ablate-weights.json"
_READ = 1 << 20


class FetchError(Exception):
    """A download that failed; ``str`` is one line naming the file and why. Nothing was installed."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Remote:
    """One file: ``url`` at an immutable revision, ``dest`` its path inside the entry's folder
    (a one-file entry: its file name), and the ``sha256`` / ``size`` published for it, if any."""

    url: str
    dest: str
    sha256: Optional[str] = None
    size: Optional[int] = None


@dataclass(frozen=True)
class Weights:
    """A named download: ``target`` (a file or folder name under ``--to``), its ``files``, where
    it comes from, and the settings that use it (``{path}``: the installed path) as a grid-file
    line and as ``--set`` overrides."""

    target: str
    files: tuple[Remote, ...]
    source: str
    use: str
    sets: tuple[str, ...]
    folder: bool = True


def _hf(repo: str, revision: str, files: list[tuple[str, Optional[int], Optional[str]]],
        subfolder: str = "") -> tuple[Remote, ...]:
    """Hugging Face files ``(name, size, sha256)`` of ``repo`` at commit ``revision``."""
    return tuple(Remote(f"https://huggingface.co/{repo}/resolve/{revision}/{subfolder}{name}", name, sha, size)
                 for name, size, sha in files)


_CLIP_B32, _CLIP_L14 = "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268", "32bd64288804d66eefd0ccbe215aa642df71cc41"
_B32_SAFETENSORS = "c237dc49a33fc61debc9276459120b7eac67e7ef"  # refs/pr/66: the hub's safetensors conversion
_AMUSED = "09b6259bf96dbe6d70a852b70812420fe02df55e"
_INCEPTION = "weights-inception-2015-12-05-6726825d.pth"

REGISTRY: dict[str, Weights] = {
    "inception": Weights(
        _INCEPTION,
        (Remote(f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{_INCEPTION}", _INCEPTION,
                "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", 95_628_359),),
        "torch-fidelity v0.2.0 release: the FID Inception (TF 2015-12-05 graph) as a PyTorch state dict",
        "eval: {{inception_weights: {path}}}", ("eval.inception_weights={path}",), folder=False),
    "clip-b32": Weights(
        "clip-vit-base-patch32",
        _hf("openai/clip-vit-base-patch32", _CLIP_B32, [
            ("config.json", 4186, "b575ef3c36f2a057fa19e221650105052d61cc9c1a972ec15019c6261ec98770"),
            ("preprocessor_config.json", 316, "910e70b3956ac9879ebc90b22fb3bc8a75b6a0677814500101a4c072bd7857bd"),
            ("vocab.json", 862_328, "5047b556ce86ccaf6aa22b3ffccfc52d391ea4accdab9c2f2407da5b742d4363"),
            ("merges.txt", 524_657, "f526393189112391ce6f9795d4695f704121ce452c3aad1f5335cc41337eba85"),
            ("tokenizer.json", 2_224_041, "b556ac8c99757ffb677208af34bc8c6721572114111a6e0aaf5fa69ff0b8d842"),
            ("tokenizer_config.json", 592, "34b7336e4bee12e0a9730eaf5189f582ef3c3eea5027f65730e5717256755aad"),
            ("special_tokens_map.json", 389, "f8c0d6c39aee3f8431078ef6646567b0aba7f2246e9c54b8b99d55c22b707cbf")])
        # main has only pytorch_model.bin (a pickle); transformers itself loads this conversion
        + _hf("openai/clip-vit-base-patch32", _B32_SAFETENSORS, [("model.safetensors", 605_157_884, None)]),
        f"Hugging Face openai/clip-vit-base-patch32 @ {_CLIP_B32[:12]} (weights: safetensors conversion "
        f"@ {_B32_SAFETENSORS[:12]})", "eval: {{clip_model: {path}}}", ("eval.clip_model={path}",)),
    "clip-l14": Weights(
        "clip-vit-large-patch14",
        _hf("openai/clip-vit-large-patch14", _CLIP_L14, [
            ("config.json", None, "8a09b467700c58138c29d53c605b34ebc69beaadd13274a8a2af8ad2c2f4032a"),
            ("preprocessor_config.json", 316, "910e70b3956ac9879ebc90b22fb3bc8a75b6a0677814500101a4c072bd7857bd"),
            ("vocab.json", 961_143, "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69"),
            ("merges.txt", 524_619, "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"),
            ("tokenizer.json", 2_224_003, "a83e0809aa4c3af7208b2df632a7a69668c6d48775b3c3fe4e1b1199d1f8b8f4"),
            ("tokenizer_config.json", 905, "deef455e52fa5e8151e339add0582e4235f066009601360999d3a9cda83b1129"),
            ("special_tokens_map.json", 389, "f8c0d6c39aee3f8431078ef6646567b0aba7f2246e9c54b8b99d55c22b707cbf"),
            ("model.safetensors", 1_710_540_580, "a2bf730a0c7debf160f7a6b50b3aaf3703e7e88ac73de7a314903141db026dcb")]),
        f"Hugging Face openai/clip-vit-large-patch14 @ {_CLIP_L14[:12]}",
        "eval: {{clip_model: {path}}}", ("eval.clip_model={path}",)),
    "amused-vq": Weights(
        "amused-vq",
        _hf("amused/amused-256", _AMUSED, [
            ("config.json", 804, None),
            ("diffusion_pytorch_model.safetensors", None,
             "1241a5c88b635af4f8cfb268e388ccaa70f55a458a473d68943e5c28d7b7f762")], subfolder="vqvae/"),
        f"Hugging Face amused/amused-256 @ {_AMUSED[:12]}, vqvae/ (a diffusers VQModel: 8192 codes, f=16)",
        "tokenizer: {{kind: diffusers, path: {path}}}", ("tokenizer.kind=diffusers", "tokenizer.path={path}")),
}


def default_dir() -> Path:
    """``$ABLATE_WEIGHTS``, else ``~/.cache/ablate/weights``."""
    return Path(os.environ.get("ABLATE_WEIGHTS") or Path.home() / ".cache" / "ablate" / "weights").expanduser()


def _writable(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".ablate-write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"--to: cannot write to {path} ({exc.strerror or exc}); pass a writable --to "
                          "or set $ABLATE_WEIGHTS") from None
    return path.resolve()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ):
            h.update(block)
    return h.hexdigest()


def _git_blob_id(path: Path) -> str:
    """The git object id of a file's bytes: sha1 of ``blob <size>\\0`` + bytes."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(_READ):
            h.update(block)
    return h.hexdigest()


class _Hops(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of every redirect: Hugging Face declares an LFS file's sha256 on its
    redirect to storage, not on the storage's own response."""

    def __init__(self) -> None:
        super().__init__()
        self.hops: list[tuple[str, http.client.HTTPMessage]] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        self.hops.append((req.full_url, headers))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _declared(hops: list, host: str) -> Optional[tuple[str, str]]:
    """``("sha256" | "git-blob", hex)`` the origin ``host`` declared for the file, if any."""
    def tag(headers, name: str) -> str:  # noqa: ANN001
        return (headers.get(name) or "").removeprefix("W/").strip('"').lower()

    ours = [h for url, h in hops if urllib.parse.urlsplit(url).netloc == host]
    for h in ours:
        if re.fullmatch(r"[0-9a-f]{64}", tag(h, "X-Linked-Etag")):
            return "sha256", tag(h, "X-Linked-Etag")
    for h in ours:
        if re.fullmatch(r"[0-9a-f]{40}", tag(h, "ETag")):
            return "git-blob", tag(h, "ETag")
    return None


def _download(remote: Remote, label: str, into: Path) -> tuple[Path, str, str]:
    """Stream ``remote`` into a temp file in ``into``; ``(temp path, sha256, what was checked)``
    once it passed, else FetchError (and no temp file left)."""
    hops = _Hops()
    fd, name = tempfile.mkstemp(dir=into, prefix=f".{Path(remote.dest).name}.", suffix=".partial")
    tmp = Path(name)
    try:
        digest, got = hashlib.sha256(), 0
        request = urllib.request.Request(remote.url, headers={"User-Agent": "ablate-weights-fetch"})
        with os.fdopen(fd, "wb") as out, urllib.request.build_opener(hops).open(request, timeout=60) as resp:
            hops.hops.append((resp.url, resp.headers))
            length = resp.headers.get("Content-Length")
            while block := resp.read(_READ):
                out.write(block)
                digest.update(block)
                got += len(block)
            out.flush()
            os.fsync(out.fileno())
        if length is not None and got != int(length):
            raise FetchError(f"{label}: got {got} of {length} bytes (the download was cut short)")
        if remote.size is not None and got != remote.size:
            raise FetchError(f"{label}: {got} bytes, expected {remote.size}")
        sha = digest.hexdigest()
        host = urllib.parse.urlsplit(remote.url).netloc
        declared = _declared(hops.hops, host)
        if remote.sha256 is not None:
            want, have, how = remote.sha256, sha, "sha256 matches the one pinned in ablate"
        elif declared is not None and declared[0] == "sha256":
            want, have, how = declared[1], sha, f"sha256 matches the one {host} declares for this commit (no published sha256)"
        elif declared is not None:
            want, have, how = declared[1], _git_blob_id(tmp), f"git blob id matches the one {host} declares (no published sha256)"
        else:
            raise FetchError(f"{label}: no published or server-declared checksum to verify it against; not installed")
        if have != want:
            raise FetchError(f"{label}: checksum mismatch (got {have}, expected {want}); not installed")
        return tmp, sha, how
    except urllib.error.HTTPError as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{label}: HTTP {exc.code} {exc.reason} from {remote.url}") from None
    except http.client.IncompleteRead as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{label}: the download was cut short (the connection closed with "
                         f"{exc.expected} bytes to go); not installed") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        tmp.unlink(missing_ok=True)
        why = getattr(exc, "reason", None) or exc.__class__.__name__
        raise FetchError(f"{label}: download failed ({why}) from {remote.url}") from None
    except KeyboardInterrupt:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{label}: interrupted (Ctrl-C); nothing was installed", exit_code=130) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _verified(entry: Weights, target: Path) -> bool:
    """``target`` holds exactly what a verified install of ``entry`` wrote (re-hashed now)."""
    if not entry.folder:
        return target.is_file() and _sha256(target) == entry.files[0].sha256
    try:
        recorded = json.loads((target / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for r in entry.files:
        want = recorded.get(r.dest) if isinstance(recorded, dict) else None
        if want is None or (r.sha256 is not None and want != r.sha256):
            return False
        if not (target / r.dest).is_file() or _sha256(target / r.dest) != want:
            return False
    return True


def _install(name: str, entry: Weights, root: Path, target: Path, out: TextIO) -> None:
    if not entry.folder:
        tmp, _, how = _download(entry.files[0], f"{name}/{entry.target}", root)
        os.replace(tmp, target)
        _fsync_dir(root)
        out.write(f"  {entry.target}: {target.stat().st_size} bytes, {how}\n")
        return
    stage = Path(tempfile.mkdtemp(dir=root, prefix=f".{entry.target}.", suffix=".partial"))
    try:
        sums, lines = {}, []
        for r in entry.files:
            tmp, sums[r.dest], how = _download(r, f"{name}/{r.dest}", stage)
            (stage / r.dest).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, stage / r.dest)
            lines.append(f"  {r.dest}: {(stage / r.dest).stat().st_size} bytes, {how}\n")
        atomic_write_bytes(stage / MANIFEST, json.dumps({"name": name, "source": entry.source, "sha256": sums},
                                                        indent=1).encode())
        _fsync_dir(stage)
        old = None
        if target.exists() or target.is_symlink():  # a stale or broken copy: swap it out, then drop it
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".{entry.target}.", suffix=".old"))
            os.replace(target, old / "previous")
        os.replace(stage, target)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        out.write("".join(lines))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def fetch(name: str, to: Optional[Path] = None, registry: Optional[dict[str, Weights]] = None,
          out: Optional[TextIO] = None) -> Path:
    """Download and verify the weights called ``name`` into ``to`` (default :func:`default_dir`)
    unless a verified copy is there; print what was checked and the config lines that use them;
    the installed path. ConfigError for an unknown name or a folder that cannot be written,
    FetchError (nothing installed) when a download fails."""
    registry = REGISTRY if registry is None else registry
    out = sys.stdout if out is None else out
    if name not in registry:
        raise ConfigError(f"weights fetch: unknown weights {name!r}; known: {', '.join(sorted(registry))}")
    entry = registry[name]
    root = _writable(Path(to).expanduser() if to is not None else default_dir())
    target = root / entry.target
    out.write(f"{name}: {entry.source}\n")
    if _verified(entry, target):
        out.write(f"  {target} is already there and verified (sha256 of every file); nothing downloaded\n")
    else:
        _install(name, entry, root, target, out)
        out.write(f"  installed {target}\n")
    out.write(f"use it in a grid file:\n  {entry.use.format(path=target)}\n")
    out.write("or on the command line: " + " ".join(f"--set {s.format(path=target)}" for s in entry.sets) + "\n")
    return target


def cmd_fetch(args: argparse.Namespace) -> int:
    """``ablate weights fetch``: 0 when installed or already there, 1 (130 on Ctrl-C) when a
    download failed, with one line on stderr; bad names and folders raise ConfigError (exit 2)."""
    try:
        fetch(args.name, Path(args.to) if args.to else None)
    except FetchError as exc:
        print(f"ablate weights fetch: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def add_arguments(w: argparse.ArgumentParser) -> None:
    """The arguments of ``ablate weights``: ``fetch NAME [--to DIR]``."""
    wsub = w.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    f = wsub.add_parser("fetch", help=f"download, verify and install: {' | '.join(REGISTRY)}")
    f.add_argument("name", metavar="NAME", help=f"one of: {', '.join(REGISTRY)}")
    f.add_argument("--to", metavar="DIR", help="folder to install into (default: $ABLATE_WEIGHTS or "
                                               "~/.cache/ablate/weights)")
