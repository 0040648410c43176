"""optuna-dashboard reads ``ablate``'s results database as it is: started on loopback against a
database holding ablate's tables and a study whose trials are ablate runs, its API lists the
study and every trial with its parameters and value (README: "optuna-dashboard <the URL>")."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import unavailable
from reportgrid import build_study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:  # loopback only
        return json.loads(r.read())


def test_optuna_dashboard_serves_our_study(tmp_path):
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        unavailable("optuna-dashboard is not installed; `pip install -e \".[test]\"`")
    url, values = build_study(tmp_path, name="dash")
    port = _free_port()
    exe = shutil.which("optuna-dashboard")
    cmd = [exe] if exe else [sys.executable, "-c", "from optuna_dashboard._cli import main; main()"]
    proc = subprocess.Popen([*cmd, url, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        studies = None
        for _ in range(150):  # up to 30 s for the server to start
            if proc.poll() is not None:
                break
            try:
                studies = _get(f"{base}/api/studies")
                break
            except OSError:
                time.sleep(0.2)
        assert studies is not None, f"optuna-dashboard did not start: {proc.communicate(timeout=5)[0][-2000:]}"
        (summary,) = [s for s in studies["study_summaries"] if s["study_name"] == "dash"]
        assert summary["directions"] == ["minimize"]
        detail = _get(f"{base}/api/studies/{summary['study_id']}")
        trials = sorted(detail["trials"], key=lambda t: t["number"])
        assert [t["number"] for t in trials] == list(range(len(values)))
        assert [t["values"] for t in trials] == [[v] for v in values]
        assert all(t["state"] == "Complete" for t in trials)
        assert {p["name"] for p in trials[0]["params"]} == {"train.lr", "model.width"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
