#!/usr/bin/python3
# REST API: conversations (direct uniqueness, groups with context, listing
# with last_message / unread_count / pagination, one conversation, access
# rules), message history (newest first, before_seq, after_seq ascending,
# limit, next), /me, error answers (400, 404, 405, 413) and the service
# role creating conversations for others.
import http.client
import json
import os
import re
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

TS = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"

pg = PgCluster()
ng = Nginx(pg, workers=2)

TA = token("alice", name="Alice")
TB = token("bob")
TC = token("carol")
TM = token("mallory")
TS_ = token("platform", role="service", name="Platform")


def code(b):
    return b.get("error", {}).get("code") if isinstance(b, dict) else None


def conv_of(b):
    return b.get("conversation") if isinstance(b, dict) else None


def is_json_error(st, h, b, status, name, ecode=None):
    is_(st, status, name + " -> %d" % status)
    like(h.get("content-type"), r"^application/json", name + ": JSON answer")
    ok(isinstance(b, dict) and isinstance(b.get("error"), dict)
       and isinstance(b["error"].get("code"), str) and "message" in b["error"],
       name + ": {\"error\":{\"code\",\"message\"}}")
    if ecode:
        is_(code(b), ecode, name + ": code %s" % ecode)


def post(path, tok, body):
    return api("POST", "/chat/api" + path, token=tok, json=body)


def get(path, tok):
    return api("GET", "/chat/api" + path, token=tok)


# ---------------------------------------------------------------- /me ----

st, h, b = get("/me", TA)
is_(st, 200, "GET /me")
is_(b, {"user": {"id": "alice", "name": "Alice", "role": "user"}, "unread_total": 0},
    "GET /me: user, name, role, unread_total")
st, h, b = get("/me", TS_)
is_((b or {}).get("user", {}).get("role") if isinstance(b, dict) else None, "service",
    "GET /me with a service token: role service")
st, h, b = api("GET", "/chat/api/me")
is_json_error(st, h, b, 401, "GET /me without a token", "unauthorized")

# ------------------------------------------------------ direct conversations ----

st, h, b = post("/conversations", TA, {"kind": "direct", "members": ["bob"]})
is_(st, 201, "alice creates a direct conversation with bob: 201")
D = conv_of(b) or {}
ok(isinstance(D.get("id"), str) and D["id"].isdigit(), "conversation id is a digit string")
is_(D.get("kind"), "direct", "kind direct")
is_(D.get("members"), ["alice", "bob"], "members alice, bob")
is_(D.get("last_seq"), 0, "last_seq 0")
like(D.get("created_at"), TS, "created_at RFC 3339 UTC with milliseconds")
ok("title" in D and "context" in D, "title and context present")

st, h, b = post("/conversations", TB, {"kind": "direct", "members": ["alice"]})
is_(st, 200, "bob creates the same direct conversation: 200")
is_((conv_of(b) or {}).get("id"), D.get("id"), "... the existing one")
st, h, b = post("/conversations", TA, {"kind": "direct", "members": ["alice", "bob"]})
is_(st, 200, "alice lists herself too: 200")
is_((conv_of(b) or {}).get("id"), D.get("id"), "... the existing one")
st, h, b = post("/conversations", TA, {"kind": "direct", "members": ["bob", "alice"]})
is_((st, (conv_of(b) or {}).get("id")), (200, D.get("id")), "order of members does not matter")
is_(pg.query("SELECT count(*) FROM chat_conversations WHERE kind = 'direct'"), [(1,)],
    "DB: one direct conversation")
is_(pg.query("SELECT count(*) FROM chat_events WHERE kind = 'conversation.created'"), [(1,)],
    "DB: one conversation.created event (none for the repeats)")

for name, body in (("no other member", {"kind": "direct", "members": []}),
                   ("only the caller", {"kind": "direct", "members": ["alice"]}),
                   ("three members", {"kind": "direct", "members": ["bob", "carol"]}),
                   ("members missing", {"kind": "direct"}),
                   ("members not an array", {"kind": "direct", "members": "bob"}),
                   ("a member not a string", {"kind": "direct", "members": [7]}),
                   ("an empty member id", {"kind": "direct", "members": [""]}),
                   ("unknown kind", {"kind": "triad", "members": ["bob"]}),
                   ("kind missing", {"members": ["bob"]})):
    st, h, b = post("/conversations", TA, body)
    is_json_error(st, h, b, 400, "direct/create with %s" % name, "bad_request")

