"""``ablate weights fetch`` against a real HTTP server on loopback: a verified download is
installed and its config lines printed; a wrong checksum, a cut-short body, an HTTP error, a
failing second file of a set and Ctrl-C leave nothing behind; a verified copy is not fetched
again; the registry's pins are well-formed and its config lines are valid settings."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from ablate import weights
from ablate.cli import main
from ablate.config import ConfigError, RunSpec
from ablate.weights import FetchError, Remote, Weights, fetch

ONE = b"inception weights stand-in\n" * 1000
TWO = b"a second file\n" * 300


class Site:
    """What the loopback server serves: ``path -> (kind, body, headers)``; it counts requests.
    kinds: ok, short (Content-Length twice the body, then the connection closes), redirect
    (body is the Location), stall (half the body, then SIGINT to ``victim``, then waits)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, bytes, dict[str, str]]] = {}
        self.hits: Counter = Counter()
        self.victim = None
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # noqa: ANN002
                pass

            def do_GET(self):  # noqa: N802
                site.hits[self.path] += 1
                if self.path not in site.routes:
                    self.send_error(404)
                    return
                kind, body, headers = site.routes[self.path]
                self.send_response(302 if kind == "redirect" else 200)
                for k, v in headers.items():
                    self.send_header(k, v)
                if kind == "redirect":
                    self.send_header("Location", body.decode())
                    body = b""
                self.send_header("Content-Length", str(len(body) * (2 if kind == "short" else 1)))
                self.end_headers()
                if kind == "stall":
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    time.sleep(0.5)
                    os.kill(site.victim.pid, signal.SIGINT)
                    time.sleep(5)
                self.wfile.write(body)
                self.close_connection = kind == "short"

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def serve(self, path: str, body: bytes, kind: str = "ok", **headers: str) -> str:
        self.routes[path] = (kind, body, headers)
        return self.url(path)


@pytest.fixture
def site():
    s = Site()
    yield s
    s.server.shutdown()
    s.server.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def one_file(url: str, digest: str = sha(ONE)) -> dict[str, Weights]:
    return {"tiny": Weights("tiny.pth", (Remote(url, "tiny.pth", digest, len(ONE)),), "a test file",
                            "eval: {{inception_weights: {path}}}", ("eval.inception_weights={path}",), folder=False)}


def two_files(first: Remote, second: Remote) -> dict[str, Weights]:
    return {"pair": Weights("pair", (first, second), "a test folder", "eval: {{clip_model: {path}}}",
                            ("eval.clip_model={path}",))}


def test_fetch_installs_a_verified_file_and_prints_how_to_use_it(site, tmp_path):
    out = io.StringIO()
    path = fetch("tiny", tmp_path / "w", one_file(site.serve("/one.pth", ONE)), out)
    assert path == (tmp_path / "w" / "tiny.pth").resolve() and path.read_bytes() == ONE
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.pth"]  # no temp file left
    text = out.getvalue()
    assert "sha256 matches the one pinned in ablate" in text
    assert f"eval: {{inception_weights: {path}}}" in text and f"--set eval.inception_weights={path}" in text
    again = io.StringIO()
    fetch("tiny", tmp_path / "w", one_file(site.url("/one.pth")), again)
    assert site.hits["/one.pth"] == 1 and "already there and verified" in again.getvalue()
    path.write_bytes(b"tampered")  # a copy that no longer verifies is fetched again
    fetch("tiny", tmp_path / "w", one_file(site.url("/one.pth")), io.StringIO())
    assert site.hits["/one.pth"] == 2 and path.read_bytes() == ONE


