#!/usr/bin/python3
# Unit tests of the browser client client/chat.js, run in node (no browser,
# no nginx, no PostgreSQL): ChatStore's state logic (dedup by id and own
# client_msg_id, seq order, gaps, edits/tombstones, reactions, receipts and
# message states, unread counts, conversation order, snapshot round trip),
# backoffDelay, errorText, and ChatClient's outbox and transports against an
# in-memory fake server (fetch and WebSocket replaced): sends while down,
# 503 retries, permanent failures, retry/discard, no duplicates, cursor
# resume, WebSocket -> long-poll fallback and the probe back, close().
# The tests are t/lib/client_unit.mjs; it prints the TAP this passes on.
import os
import shutil
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "lib", "client_unit.mjs")
LIMIT = 60


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


node = shutil.which("node") or "/usr/bin/node"
if not os.access(node, os.X_OK):
    out("1..1")
    out("not ok 1 - node is missing: run scripts/install-deps.sh")
    sys.exit(1)

# warnings are collected by the script itself (a TimeoutOverflowWarning per
# runaway timer would flood the output)
proc = subprocess.Popen([node, "--no-warnings", SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                        text=True, encoding="utf-8", errors="replace")
timed_out = []


def kill():
    timed_out.append(True)
    proc.kill()


timer = threading.Timer(LIMIT, kill)
timer.start()
last = 0
planned = False
for line in proc.stdout:
    line = line.rstrip("\n")
    out(line)
    words = line.split()
    if line.startswith("ok ") or line.startswith("not ok "):
        try:
            last = int(words[1] if words[0] == "ok" else words[2])
        except (IndexError, ValueError):
            pass
    elif line.startswith("1.."):
        planned = True
rc = proc.wait()
timer.cancel()

if timed_out or not planned:
    why = ("did not finish within %d s" % LIMIT) if timed_out else ("exited (%d) without a plan" % rc)
    out("not ok %d - t/lib/client_unit.mjs %s" % (last + 1, why))
    if not planned:
        out("1..%d" % (last + 1))
    sys.exit(1)
sys.exit(rc)