# ------------------------------------------------------- group conversations ----

ctx = {"gig_id": "g-42", "nested": {"a": [1, 2, 3]}, "flag": True}
st, h, b = post("/conversations", TA, {"kind": "group", "members": ["bob", "carol", "alice"],
                                       "title": "Gig 42", "context": ctx})
is_(st, 201, "group with title and context: 201")
G = conv_of(b) or {}
is_(G.get("kind"), "group", "kind group")
is_(G.get("title"), "Gig 42", "title returned")
is_(G.get("context"), ctx, "context returned as given")
is_(G.get("members"), ["alice", "bob", "carol"], "members include the creator once")
st, h, b = post("/conversations", TA, {"kind": "group", "members": ["bob", "carol"],
                                       "title": "Gig 42"})
is_(st, 201, "a second group with the same members is a new conversation")
G2 = conv_of(b) or {}
isnt(G2.get("id"), G.get("id"), "... with another id")
st, h, b = post("/conversations", TA, {"kind": "group", "members": ["bob"],
                                       "context": "not an object"})
is_json_error(st, h, b, 400, "group with a non-object context", "bad_request")
st, h, b = post("/conversations", TA, {"kind": "group", "members": ["bob"], "title": 5})
is_json_error(st, h, b, 400, "group with a numeric title", "bad_request")
st, h, b = post("/conversations", TA, {"kind": "group", "members": ["bob"], "title": "t" * 201})
is_json_error(st, h, b, 400, "group with a 201-byte title", "bad_request")
st, h, b = post("/conversations", TA, {"kind": "group", "members": ["bob"],
                                       "context": {"pad": "c" * 5000}})
is_json_error(st, h, b, 413, "group with a 5000-byte context", "too_large")

# -------------------------------------------------------- service role ----

st, h, b = post("/conversations", TS_, {"kind": "group", "members": ["bob", "carol", "dave"],
                                        "title": "ops", "context": {"gig_id": "g-7"}})
is_(st, 201, "service creates a group for others: 201")
S = conv_of(b) or {}
is_(S.get("members"), ["bob", "carol", "dave"], "the service is not a member")
is_(S.get("context"), {"gig_id": "g-7"}, "service group context")
is_(pg.query("SELECT count(*) FROM chat_members WHERE user_id = 'platform'"), [(0,)],
    "DB: the service is in no membership")
st, h, b = get("/conversations/%s" % S.get("id"), TB)
is_((st, (conv_of(b) or {}).get("id")), (200, S.get("id")), "bob (a member) reads it")
st, h, b = post("/conversations", TS_, {"kind": "direct", "members": ["carol", "dave"]})
is_(st, 201, "service creates a direct conversation for two others: 201")
SD = conv_of(b) or {}
is_(SD.get("members"), ["carol", "dave"], "... members carol and dave")
st, h, b = post("/conversations", TC, {"kind": "direct", "members": ["dave"]})
is_((st, (conv_of(b) or {}).get("id")), (200, SD.get("id")),
    "carol creating it again gets the service-made one (200)")
st, h, b = post("/conversations", TS_, {"kind": "direct", "members": ["carol"]})
is_json_error(st, h, b, 400, "service direct with one member", "bad_request")
st, h, b = get("/conversations", TS_)
is_((st, (b or {}).get("conversations") if isinstance(b, dict) else None), (200, []),
    "the service's own list is empty (not a member anywhere)")

# ------------------------------------------------------ one conversation ----

st, h, b = get("/conversations/%s" % G.get("id"), TB)
is_(st, 200, "GET /conversations/{id} as a member: 200")
got = dict(conv_of(b) or {})
extra = {k: got.pop(k, None) for k in ("receipts", "unread_count")}
is_(got, G, "... the same object as on create")
is_(extra, {"receipts": [{"user": u, "delivered_seq": 0, "read_seq": 0}
                         for u in ("alice", "bob", "carol")], "unread_count": 0},
    "... plus every member's receipts and the caller's unread_count")
st, h, b = get("/conversations/%s" % G.get("id"), TM)
is_json_error(st, h, b, 403, "GET /conversations/{id} as a non-member", "forbidden")
st, h, b = get("/conversations/987654321", TA)
is_json_error(st, h, b, 404, "GET /conversations/{unknown}", "not_found")
st, h, b = get("/conversations/abc", TA)
is_json_error(st, h, b, 404, "GET /conversations/abc", "not_found")