@pytest.mark.parametrize("case", ["wrong checksum", "cut short", "http 404", "wrong size"])
def test_a_failed_download_leaves_nothing(site, tmp_path, case):
    url = site.serve("/one.pth", ONE, kind="short" if case == "cut short" else "ok")
    registry = one_file(site.url("/absent.pth") if case == "http 404" else url,
                        sha(b"other bytes") if case == "wrong checksum" else sha(ONE))
    if case == "wrong size":
        registry["tiny"] = Weights("tiny.pth", (Remote(url, "tiny.pth", sha(ONE), len(ONE) + 1),), "", "", (),
                                   folder=False)
    with pytest.raises(FetchError) as err:
        fetch("tiny", tmp_path / "w", registry, io.StringIO())
    expected = {"wrong checksum": "checksum mismatch", "cut short": "cut short", "http 404": "HTTP 404",
                "wrong size": f"expected {len(ONE) + 1}"}[case]
    assert str(err.value).startswith("tiny/tiny.pth: ") and expected in str(err.value), err.value
    assert "\n" not in str(err.value) and list((tmp_path / "w").iterdir()) == []


def test_a_set_is_installed_whole_or_not_at_all(site, tmp_path):
    first = Remote(site.serve("/a/config.json", TWO), "config.json", sha(TWO))
    broken = Remote(site.serve("/a/model.bin", ONE), "model.bin", sha(b"not these bytes"))
    with pytest.raises(FetchError, match="pair/model.bin: checksum mismatch"):
        fetch("pair", tmp_path / "w", two_files(first, broken), io.StringIO())
    assert list((tmp_path / "w").iterdir()) == []  # neither the first file nor the staging folder
    good = Remote(site.url("/a/model.bin"), "sub/model.bin", sha(ONE), len(ONE))
    path = fetch("pair", tmp_path / "w", two_files(first, good), io.StringIO())
    assert (path / "config.json").read_bytes() == TWO and (path / "sub" / "model.bin").read_bytes() == ONE
    assert json.loads((path / weights.MANIFEST).read_text())["sha256"] == {"config.json": sha(TWO),
                                                                            "sub/model.bin": sha(ONE)}
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["pair"]
    hits = sum(site.hits.values())
    fetch("pair", tmp_path / "w", two_files(first, good), io.StringIO())
    assert sum(site.hits.values()) == hits  # verified in place: no request at all
    (path / "sub" / "model.bin").write_bytes(b"corrupt")
    fetch("pair", tmp_path / "w", two_files(first, good), io.StringIO())
    assert (path / "sub" / "model.bin").read_bytes() == ONE and [p.name for p in (tmp_path / "w").iterdir()] == ["pair"]


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_unpinned_files_are_checked_against_what_the_origin_declares(site, tmp_path):
    """Hugging Face style: an LFS file's sha256 rides on the origin's redirect (X-Linked-Etag),
    a small file's git blob id is its ETag; the storage host's own ETag is never trusted."""
    storage = site.serve("/storage/blob", ONE, ETag='"' + sha(b"the storage host's own tag") + '"')
    site.serve("/hf/model.safetensors", storage.replace("127.0.0.1", "localhost").encode(), kind="redirect",
               **{"X-Linked-Etag": f'"{sha(ONE)}"'})
    site.serve("/hf/config.json", TWO, ETag=f'W/"{_git_blob_id(TWO)}"')
    model, config = (Remote(site.url(f"/hf/{n}"), n) for n in ("model.safetensors", "config.json"))
    out = io.StringIO()
    path = fetch("pair", tmp_path / "w", two_files(config, model), out)
    assert (path / "model.safetensors").read_bytes() == ONE
    assert "sha256 matches the one 127.0.0.1" in out.getvalue() and "git blob id matches" in out.getvalue()
    site.serve("/hf/model.safetensors", storage.encode(), kind="redirect", **{"X-Linked-Etag": f'"{sha(TWO)}"'})
    with pytest.raises(FetchError, match="pair/model.safetensors: checksum mismatch"):
        fetch("pair", tmp_path / "v", two_files(config, model), io.StringIO())
    site.serve("/storage/blob", ONE, **{"X-Linked-Etag": sha(ONE)})  # right, but said by the storage host
    site.serve("/hf/model.safetensors", storage.replace("127.0.0.1", "localhost").encode(), kind="redirect")
    with pytest.raises(FetchError, match="no published or server-declared checksum"):
        fetch("pair", tmp_path / "u", two_files(config, model), io.StringIO())
    site.serve("/hf/model.safetensors", ONE)  # no pin and nothing declared: refused, not trusted
    with pytest.raises(FetchError, match="no published or server-declared checksum"):
        fetch("pair", tmp_path / "u", two_files(config, model), io.StringIO())
    assert list((tmp_path / "v").iterdir()) == [] and list((tmp_path / "u").iterdir()) == []


