#!/usr/bin/python3
# Attachments (schema 8), two workers, chat_attachment_max_size 64k and
# chat_attachment_unsent_ttl 6s:
#  1. Uploads, raw (?filename=) and multipart/form-data: 201 with id, name,
#     the type told by the bytes (not the client's Content-Type), size and
#     SHA-256; the file in chat_attachments holds exactly the bytes.  A
#     multipart body written a few bytes at a time, with near-delimiters
#     in the file, is cut exactly.
#  2. Limits and refusals: over the size (Content-Length, chunked,
#     multipart), empty, no file, two files, a bad boundary; an HTML page
#     named .png, SVG, unknown binary: 415.
#  3. A message names uploads (WebSocket and REST): only the sender's,
#     unknown ids and another's refused, one bound to another conversation
#     refused, the same one again in its conversation taken; the message
#     carries the metadata.
#  4. Who reads: the uploader before it is sent, not another member; then
#     members and a service token, not a non-member, not a removed member,
#     not a member added later to a since_join conversation; nobody once
#     the message is deleted.  Served by nginx: ranges, HEAD, ETag/304;
#     nosniff, a sandbox CSP, inline only for a plain image.
#  5. The sweep: a never-sent upload and a deleted message's upload lose
#     their files; a sent one keeps its file; erasing a user sweeps theirs.
import asyncio
import hashlib
import json
import os
import shutil
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from chattest import *  # noqa: E402,F403

pg = PgCluster()
G = db_create_conv("ann", ["ann", "bea"], "room")
H = db_create_conv("ann", ["ann", "cid"], "other room")
FILES = os.path.join(tmpdir(), "files")
os.mkdir(FILES)
shutil.chown(FILES, "nobody")
ng = Nginx(pg, workers=2,
           http="chat_attachments %s; chat_attachment_max_size 64k; chat_attachment_unsent_ttl 6s;" % FILES,
           server="location /chat-files/ { internal; alias %s/; }" % FILES)
SVC = token("platform", role="service")
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(6000)


def err(b):
    return b.get("error", {}).get("code") if isinstance(b, dict) else None


def upload(user, data, name="f.bin", ctype="application/octet-stream", **kw):
    return api("POST", "/chat/api/attachments?filename=%s" % name, token=token(user), body=data,
               headers={"Content-Type": ctype}, **kw)


def get(user, aid, tok=None, headers=None, method="GET"):
    return api(method, "/chat/api/attachments/" + aid, token=tok or token(user), headers=headers)


def multipart(parts, bnd="b0UnDaRy"):
    out = b""
    for name, filename, data in parts:
        disp = 'form-data; name="%s"' % name + ('; filename="%s"' % filename if filename else "")
        out += b"--" + bnd.encode() + b"\r\nContent-Disposition: " + disp.encode() + b"\r\n"
        if filename:
            out += b"Content-Type: image/png\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + b"--" + bnd.encode() + b"--\r\n", "multipart/form-data; boundary=" + bnd