# ------------------------------------------------------------ messages ----

N = 25
for i in range(1, N + 1):
    tok = TB if i % 2 else TC
    st, h, b = post("/conversations/%s/messages" % G.get("id"), tok,
                    {"client_msg_id": "h-%d" % i, "body": "history %d" % i})
    if st != 201:
        diag("send %d: %s %r" % (i, st, b))
st, h, b = post("/conversations/%s/messages" % D.get("id"), TB,
                {"client_msg_id": "d-1", "body": "hi alice"})
st, h, b = post("/conversations/%s/messages" % D.get("id"), TB,
                {"client_msg_id": "d-2", "body": "are you there"})
st, h, b = post("/conversations/%s/messages" % D.get("id"), TB,
                {"client_msg_id": "d-3", "body": "?"})
st, h, b = post("/conversations/%s/messages" % D.get("id"), TA,
                {"client_msg_id": "d-4", "body": "yes", "format": "markdown"})
is_(st, 201, "messages posted")
D_LAST = (b or {}).get("message") if isinstance(b, dict) else None


def hist(conv, tok=TA, **q):
    qs = "&".join("%s=%s" % kv for kv in q.items())
    return get("/conversations/%s/messages%s" % (conv, ("?" + qs) if qs else ""), tok)


def seqs(b):
    return [m.get("seq") for m in b.get("messages", [])] if isinstance(b, dict) else None


gid = G.get("id")
st, h, b = hist(gid)
is_(st, 200, "GET messages: 200")
is_(seqs(b), list(range(N, 0, -1)), "newest first by default")
is_((b or {}).get("next", "missing"), None, "next null: nothing older")
m = (b.get("messages") or [{}])[-1] if isinstance(b, dict) else {}
is_(sorted(m.keys()), sorted(["id", "conversation_id", "seq", "sender", "created_at",
                              "client_msg_id", "body", "format", "reply_to", "attachments",
                              "edited_at", "deleted", "reactions", "reply_count", "last_reply"]),
    "message object fields (history adds the reader's view of reactions, and the thread)")
ok(isinstance(m.get("id"), str) and m.get("conversation_id") == gid and m.get("seq") == 1
   and m.get("sender") == "bob" and m.get("body") == "history 1"
   and m.get("client_msg_id") == "h-1" and m.get("format") == "text"
   and m.get("reply_to") is None and m.get("attachments") == []
   and m.get("edited_at") is None and m.get("deleted") is False,
   "message object values")
like(m.get("created_at"), TS, "message created_at format")

st, h, b = hist(gid, limit=10)
is_((seqs(b), b.get("next") if isinstance(b, dict) else None),
    (list(range(25, 15, -1)), 16), "limit=10: seq 25..16, next 16")
st, h, b = hist(gid, limit=10, before_seq=16)
is_((seqs(b), b.get("next") if isinstance(b, dict) else None),
    (list(range(15, 5, -1)), 6), "before_seq=16: 15..6, next 6")
st, h, b = hist(gid, limit=10, before_seq=6)
is_((seqs(b), b.get("next", "missing") if isinstance(b, dict) else None),
    ([5, 4, 3, 2, 1], None), "before_seq=6: 5..1, next null")
st, h, b = hist(gid, limit=10, after_seq=0)
is_((seqs(b), b.get("next") if isinstance(b, dict) else None),
    (list(range(1, 11)), 10), "after_seq=0: ascending 1..10, next 10")
st, h, b = hist(gid, limit=10, after_seq=10)
is_((seqs(b), b.get("next") if isinstance(b, dict) else None),
    (list(range(11, 21)), 20), "after_seq=10: 11..20, next 20")
st, h, b = hist(gid, limit=10, after_seq=20)
is_((seqs(b), b.get("next", "missing") if isinstance(b, dict) else None),
    ([21, 22, 23, 24, 25], None), "after_seq=20: 21..25, next null")
