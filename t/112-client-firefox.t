#!/usr/bin/python3
# client/chat.js in real Firefox ESR (Debian's, driven by puppeteer-core over WebDriver BiDi),
# from a page on another origin than the chat host: two users chat (typing,
# delivered and read ticks); three tabs of one user hold one server
# connection and survive the leader tab closing; messages typed while the
# server is down survive a reload and are stored once, in order; a proxy
# that refuses WebSocket, then SSE, moves the client to SSE, then
# long-poll, and it comes back to WebSocket; close() leaves nothing behind.
# The steps are in t/lib/client_browser.js, the assertions in
# t/lib/client_run.py.
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from client_run import run  # noqa: E402

run("firefox")
