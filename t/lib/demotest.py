"""The demo's token server (client/demo/app.py) for the demo's browser
tests (t/060 Chromium, t/113 Firefox)."""
import http.client
import json
import os
import subprocess

from chattest import REPO, hs_secret_file, tmpdir


def start_app(port, chat_port, log="app-%d.log"):
    """app.py on `port`, seeding the chat at 127.0.0.1:chat_port, signing
    with the harness secret; its stderr in the test's temp dir."""
    return subprocess.Popen(
        ["/usr/bin/python3", os.path.join(REPO, "client", "demo", "app.py"),
         "--port", str(port), "--secret", hs_secret_file(),
         "--chat-url", "http://127.0.0.1:%d/chat" % chat_port],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(tmpdir(), log % port if "%d" in log else log), "w"))


def app_get(port, path):
    """GET path from app.py: (status, JSON body)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        c.close()


def app_up(port):
    try:
        return app_get(port, "/health")[0] == 200
    except OSError:
        return False