st, h, b = hist(gid, after_seq=5, before_seq=9)
is_(seqs(b), [6, 7, 8], "after_seq=5&before_seq=9: 6, 7, 8")
st, h, b = hist(gid, after_seq=25)
is_(seqs(b), [], "after_seq=last: empty")
# walking all pages newest first gives every message once
got, before = [], None
for _ in range(20):
    q = {"limit": 7}
    if before is not None:
        q["before_seq"] = before
    st, h, b = hist(gid, **q)
    if st != 200:
        break
    got += seqs(b)
    before = b.get("next")
    if before is None:
        break
is_(got, list(range(N, 0, -1)), "paging by next (limit=7) walks all 25 once")
for name, q in (("limit=0", {"limit": 0}), ("limit=201", {"limit": 201}),
                ("before_seq=abc", {"before_seq": "abc"}), ("after_seq=-1", {"after_seq": -1})):
    st, h, b = hist(gid, **q)
    is_json_error(st, h, b, 400, "GET messages with %s" % name, "bad_request")
st, h, b = hist(gid, tok=TM)
is_json_error(st, h, b, 403, "GET messages as a non-member", "forbidden")
st, h, b = hist("987654321")
is_json_error(st, h, b, 404, "GET messages of an unknown conversation", "not_found")

# ------------------------------------------------------ listing ----

st, h, b = get("/conversations", TA)
is_(st, 200, "GET /conversations: 200")
convs = (b or {}).get("conversations") if isinstance(b, dict) else None
convs = convs or []
is_([c.get("id") for c in convs], [D.get("id"), G.get("id"), G2.get("id")],
    "alice's conversations, most recently active first")
byid = {c.get("id"): c for c in convs}
d = byid.get(D.get("id"), {})
is_(d.get("last_message"), D_LAST, "direct: last_message is the latest message object")
# sending marks the conversation read up to the sent message (PROTOCOL §9):
# alice's reply d-4 came after bob's three
is_(d.get("unread_count"), 0, "direct: alice replied after bob's 3 messages: unread 0")
is_(d.get("members"), ["alice", "bob"], "direct: members listed")
is_(d.get("last_seq"), 4, "direct: last_seq 4")
g = byid.get(G.get("id"), {})
is_((g.get("last_message") or {}).get("seq"), N, "group: last_message seq 25")
is_(g.get("unread_count"), N, "group: unread_count 25 (all from others)")
is_(g.get("context"), ctx, "group: context in the list")
g2 = byid.get(G2.get("id"), {})
is_((g2.get("last_message", "missing"), g2.get("unread_count")), (None, 0),
    "empty group: last_message null, unread_count 0")
st, h, b = get("/conversations", TB)
bd = {c.get("id"): c for c in (b.get("conversations") or [])} if isinstance(b, dict) else {}
is_(bd.get(D.get("id"), {}).get("unread_count"), 1, "bob's unread_count in the direct: 1")
is_(bd.get(D.get("id"), {}).get("unread_count"), 1, "bob's unread_count in the direct: 1 "
    "(alice's reply)")
is_(bd.get(G.get("id"), {}).get("unread_count"), 0, "bob's unread_count in the group: 0 "
    "(the last message, 25, is his)")
cd = {c.get("id"): c for c in (get("/conversations", TC)[2].get("conversations") or [])}
is_(cd.get(G.get("id"), {}).get("unread_count"), 1, "carol's unread_count in the group: 1 "
    "(bob's 25, after her 24)")
ok(S.get("id") in bd, "bob's list includes the service-made group")
st, h, b = get("/conversations", TM)
is_((st, b.get("conversations") if isinstance(b, dict) else None), (200, []),
    "a user in no conversation gets an empty list")

# pagination, limit=1
pages, nxt, seen = 0, None, []
for _ in range(10):
    path = "/conversations?limit=1" + ("&before=%s" % nxt if nxt else "")
    st, h, b = get(path, TA)
    if st != 200 or not isinstance(b, dict):
        diag("page: %s %r" % (st, b))
        break
    pages += 1
    seen += [c.get("id") for c in b.get("conversations", [])]
    ok(len(b.get("conversations", [])) <= 1, "page %d has at most 1 conversation" % pages)
    nxt = b.get("next")
    if not nxt:
        break
    ok(isinstance(nxt, str), "next is an opaque string")
is_(seen, [c.get("id") for c in convs], "paging with limit=1 and next lists all, in order, once")
st, h, b = get("/conversations?limit=2", TA)
is_(len((b or {}).get("conversations", [])) if isinstance(b, dict) else None, 2, "limit=2: 2")
for name, q in (("limit=0", "limit=0"), ("limit=101", "limit=101"),
                ("before=garbage", "before=garbage")):
    st, h, b = get("/conversations?" + q, TA)
    is_json_error(st, h, b, 400, "GET /conversations?%s" % name, "bad_request")