def test_cli_fetch(site, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(weights.REGISTRY, "tiny", one_file(site.serve("/one.pth", ONE))["tiny"])
    assert main(["weights", "fetch", "tiny", "--to", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert f"eval: {{inception_weights: {(tmp_path / 'w' / 'tiny.pth').resolve()}}}" in out
    monkeypatch.setenv("ABLATE_WEIGHTS", str(tmp_path / "env"))
    assert main(["weights", "fetch", "tiny"]) == 0 and (tmp_path / "env" / "tiny.pth").read_bytes() == ONE
    monkeypatch.setitem(weights.REGISTRY, "tiny", one_file(site.url("/gone.pth"))["tiny"])
    assert main(["weights", "fetch", "tiny", "--to", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tiny/tiny.pth: HTTP 404" in err and list((tmp_path / "x").iterdir()) == []


def test_cli_bad_name_and_folder_exit_2(tmp_path, capsys):
    assert main(["weights", "fetch", "inceptoin", "--to", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "known: amused-vq, clip-b32, clip-l14, inception" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["weights", "fetch", "inception", "--to", str(blocker / "w")]) == 2
    assert "--to: cannot write to" in capsys.readouterr().err


# the victim takes Ctrl-C as a terminal's process does, whatever it inherited (a shell without job
# control starts background commands with SIGINT ignored, and Python then keeps it ignored)
_INTERRUPTED = """
import signal
import sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from ablate import weights
from ablate.cli import main
weights.REGISTRY["tiny"] = weights.Weights("tiny.pth", (weights.Remote(sys.argv[1], "tiny.pth", "0" * 64),),
                                           "", "", (), folder=False)
sys.exit(main(["weights", "fetch", "tiny", "--to", sys.argv[2]]))
"""


def test_ctrl_c_leaves_nothing(site, tmp_path):
    url = site.serve("/slow.pth", ONE, kind="stall")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(weights.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    site.victim = subprocess.Popen([sys.executable, "-c", _INTERRUPTED, url, str(tmp_path / "w")], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = site.victim.communicate(timeout=60)
    assert site.victim.returncode == 130, err
    assert err.strip().splitlines() == ["ablate weights fetch: tiny/tiny.pth: interrupted (Ctrl-C); nothing was installed"]
    assert list((tmp_path / "w").iterdir()) == []


def test_registry_pins_and_config_lines(tmp_path):
    from ablate.eval.standard import check_clip_model

    for name, entry in weights.REGISTRY.items():
        assert entry.folder or (len(entry.files) == 1 and entry.files[0].sha256), name  # a file re-verifies by pin
        for r in entry.files:
            assert r.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", r.sha256), (name, r.dest)
            assert re.search(r"/resolve/[0-9a-f]{40}/|/releases/download/v[\d.]+/", r.url), r.url  # immutable
        spec = yaml.safe_load(entry.use.format(path="/w/x"))
        RunSpec.model_validate(spec)  # a real setting, spelled right
        assert all(s.split("=")[0].count(".") == 1 for s in entry.sets)
        if entry.use.startswith("eval: {clip_model"):
            root = tmp_path / name
            root.mkdir()
            for r in entry.files:
                (root / r.dest).write_text(json.dumps({"model_type": "clip"}))
            check_clip_model(str(root))  # the files fetched make a directory the CLIP check accepts
    inception = weights.REGISTRY["inception"].files[0]
    assert inception.sha256.startswith(re.search(r"-([0-9a-f]{8})\.pth$", inception.url)[1])  # torch hub prefix
    from ablate.eval.standard import INCEPTION_FILE
    assert weights.REGISTRY["inception"].target == INCEPTION_FILE
    with pytest.raises(ConfigError, match="known: amused-vq, clip-b32, clip-l14, inception"):
        fetch("nope", tmp_path)