def dribble(body, ctype, user="ann", step=3):
    """A POST written `step` bytes at a time."""
    s = socket.create_connection(("127.0.0.1", ng.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = ("POST /chat/api/attachments HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
            "Content-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (token(user), ctype, len(body))).encode()
    s.sendall(head)
    for i in range(0, len(body), step):
        s.sendall(body[i:i + step])
        time.sleep(0.002)
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


def chunked(data, user="ann"):
    """A chunked POST of data in 8 KB chunks; the status."""
    s = socket.create_connection(("127.0.0.1", ng.port), timeout=10)
    s.sendall(("POST /chat/api/attachments HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
               "Content-Type: image/png\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               % token(user)).encode())
    try:
        for i in range(0, len(data), 8192):
            c = data[i:i + 8192]
            s.sendall(b"%x\r\n" % len(c) + c + b"\r\n")
        s.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    data = s.recv(65536)
    s.close()
    return int(data.split(b" ", 2)[1])


def on_disk(aid):
    p = os.path.join(FILES, aid)
    return open(p, "rb").read() if os.path.exists(p) else None


async def main():
    a = await ws_connect(token=token("ann"))

    # ---- 1
    st, _, b = upload("ann", PNG, name="../../etc/cat.png", ctype="text/plain")
    is_(st, 201, "a raw upload: 201")
    att = b["attachment"]
    like(att["id"], r"^[0-9a-f]{32}$", "a random 32-digit id")
    is_((att["name"], att["mime"], att["size"], att["sha256"]),
        ("cat.png", "image/png", len(PNG), hashlib.sha256(PNG).hexdigest()),
        "name (last segment), type by the bytes (not text/plain), size, SHA-256")
    is_(att["url"], "/chat/api/attachments/" + att["id"], "its URL")
    is_(on_disk(att["id"]), PNG, "the file holds exactly the bytes")

    tricky = b"line\r\n--b0UnDaR\r\n--b0UnDaRx\r\r\n--\r\n--b0UnDaRz-no\r" + os.urandom(3000) + b"\r\n-"
    body, ct = multipart([("caption", None, b"hello"), ("file", "tricky.txt", tricky)])
    st, b = dribble(body, ct, step=3)
    ok(st == 201, "a multipart upload written 3 bytes at a time: %s %s" % (st, b))
    if st == 201:
        is_(on_disk(b["attachment"]["id"]), tricky, "the file part exactly, near-delimiters and all")
        is_(b["attachment"]["name"], "tricky.txt", "the part's file name")
    body, ct = multipart([("file", "t.txt", b"plain text here")])
    st, b = dribble(body, ct, step=len(body))
    is_((st, b["attachment"]["mime"]), (201, "text/plain"), "text is text/plain")
    TXT = b["attachment"]

    # ---- 2
    files_before = sorted(os.listdir(FILES))
    big = b"\x89PNG\r\n\x1a\n" + b"x" * (64 * 1024)
    st, _, b = upload("ann", big)
    is_((st, err(b)), (413, "too_large"), "over chat_attachment_max_size (Content-Length): 413")
    st = chunked(big)
    is_(st, 413, "... chunked: 413")
    body, ct = multipart([("file", "big.png", big)])
    st, b = dribble(body, ct, step=16384)
    is_((st, err(b)), (413, "too_large"), "... multipart: 413")
    is_(upload("ann", b"")[0], 400, "an empty file: 400")
    body, ct = multipart([("caption", None, b"no file")])
    is_(dribble(body, ct, step=len(body))[0], 400, "a form without a file: 400")
    body, ct = multipart([("f1", "a.txt", b"one"), ("f2", "b.txt", b"two")])
    is_(dribble(body, ct, step=len(body))[0], 400, "two files: 400")
    is_(api("POST", "/chat/api/attachments", token=token("ann"), body=b"x",
            headers={"Content-Type": "multipart/form-data"})[0], 400, "multipart without a boundary: 400")
    st, _, b = upload("ann", b"  <html><script>alert(document.cookie)</script>", name="x.png", ctype="image/png")
    is_((st, err(b)), (415, "unsupported_type"), "an HTML page named .png: 415")
    is_(upload("ann", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>', name="x.svg")[0], 415,
        "SVG: 415")
    is_(upload("ann", b"\x00\x01\x02binary")[0], 415, "unknown binary: 415")
    is_(api("POST", "/chat/api/attachments", token=None, body=PNG)[0], 401, "no token: 401")
    is_(sorted(os.listdir(FILES)), files_before, "refused uploads leave no file")

    # ---- 3 (fresh uploads: the sweep takes unsent ones after 6 s)
    st, _, b = upload("ann", PNG, name="cat.png")
    att = b["attachment"]
    body, ct = multipart([("file", "t.txt", b"plain text here")])
    st, b = dribble(body, ct, step=len(body))
    TXT = b["attachment"]
    st, _, b = upload("bea", PNG, name="bea.png")
    BEA = b["attachment"]
    r = await a.request("send", conversation_id=G, client_msg_id="m-bad", body="x", attachments=[BEA["id"]])
    is_(err(r), "bad_request", "naming another user's upload: bad_request")
    r = await a.request("send", conversation_id=G, client_msg_id="m-bad2", body="x", attachments=["0" * 32])
    is_(err(r), "bad_request", "an unknown id: bad_request")
    r = await a.request("send", conversation_id=G, client_msg_id="m-bad3", body="x", attachments=["../x"])
    is_(err(r), "bad_request", "not an id: bad_request")
    r = await a.request("send", conversation_id=G, client_msg_id="m-bad4", body="x", attachments=["a" * 32] * 11)
    is_(err(r), "bad_request", "more than 10: bad_request")
    r = await a.request("send", conversation_id=G, client_msg_id="m1", body="a cat", attachments=[att["id"]])
    ok(r.get("ok"), "a message names the upload")
    M1 = r["result"]["message"]
    is_(M1["attachments"], [{"id": att["id"], "name": "cat.png", "mime": "image/png", "size": len(PNG),
                             "url": att["url"]}], "and carries its metadata")
    st, _, b = api("POST", "/chat/api/conversations/%s/messages" % H, token=token("ann"),
                   json={"client_msg_id": "m-h", "body": "x", "attachments": [att["id"]]})
    is_((st, err(b)), (400, "bad_request"), "the same upload in another conversation: 400")
    st, _, b = api("POST", "/chat/api/conversations/%s/messages" % G, token=token("ann"),
                   json={"client_msg_id": "m2", "body": "again", "attachments": [att["id"], TXT["id"]]})
    is_((st, [x["id"] for x in b["message"]["attachments"]]), (201, [att["id"], TXT["id"]]),
        "again in its conversation, with another: both, in order")
    st, _, b = api("GET", "/chat/api/conversations/%s/messages" % G, token=token("bea"))
    ok([m for m in b["messages"] if m["id"] == M1["id"]][0]["attachments"][0]["id"] == att["id"],
       "history carries the metadata")

    # ---- 4
    st, _, b = upload("ann", PNG, name="draft.png")
    DRAFT = b["attachment"]
    is_(get("ann", DRAFT["id"])[0], 200, "the uploader reads an unsent upload")
    is_(get("bea", DRAFT["id"])[0], 404, "another member does not")
    st, h, data = get("bea", att["id"])
    is_((st, data), (200, PNG), "a member reads a sent one, all its bytes")
    is_(h.get("content-type"), "image/png", "Content-Type: the sniffed type")
    is_(h.get("x-content-type-options"), "nosniff", "nosniff")
    like(h.get("content-security-policy", ""), r"sandbox", "a sandboxing CSP")
    like(h.get("content-disposition", ""), r"^inline; filename=\"cat.png\"", "a plain image is inline")
    ok(h.get("etag") and h.get("last-modified") and h.get("accept-ranges") == "bytes",
       "nginx serves it (ETag, Last-Modified, Accept-Ranges)")
    st, h2, data = get("bea", att["id"], headers={"Range": "bytes=10-19"})
    is_((st, data, h2.get("content-range")), (206, PNG[10:20], "bytes 10-19/%d" % len(PNG)), "a range: 206")
    st, _, data = get("bea", att["id"], headers={"If-None-Match": h["etag"]})
    is_(st, 304, "If-None-Match: 304")
    st, h3, data = get("bea", att["id"], method="HEAD")
    is_((st, h3.get("content-length")), (200, str(len(PNG))), "HEAD")
    st, h, data = get("bea", TXT["id"])
    like(h.get("content-disposition", ""), r"^attachment; ", "text is a download, never inline")
    is_(get("cid", att["id"])[0], 404, "a non-member: 404")
    is_(get(None, att["id"], tok=SVC)[0], 200, "a service token: 200")
    is_(get("bea", "a" * 31 + ".")[0], 404, "not an id: 404")
    is_(get("bea", "f" * 32)[0], 404, "an unknown id: 404")
    rm = api("DELETE", "/chat/api/conversations/%s/members/bea" % G, token=SVC)
    is_(rm[0], 200, "bea is removed")
    is_(get("bea", att["id"])[0], 404, "a removed member: 404")
    api("PATCH", "/chat/api/conversations/%s" % G, token=SVC, json={"history": "since_join"})
    api("POST", "/chat/api/conversations/%s/members" % G, token=SVC, json={"members": ["dan"]})
    is_(get("dan", att["id"])[0], 404, "a member added later to a since_join conversation: 404")
    api("PATCH", "/chat/api/conversations/%s" % G, token=SVC, json={"history": "all"})
    is_(get("dan", att["id"])[0], 200, "... with history all: 200")
    st, _, b = upload("ann", PNG, name="del.png")
    DEL = b["attachment"]
    r = await a.request("send", conversation_id=G, client_msg_id="m-del", body="soon gone", attachments=[DEL["id"]])
    DM = r["result"]["message"]
    is_(get("dan", DEL["id"])[0], 200, "readable while its message is there")
    is_(api("DELETE", "/chat/api/messages/%s" % DM["id"], token=token("ann"))[0], 200, "the message is deleted")
    is_([get(u, DEL["id"])[0] for u in ("dan", "ann")], [404, 404], "nobody reads it then, not even the uploader")
    is_(get("dan", att["id"])[0], 200, "an upload another message still names stays readable")

    # ---- 5
    ok(wait_for(lambda: on_disk(DEL["id"]) is None, timeout=20), "the deleted message's file is swept")
    ok(wait_for(lambda: on_disk(DRAFT["id"]) is None and on_disk(BEA["id"]) is None, timeout=20),
       "never-sent uploads are swept after chat_attachment_unsent_ttl")
    is_(get("ann", DRAFT["id"])[0], 404, "and are no longer read")
    is_(on_disk(att["id"]), PNG, "a sent upload keeps its file")
    is_(pg.query("SELECT count(*) FROM chat_attachments WHERE id IN (%s, %s)", DEL["id"], DRAFT["id"])[0][0], 0,
        "their rows are gone")
    st, _, b = api("DELETE", "/chat/api/users/ann", token=SVC)
    is_(st, 200, "ann is erased")
    ok(wait_for(lambda: on_disk(att["id"]) is None and on_disk(TXT["id"]) is None, timeout=20),
       "her uploads' files are swept")
    is_(get("dan", att["id"])[0], 404, "and nobody reads them")
    await a.close()


asyncio.run(main())
ng.stop()
pg.stop()
done()