# ------------------------------------------------------ errors ----

st, h, b = api("POST", "/chat/api/conversations", token=TA, body="{not json",
               headers={"Content-Type": "application/json"})
is_json_error(st, h, b, 400, "POST /conversations with invalid JSON", "bad_request")
st, h, b = api("POST", "/chat/api/conversations", token=TA, body="[1]",
               headers={"Content-Type": "application/json"})
is_json_error(st, h, b, 400, "POST /conversations with a JSON array", "bad_request")
st, h, b = api("POST", "/chat/api/conversations", token=TA, body="")
is_json_error(st, h, b, 400, "POST /conversations with an empty body", "bad_request")
big = json.dumps({"kind": "group", "members": ["bob"], "title": "x",
                  "context": {"pad": "p" * 70000}})
st, h, b = api("POST", "/chat/api/conversations", token=TA, body=big,
               headers={"Content-Type": "application/json"})
is_json_error(st, h, b, 413, "POST /conversations with a 70k body", "too_large")
for path in ("/chat/api/nope", "/chat/api/conversations/%s/nope" % gid, "/chat/api/me/x"):
    st, h, b = api("GET", path, token=TA)
    is_json_error(st, h, b, 404, "GET %s" % path, "not_found")
for method, path in (("PUT", "/chat/api/conversations"), ("DELETE", "/chat/api/me"),
                     ("GET", "/chat/api/tickets"), ("PUT", "/chat/api/conversations/%s" % gid),
                     ("DELETE", "/chat/api/conversations/%s/messages" % gid)):
    st, h, b = api(method, path, token=TA)
    is_json_error(st, h, b, 405, "%s %s" % (method, path))
is_(pg.query("SELECT count(*) FROM chat_conversations"), [(5,)],
    "DB: 5 conversations (no failed create stored one)")

# ------------------------------------------------------ request bodies ----
# Bodies are read into memory only: one over chat_max_message_size (64k)
# is refused with 413 too_large in JSON -- chunked or not, all at once or
# trickling in -- and nginx never buffers a body to a temporary file
# (it would log "a client request body is buffered to a temporary file").

MAX = 64 * 1024
TEMP_RE = r"buffered to a temporary file"
log_mark = len(ng.error_log())


def raw_post(path, payload, chunk=None, delay=0.0, tok=TA, length=None):
    """POSTs payload (bytes) on a new connection, chunked in pieces of
    `chunk` bytes when chunk is given (each piece written on its own,
    `delay` s apart), else with Content-Length (`length` overrides it).
    Returns (status, headers, parsed JSON body or raw bytes)."""
    head = ("POST %s HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: application/json\r\n" % (path, tok))
    head += ("Transfer-Encoding: chunked\r\n" if chunk
             else "Content-Length: %d\r\n" % (len(payload) if length is None else length))
    s = socket.create_connection(("127.0.0.1", ng.port), timeout=10)
    data = b""
    try:
        s.sendall(head.encode() + b"\r\n")
        pieces = ([payload[i:i + chunk] for i in range(0, len(payload), chunk)]
                  if chunk else [payload])
        try:
            for i, p in enumerate(pieces):
                if chunk:
                    p = b"%x\r\n%s\r\n" % (len(p), p) + (b"0\r\n\r\n" if i == len(pieces) - 1 else b"")
                s.sendall(p)
                if delay:
                    time.sleep(delay)
        except OSError:
            pass    # refused midway: the answer is waiting
        while b"\r\n\r\n" not in data:
            b = s.recv(65536)
            if not b:
                break
            data += b
        hd, _, rest = data.partition(b"\r\n\r\n")
        lines = hd.decode("latin-1").split("\r\n")
        st = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else None
        hdrs = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        n = int(hdrs.get("content-length", "0"))
        while len(rest) < n:
            b = s.recv(65536)
            if not b:
                break
            rest += b
        try:
            body = json.loads(rest[:n])
        except ValueError:
            body = rest
        return st, hdrs, body
    finally:
        s.close()


def msg_body(cmid, total):
    """A message JSON of exactly `total` bytes."""
    base = json.dumps({"client_msg_id": cmid, "body": ""}).encode()
    return json.dumps({"client_msg_id": cmid, "body": "b" * (total - len(base))}).encode()


MSGS = "/chat/api/conversations/%s/messages" % gid
big = msg_body("too-big", 100 * 1024)
st, h, b = raw_post(MSGS, big, chunk=8192)
is_json_error(st, h, b, 413, "a chunked 100k body, all at once", "too_large")
is_(h.get("connection"), "close", "... and the connection is not kept (the body was not read)")
st, h, b = raw_post(MSGS, big, chunk=8192, delay=0.02)
is_json_error(st, h, b, 413, "a chunked 100k body, trickling in", "too_large")
st, h, b = raw_post(MSGS, msg_body("exact-plus-1", MAX + 1), chunk=4096)
is_json_error(st, h, b, 413, "a chunked body of chat_max_message_size + 1", "too_large")
st, h, b = raw_post(MSGS, msg_body("fine-chunks", 16 * 1024), chunk=1)
is_json_error(st, h, b, 413, "a 16k body in 1-byte chunks (its framing would overflow "
              "the buffer)", "too_large")
st, h, b = raw_post(MSGS, b"", length=2 * 1024 * 1024)
is_json_error(st, h, b, 413, "Content-Length 2m (above nginx's default "
              "client_max_body_size too)", "too_large")
st, h, b = raw_post(MSGS, msg_body("cl-plus-1", MAX + 1))
is_json_error(st, h, b, 413, "a body of chat_max_message_size + 1 with Content-Length",
              "too_large")

for label, payload, chunk, delay in (
        ("chunked, just under the limit", msg_body("under-c", MAX - 300), 1024, 0),
        ("chunked, exactly the limit", msg_body("exact-c", MAX), 4096, 0),
        ("chunked, exactly the limit, trickling in", msg_body("exact-t", MAX), 8192, 0.02),
        ("Content-Length, exactly the limit", msg_body("exact-l", MAX), None, 0)):
    st, h, b = raw_post(MSGS, payload, chunk=chunk, delay=delay)
    is_(st, 201, "a message body %s (%d bytes): 201" % (label, len(payload)))
    if st != 201:
        diag("%r" % (b if not isinstance(b, bytes) else b[:300],))

ok(not re.search(TEMP_RE, ng.error_log()[log_mark:]),
   "no request body was buffered to a temporary file")
tmpd = os.path.join(ng.dir, "client_body_temp")
is_(sorted(os.listdir(tmpd)) if os.path.isdir(tmpd) else [], [],
    "client_body_temp is empty")

# ------------------------------------------------------ keep-alive ----
# Several requests on one HTTP/1.1 connection: each gets its answer.


def keepalive(reqs):
    c = http.client.HTTPConnection("127.0.0.1", ng.port, timeout=5)
    out = []
    try:
        for method, path, body in reqs:
            hdrs = {"Host": "localhost", "Authorization": "Bearer " + TA}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                hdrs["Content-Type"] = "application/json"
            c.request(method, path, body=data, headers=hdrs)
            r = c.getresponse()
            r.read()
            out.append(r.status)
    except Exception as e:  # noqa: BLE001
        out.append("%s: %s" % (type(e).__name__, e))
    finally:
        c.close()
    return out


is_(keepalive([("GET", "/chat/api/me", None), ("GET", "/chat/api/conversations", None),
               ("GET", "/chat/api/conversations/%s/messages" % gid, None),
               ("GET", "/chat/api/me", None)]),
    [200, 200, 200, 200], "keep-alive: GET requests one after another")
is_(keepalive([("POST", "/chat/api/conversations/%s/messages" % gid,
                {"client_msg_id": "ka-1", "body": "ka"}),
               ("GET", "/chat/api/me", None)]),
    [201, 200], "keep-alive: POST a message, then GET /me")
is_(keepalive([("POST", "/chat/api/conversations", {"kind": "direct", "members": ["bob"]}),
               ("GET", "/chat/api/me", None)]),
    [200, 200], "keep-alive: POST /conversations, then GET /me")
is_(keepalive([("POST", "/chat/api/conversations", {"kind": "bad", "members": []}),
               ("GET", "/chat/api/me", None)]),
    [400, 200], "keep-alive: a 400 on POST /conversations, then GET /me")

done()
