/*
 * One generator process: its share of users (one WebSocket connection
 * each) and of conversations, driven by one epoll loop.
 *
 * Phases: SETUP (chat: create conversations over REST) -> CONNECT (open
 * connections on a timetable) -> RUN (send messages on a fixed timetable,
 * open loop) -> DRAIN (wait for outstanding deliveries) -> DONE.
 * The parent starts CONNECT and RUN so that all workers move together.
 */

#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include "cb.h"


#define CB_PEND             256         /* outstanding requests per conn */
#define CB_BUF_MAX          (16 << 20)  /* largest frame / response */
#define CB_NEVENTS          512
#define CB_REST_TRIES       3
#define CB_TOKEN_MAX        1024

#define EV_WS               1ULL
#define EV_REST             2ULL
#define EV_CTL              3ULL

enum {
    ST_FREE = 0,
    ST_CONNECTING,          /* TCP connect in progress */
    ST_UPGRADE,             /* waiting for 101 */
    ST_HELLO,               /* chat: hello sent */
    ST_SIO_OPEN,            /* socketio: waiting for "0{...}" */
    ST_SIO_CONNECT,         /* socketio: "40" sent */
    ST_SIO_JOIN,            /* socketio: joins sent */
    ST_READY,
    ST_CLOSED
};

enum {
    H_CLOSED = 0,
    H_CONNECTING,
    H_BUSY,
    H_IDLE
};

enum {
    P_FREE = 0,
    P_HELLO,
    P_SEND,
    P_TYPING,
    P_READ,
    P_JOIN
};

enum {
    PH_SETUP = 0,
    PH_WAIT_CONNECT,
    PH_CONNECT,
    PH_WAIT_RUN,
    PH_RUN,
    PH_DRAIN,
    PH_DONE
};


typedef struct {
    uint32_t    next;               /* highest sender seq seen + 1 */
    uint32_t    seen;
    uint64_t    win;                /* bit i: seq next-1-i received */
} cb_track_t;

typedef struct {
    uint32_t    conv;               /* local conversation index */
    uint32_t    sseq;               /* this user's next seq in conv */
    uint64_t    last_seq;           /* chat: last conversation seq */
    uint32_t    nrecv;
    int         have_seq;
    cb_track_t *pairs;              /* by sender - conv base */
} cb_memb_t;

typedef struct {
    uint32_t    base;
    uint32_t    size;
    uint32_t    live;
    uint32_t    gidx;
    uint8_t     group;
    uint8_t     ready;
    uint8_t     tries;
    char        id[CB_ID_LEN];
} cb_conv_t;

typedef struct {
    uint64_t    intended;
    uint32_t    id;
    uint32_t    memb;
    uint32_t    sseq;
    uint32_t    nexp;
    uint8_t     kind;
    uint8_t     tries;
    uint8_t     measured;
} cb_pend_t;

typedef struct {
    char       *p;
    size_t      pos;
    size_t      len;
    size_t      cap;
} cb_buf_t;

typedef struct {
    int         fd;
    uint8_t     state;
    uint8_t     writable;
    uint8_t     dirty;
    uint8_t     nmemb;
    uint8_t     frag_op;
    uint8_t     fragmenting;
    uint32_t    gid;
    uint32_t    next_id;
    uint32_t    joins_left;
    uint32_t    inflight;
    uint64_t    t_ref;
    uint64_t    t_start;
    uint64_t    t_ack;                  /* live: last ack sent */
    cb_buf_t    in;
    cb_buf_t    out;
    cb_buf_t    frag;
    cb_pend_t  *pend;
    cb_memb_t   memb[2];
    char        key[32];
} cb_conn_t;

typedef struct {
    int         fd;
    uint8_t     state;
    uint8_t     writable;
    uint32_t    conv;               /* conversation in flight */
    uint64_t    t_start;
    cb_buf_t    in;
    cb_buf_t    out;
} cb_rest_t;

typedef struct {
    uint64_t    t;
    uint32_t    ci;
    uint32_t    slot;
} cb_timer_t;

typedef struct {
    const cb_opt_t  *o;
    cb_res_t        *r;
    int              w;
    int              ep;
    int              ctl_in;
    int              ctl_out;

    uint32_t         lo;
    uint32_t         n;
    cb_conn_t       *c;
    cb_conv_t       *convs;
    uint32_t         nconv;

    cb_rest_t       *rest;
    uint32_t         nrest;
    uint32_t         next_create;
    uint32_t         setup_done;

    int              phase;
    uint64_t         t_connect;
    double           conn_iv;
    uint32_t         next_connect;
    uint32_t         pending;
    uint32_t         connected;     /* ready or failed */

    uint64_t         t_run;
    uint64_t         t_measure;
    uint64_t         t_send_end;
    uint64_t         t_drain_end;
    double           msg_iv;
    uint64_t         stride;
    uint64_t         next_msg;
    uint64_t         total_msgs;
    uint64_t         inflight;

    uint32_t        *dirty;
    uint32_t         ndirty;

    cb_timer_t      *heap;
    uint32_t         nheap;
    uint32_t         heap_cap;

    uint64_t         rng;
    uint64_t         t_housekeep;
    uint64_t         t_cpu0;
    double           cpu0;

    char            *scratch;
    size_t           scratch_cap;
    char            *bodybuf;
    char             token[CB_TOKEN_MAX];
} cb_w_t;


static void cb_conn_close(cb_w_t *w, cb_conn_t *c, int why);
static void cb_deliver(cb_w_t *w, cb_conn_t *c, const char *p, size_t len,
    int has_seq, uint64_t seq);


/* ---- buffers ---- */

static int
cb_buf_reserve(cb_buf_t *b, size_t more)
{
    size_t  cap;
    char   *p;

    if (b->pos > 0 && b->pos == b->len) {
        b->pos = b->len = 0;
    }

    if (b->len + more <= b->cap) {
        return 0;
    }

    if (b->pos > 0) {
        memmove(b->p, b->p + b->pos, b->len - b->pos);
        b->len -= b->pos;
        b->pos = 0;

        if (b->len + more <= b->cap) {
            return 0;
        }
    }

    cap = b->cap ? b->cap : 2048;
    while (cap < b->len + more) {
        cap *= 2;
    }

    if (cap > 2 * CB_BUF_MAX) {
        return -1;
    }

    p = realloc(b->p, cap);
    if (p == NULL) {
        return -1;
    }

    b->p = p;
    b->cap = cap;

    return 0;
}


static int
cb_buf_add(cb_buf_t *b, const void *data, size_t len)
{
    if (cb_buf_reserve(b, len) != 0) {
        return -1;
    }

    memcpy(b->p + b->len, data, len);
    b->len += len;

    return 0;
}


static void
cb_buf_free(cb_buf_t *b)
{
    free(b->p);
    memset(b, 0, sizeof(cb_buf_t));
}


static char *
cb_scratch(cb_w_t *w, size_t need)
{
    char  *p;

    if (need > w->scratch_cap) {
        p = realloc(w->scratch, need);
        if (p == NULL) {
            return NULL;
        }
        w->scratch = p;
        w->scratch_cap = need;
    }

    return w->scratch;
}


/* ---- retry timer heap ---- */

static void
cb_heap_push(cb_w_t *w, uint64_t t, uint32_t ci, uint32_t slot)
{
    cb_timer_t  *h, x;
    uint32_t     i, p;

    if (w->nheap == w->heap_cap) {
        w->heap_cap = w->heap_cap ? w->heap_cap * 2 : 256;
        h = realloc(w->heap, w->heap_cap * sizeof(cb_timer_t));
        if (h == NULL) {
            w->heap_cap = w->nheap;
            w->r->err_other++;
            return;
        }
        w->heap = h;
    }

    h = w->heap;
    i = w->nheap++;
    h[i].t = t;
    h[i].ci = ci;
    h[i].slot = slot;

    while (i > 0) {
        p = (i - 1) / 2;
        if (h[p].t <= h[i].t) {
            break;
        }
        x = h[p];
        h[p] = h[i];
        h[i] = x;
        i = p;
    }
}


static void
cb_heap_pop(cb_w_t *w)
{
    cb_timer_t  *h, x;
    uint32_t     i, l, m;

    h = w->heap;
    h[0] = h[--w->nheap];
    i = 0;

    for ( ;; ) {
        l = 2 * i + 1;
        if (l >= w->nheap) {
            break;
        }
        m = (l + 1 < w->nheap && h[l + 1].t < h[l].t) ? l + 1 : l;
        if (h[i].t <= h[m].t) {
            break;
        }
        x = h[m];
        h[m] = h[i];
        h[i] = x;
        i = m;
    }
}


/* ---- names ---- */

static void
cb_user_name(const cb_opt_t *o, uint32_t gid, char *out, size_t cap)
{
    snprintf(out, cap, "%s%u", o->user_prefix, gid);
}


static size_t
cb_token(cb_w_t *w, uint32_t gid)
{
    char  sub[96];

    if (!w->o->have_secret) {
        w->token[0] = '\0';
        return 0;
    }

    cb_user_name(w->o, gid, sub, sizeof(sub));

    return cb_jwt_hs256(w->o, sub, w->token, sizeof(w->token));
}


/* ---- sockets ---- */

static int
cb_socket(cb_w_t *w, uint32_t src, uint64_t data)
{
    struct sockaddr_in  sa;
    struct epoll_event  ev;
    int                 fd, one;

    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -1;
    }

    one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    if (src != htonl(INADDR_LOOPBACK)) {
        /* pick the port at connect() time, per 4-tuple */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one,
                   sizeof(one));

        memset(&sa, 0, sizeof(sa));
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = src;

        if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) != 0) {
            close(fd);
            return -1;
        }
    }

    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t) w->o->port);
    inet_pton(AF_INET, w->o->host, &sa.sin_addr);

    if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) != 0
        && errno != EINPROGRESS)
    {
        close(fd);
        return -1;
    }

    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = data;

    if (epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
        close(fd);
        return -1;
    }

    return fd;
}


static int
cb_sock_error(int fd)
{
    int        err;
    socklen_t  len;

    err = 0;
    len = sizeof(err);

    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) {
        return errno;
    }

    return err;
}


/* write what we can; -1 on a fatal error */
static int
cb_flush_fd(cb_w_t *w, int fd, cb_buf_t *b, uint8_t *writable)
{
    ssize_t  n;

    while (b->pos < b->len) {
        n = send(fd, b->p + b->pos, b->len - b->pos, MSG_NOSIGNAL);

        if (n > 0) {
            b->pos += (size_t) n;
            w->r->bytes_out += (uint64_t) n;
            continue;
        }

        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            *writable = 0;
            return 0;
        }

        if (n < 0 && errno == EINTR) {
            continue;
        }

        return -1;
    }

    b->pos = b->len = 0;

    return 0;
}


static void
cb_mark_dirty(cb_w_t *w, cb_conn_t *c)
{
    if (!c->dirty) {
        c->dirty = 1;
        w->dirty[w->ndirty++] = (uint32_t) (c - w->c);
    }
}


static void
cb_flush_dirty(cb_w_t *w)
{
    cb_conn_t  *c;
    uint32_t    i;

    for (i = 0; i < w->ndirty; i++) {
        c = &w->c[w->dirty[i]];
        c->dirty = 0;

        if (c->fd < 0 || !c->writable || c->state == ST_CONNECTING) {
            continue;
        }

        if (cb_flush_fd(w, c->fd, &c->out, &c->writable) != 0) {
            cb_conn_close(w, c, 1);
        }
    }

    w->ndirty = 0;
}


/* ---- WebSocket frames (client side: masked) ---- */

static int
cb_ws_frame(cb_w_t *w, cb_conn_t *c, int op, const char *data, size_t len)
{
    unsigned char  *h, *p;
    uint32_t        mask;
    size_t          hl, i;
    uint64_t        m8, v;

    hl = (len < 126) ? 2 : (len < 65536) ? 4 : 10;

    if (cb_buf_reserve(&c->out, hl + 4 + len) != 0) {
        return -1;
    }

    h = (unsigned char *) c->out.p + c->out.len;
    h[0] = (unsigned char) (0x80 | op);

    if (len < 126) {
        h[1] = (unsigned char) (0x80 | len);

    } else if (len < 65536) {
        h[1] = 0x80 | 126;
        h[2] = (unsigned char) (len >> 8);
        h[3] = (unsigned char) len;

    } else {
        h[1] = 0x80 | 127;
        for (i = 0; i < 8; i++) {
            h[2 + i] = (unsigned char) ((uint64_t) len >> (56 - 8 * i));
        }
    }

    mask = (uint32_t) cb_rand(&w->rng);
    memcpy(h + hl, &mask, 4);

    p = h + hl + 4;
    memcpy(p, data, len);

    m8 = (uint64_t) mask << 32 | mask;

    for (i = 0; i + 8 <= len; i += 8) {
        memcpy(&v, p + i, 8);
        v ^= m8;
        memcpy(p + i, &v, 8);
    }

    for ( ; i < len; i++) {
        p[i] ^= h[hl + (i & 3)];
    }

    c->out.len += hl + 4 + len;
    cb_mark_dirty(w, c);

    return 0;
}


static int
cb_ws_text(cb_w_t *w, cb_conn_t *c, const char *data, size_t len)
{
    return cb_ws_frame(w, c, 0x1, data, len);
}


/* ---- topology ---- */

uint32_t
cb_unit(const cb_opt_t *o)
{
    uint32_t  k;

    switch (o->scenario) {
    case CB_SC_DM:
        return 2;
    case CB_SC_GROUP:
        return o->group_size;
    case CB_SC_MIXED:
        k = o->group_size;
        return (k % 2 == 0) ? k : 2 * k;
    default:
        return 1;
    }
}


void
cb_worker_range(const cb_opt_t *o, int w, uint32_t *lo, uint32_t *hi)
{
    uint64_t  unit, units;

    unit = cb_unit(o);
    units = o->conns / unit;

    *lo = (uint32_t) (units * (uint64_t) w / (uint64_t) o->workers * unit);
    *hi = (uint32_t) (units * (uint64_t) (w + 1) / (uint64_t) o->workers
                      * unit);
}


static int
cb_add_memb(cb_w_t *w, uint32_t ci, uint32_t conv)
{
    cb_conn_t  *c;
    cb_memb_t  *m;

    c = &w->c[ci];
    m = &c->memb[c->nmemb];
    memset(m, 0, sizeof(cb_memb_t));
    m->conv = conv;

    m->pairs = calloc(w->convs[conv].size, sizeof(cb_track_t));
    if (m->pairs == NULL) {
        return -1;
    }

    c->nmemb++;

    return 0;
}


static int
cb_topology(cb_w_t *w)
{
    const cb_opt_t  *o = w->o;
    cb_conv_t       *cv;
    uint32_t         i, j, k, ndm, ngroup, base;

    k = o->group_size;
    ndm = 0;
    ngroup = 0;

    switch (o->scenario) {
    case CB_SC_DM:
        ndm = w->n / 2;
        break;
    case CB_SC_GROUP:
        ngroup = w->n / k;
        break;
    case CB_SC_MIXED:
        ndm = w->n / 2;
        ngroup = (uint32_t) (o->mixed_group_frac * w->n / k + 0.5);
        if (ngroup > w->n / k) {
            ngroup = w->n / k;
        }
        break;
    default:
        break;
    }

    w->nconv = ndm + ngroup;

    if (w->nconv == 0) {
        return 0;
    }

    w->convs = calloc(w->nconv, sizeof(cb_conv_t));
    if (w->convs == NULL) {
        return -1;
    }

    for (i = 0; i < ndm; i++) {
        cv = &w->convs[i];
        cv->base = w->lo + 2 * i;
        cv->size = 2;
        cv->gidx = cv->base / 2;
    }

    for (i = 0; i < ngroup; i++) {
        cv = &w->convs[ndm + i];
        cv->base = w->lo + k * i;
        cv->size = k;
        cv->group = 1;
        cv->gidx = (o->scenario == CB_SC_MIXED ? o->conns / 2 : 0)
                   + cv->base / k;
    }

    for (i = 0; i < w->nconv; i++) {
        cv = &w->convs[i];

        if (o->mode != CB_MODE_CHAT) {
            snprintf(cv->id, sizeof(cv->id), "%sc%u", o->run_id, cv->gidx);
            cv->ready = 1;
        }

        for (j = 0; j < cv->size; j++) {
            base = cv->base - w->lo + j;
            if (cb_add_memb(w, base, i) != 0) {
                return -1;
            }
        }
    }

    return 0;
}


/* ---- REST (chat: create conversations) ---- */

static int
cb_rest_request(cb_w_t *w, cb_rest_t *rc, uint32_t conv)
{
    const cb_opt_t  *o = w->o;
    cb_conv_t       *cv;
    char             name[96], hdr[2048], *body;
    size_t           blen, cap, tl;
    uint32_t         j;
    int              n;

    cv = &w->convs[conv];

    cap = 256 + (size_t) cv->size * 80;
    body = cb_scratch(w, cap);
    if (body == NULL) {
        return -1;
    }

    if (cv->group) {
        blen = (size_t) snprintf(body, cap,
                                 "{\"kind\":\"group\",\"title\":\"bench %u\","
                                 "\"members\":[", cv->gidx);
        for (j = 1; j < cv->size; j++) {
            cb_user_name(o, cv->base + j, name, sizeof(name));
            blen += (size_t) snprintf(body + blen, cap - blen, "%s\"%s\"",
                                      j > 1 ? "," : "", name);
        }
        blen += (size_t) snprintf(body + blen, cap - blen, "]}");

    } else {
        cb_user_name(o, cv->base + 1, name, sizeof(name));
        blen = (size_t) snprintf(body, cap,
                                 "{\"kind\":\"direct\",\"members\":[\"%s\"]}",
                                 name);
    }

    tl = cb_token(w, cv->base);

    n = snprintf(hdr, sizeof(hdr),
                 "POST %s/conversations HTTP/1.1\r\n"
                 "Host: %s:%d\r\n"
                 "%s%.*s%s"
                 "Content-Type: application/json\r\n"
                 "Content-Length: %zu\r\n"
                 "%s"
                 "\r\n",
                 o->api, o->host, o->port,
                 tl ? "Authorization: Bearer " : "", (int) tl, w->token,
                 tl ? "\r\n" : "", blen,
                 o->rest_keepalive ? "" : "Connection: close\r\n");

    if (n <= 0 || (size_t) n >= sizeof(hdr)) {
        return -1;
    }

    if (cb_buf_add(&rc->out, hdr, (size_t) n) != 0
        || cb_buf_add(&rc->out, body, blen) != 0)
    {
        return -1;
    }

    rc->conv = conv;
    rc->t_start = cb_now();

    if (rc->fd < 0) {
        rc->fd = cb_socket(w, w->o->src[0],
                           EV_REST << 32 | (uint64_t) (rc - w->rest));
        if (rc->fd < 0) {
            return -1;
        }
        rc->state = H_CONNECTING;
        rc->writable = 0;
        return 0;
    }

    rc->state = H_BUSY;

    if (rc->writable && cb_flush_fd(w, rc->fd, &rc->out, &rc->writable) != 0) {
        return -1;
    }

    return 0;
}


static void
cb_rest_close(cb_rest_t *rc)
{
    if (rc->fd >= 0) {
        close(rc->fd);
    }

    rc->fd = -1;
    rc->state = H_CLOSED;
    rc->in.pos = rc->in.len = 0;
    rc->out.pos = rc->out.len = 0;
}


static void cb_rest_kick(cb_w_t *w);


static void
cb_conv_result(cb_w_t *w, uint32_t conv, int ok)
{
    cb_conv_t  *cv = &w->convs[conv];

    if (ok) {
        cv->ready = 1;
        w->setup_done++;
        w->r->convs++;
        return;
    }

    if (++cv->tries < CB_REST_TRIES) {
        /* put it back: retried by the next free connection */
        cv->ready = 2;
        return;
    }

    w->r->setup_fail++;
    w->setup_done++;
}


static const char *
cb_memmem_ci(const char *h, size_t hl, const char *n)
{
    size_t  nl, i;

    nl = strlen(n);

    for (i = 0; i + nl <= hl; i++) {
        if (strncasecmp(h + i, n, nl) == 0) {
            return h + i;
        }
    }

    return NULL;
}


/* a header value in [h, h + hl), name given with ": " */
static int
cb_header(const char *h, size_t hl, const char *name, const char **v,
    size_t *vl)
{
    const char  *p, *e;

    p = cb_memmem_ci(h, hl, name);
    if (p == NULL) {
        return -1;
    }

    p += strlen(name);
    e = memchr(p, '\r', (size_t) (h + hl - p));
    if (e == NULL) {
        return -1;
    }

    while (p < e && *p == ' ') {
        p++;
    }

    *v = p;
    *vl = (size_t) (e - p);

    return 0;
}


/* 1: complete response parsed, 0: need more, -1: broken */
static int
cb_http_response(cb_buf_t *b, int *status, const char **body,
    size_t *blen, size_t *total, int *close_after)
{
    const char  *p, *he, *v, *q, *e;
    size_t       hl, vl, cl, out, n;
    char        *dst;

    p = b->p + b->pos;
    n = b->len - b->pos;

    he = memmem(p, n, "\r\n\r\n", 4);
    if (he == NULL) {
        return n > 65536 ? -1 : 0;
    }

    hl = (size_t) (he - p) + 4;

    if (n < 12 || memcmp(p, "HTTP/1.", 7) != 0) {
        return -1;
    }

    *status = atoi(p + 9);
    *close_after = cb_memmem_ci(p, hl, "\r\nconnection: close") != NULL;

    if (cb_header(p, hl, "\r\ncontent-length:", &v, &vl) == 0) {
        cl = strtoul(v, NULL, 10);
        if (n < hl + cl) {
            return 0;
        }

        *body = p + hl;
        *blen = cl;
        *total = hl + cl;

        return 1;
    }

    if (cb_header(p, hl, "\r\ntransfer-encoding:", &v, &vl) == 0
        && vl >= 7 && strncasecmp(v, "chunked", 7) == 0)
    {
        /* decode in place once the terminating chunk is there */
        if (memmem(p + hl, n - hl, "0\r\n\r\n", 5) == NULL) {
            return 0;
        }

        q = p + hl;
        e = p + n;
        dst = (char *) p + hl;
        out = 0;

        for ( ;; ) {
            cl = strtoul(q, NULL, 16);
            q = memmem(q, (size_t) (e - q), "\r\n", 2);
            if (q == NULL) {
                return -1;
            }
            q += 2;

            if (cl == 0) {
                q += 2;
                break;
            }

            if ((size_t) (e - q) < cl + 2) {
                return 0;
            }

            memmove(dst + out, q, cl);
            out += cl;
            q += cl + 2;
        }

        *body = p + hl;
        *blen = out;
        *total = (size_t) (q - p);

        return 1;
    }

    /* no length: body ends at close; treat what is there as the body */
    *body = p + hl;
    *blen = n - hl;
    *total = n;
    *close_after = 1;

    return 1;
}


static void
cb_rest_read(cb_w_t *w, cb_rest_t *rc)
{
    const char  *body;
    cb_jv_t      v;
    size_t       blen, total;
    ssize_t      got;
    int          status, close_after, rv, eof;

    eof = 0;

    for ( ;; ) {
        if (cb_buf_reserve(&rc->in, 16384) != 0) {
            eof = 1;
            break;
        }

        got = recv(rc->fd, rc->in.p + rc->in.len, rc->in.cap - rc->in.len,
                   0);

        if (got > 0) {
            rc->in.len += (size_t) got;
            w->r->bytes_in += (uint64_t) got;
            continue;
        }

        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        }

        if (got < 0 && errno == EINTR) {
            continue;
        }

        eof = 1;
        break;
    }

    if (rc->state != H_BUSY) {
        if (eof) {
            cb_rest_close(rc);
        }
        return;
    }

    rv = cb_http_response(&rc->in, &status, &body, &blen, &total,
                          &close_after);

    if (rv == 0 && !eof) {
        return;
    }

    if (rv <= 0) {
        if (w->o->verbose) {
            fprintf(stderr, "worker %d: REST connection failed\n", w->w);
        }
        cb_conv_result(w, rc->conv, 0);
        cb_rest_close(rc);
        cb_rest_kick(w);
        return;
    }

    if ((status == 200 || status == 201)
        && cb_json_get(body, blen, "conversation.id", &v) == 0
        && v.len > 0 && v.len < CB_ID_LEN)
    {
        memcpy(w->convs[rc->conv].id, v.p, v.len);
        w->convs[rc->conv].id[v.len] = '\0';
        cb_conv_result(w, rc->conv, 1);

    } else {
        if (w->o->verbose || w->convs[rc->conv].tries + 1 >= CB_REST_TRIES) {
            fprintf(stderr, "worker %d: create conversation: HTTP %d %.*s\n",
                    w->w, status, (int) (blen > 200 ? 200 : blen), body);
        }
        cb_conv_result(w, rc->conv, 0);
    }

    rc->in.pos += total;
    rc->state = H_IDLE;

    if (close_after || eof) {
        cb_rest_close(rc);
    }

    cb_rest_kick(w);
}


static void
cb_rest_kick(cb_w_t *w)
{
    cb_rest_t  *rc;
    uint32_t    i, c;

    for (i = 0; i < w->nrest; i++) {
        rc = &w->rest[i];

        if (rc->state != H_IDLE && rc->state != H_CLOSED) {
            continue;
        }

        /* first unassigned, then the ones put back for a retry */
        c = UINT32_MAX;

        if (w->next_create < w->nconv) {
            c = w->next_create++;

        } else {
            for (c = 0; c < w->nconv; c++) {
                if (w->convs[c].ready == 2) {
                    break;
                }
            }
            if (c == w->nconv) {
                c = UINT32_MAX;
            }
        }

        if (c == UINT32_MAX) {
            break;
        }

        w->convs[c].ready = 3;          /* in flight */

        if (cb_rest_request(w, rc, c) != 0) {
            cb_rest_close(rc);
            cb_conv_result(w, c, 0);
        }
    }
}


static void
cb_rest_event(cb_w_t *w, cb_rest_t *rc, uint32_t events)
{
    if (rc->state == H_CONNECTING) {
        if (cb_sock_error(rc->fd) != 0) {
            cb_conv_result(w, rc->conv, 0);
            cb_rest_close(rc);
            cb_rest_kick(w);
            return;
        }
        rc->state = H_BUSY;
        rc->writable = 1;
    }

    if (events & EPOLLOUT) {
        rc->writable = 1;
    }

    if (rc->writable && rc->out.pos < rc->out.len) {
        if (cb_flush_fd(w, rc->fd, &rc->out, &rc->writable) != 0) {
            cb_conv_result(w, rc->conv, 0);
            cb_rest_close(rc);
            cb_rest_kick(w);
            return;
        }
    }

    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        cb_rest_read(w, rc);
    }
}


/* ---- connections ---- */

static int
cb_conn_start(cb_w_t *w, uint32_t ci, uint64_t t_ref)
{
    const cb_opt_t  *o = w->o;
    cb_conn_t       *c;
    cb_conv_t       *cv;
    unsigned char    rnd[16];
    char             req[4096], path[256];
    size_t           tl;
    uint64_t         r1, r2;
    int              n;

    c = &w->c[ci];
    c->t_ref = t_ref;
    c->t_start = cb_now();

    r1 = cb_rand(&w->rng);
    r2 = cb_rand(&w->rng);
    memcpy(rnd, &r1, 8);
    memcpy(rnd + 8, &r2, 8);
    cb_b64(rnd, 16, c->key);

    tl = 0;

    switch (o->mode) {

    case CB_MODE_CHAT:
        snprintf(path, sizeof(path), "%s", o->path);
        if (o->auth == CB_AUTH_HEADER) {
            tl = cb_token(w, c->gid);
        }
        break;

    case CB_MODE_NCHAN:
        /* one channel per connection: its conversation, else its own */
        if (c->nmemb > 0) {
            cv = &w->convs[c->memb[0].conv];
            snprintf(path, sizeof(path), "%s%s", o->path, cv->id);
        } else {
            snprintf(path, sizeof(path), "%s%su%u", o->path, o->run_id,
                     c->gid);
        }
        break;

    default:
        snprintf(path, sizeof(path), "%s?EIO=4&transport=websocket",
                 o->path);
        break;
    }

    n = snprintf(req, sizeof(req),
                 "GET %s HTTP/1.1\r\n"
                 "Host: %s:%d\r\n"
                 "Upgrade: websocket\r\n"
                 "Connection: Upgrade\r\n"
                 "Sec-WebSocket-Key: %s\r\n"
                 "Sec-WebSocket-Version: 13\r\n"
                 "%s"
                 "%s%.*s%s"
                 "\r\n",
                 path, o->host, o->port, c->key,
                 o->mode == CB_MODE_CHAT
                     ? "Sec-WebSocket-Protocol: chat.v1\r\n" : "",
                 tl ? "Authorization: Bearer " : "", (int) tl, w->token,
                 tl ? "\r\n" : "");

    if (n <= 0 || (size_t) n >= sizeof(req)
        || cb_buf_add(&c->out, req, (size_t) n) != 0)
    {
        return -1;
    }

    c->fd = cb_socket(w, o->src[c->gid % (uint32_t) o->nsrc],
                      EV_WS << 32 | ci);
    c->state = ST_CONNECTING;
    c->writable = 0;
    w->pending++;

    if (c->fd < 0) {
        if (o->verbose) {
            fprintf(stderr, "worker %d: connect: %s\n", w->w,
                    strerror(errno));
        }
        cb_conn_close(w, c, 0);
        return -1;
    }

    return 0;
}


static void
cb_conn_ready(cb_w_t *w, cb_conn_t *c)
{
    uint64_t  now;
    uint32_t  i;

    now = cb_now();
    c->state = ST_READY;
    w->pending--;
    w->connected++;
    w->r->conn_ok++;

    cb_hist_add(&w->r->h_conn, now - c->t_ref);

    if (w->r->t_conn_first == 0) {
        w->r->t_conn_first = now;
    }
    w->r->t_conn_last = now;

    for (i = 0; i < c->nmemb; i++) {
        w->convs[c->memb[i].conv].live++;
    }
}


/*
 * why: 0 connect failed, 1 I/O error or EOF, 2 protocol error,
 * 3 timeout, 4 auth refused, 5 local shutdown
 */
static void
cb_conn_close(cb_w_t *w, cb_conn_t *c, int why)
{
    cb_res_t  *r = w->r;
    uint32_t   i;

    if (c->state == ST_CLOSED || c->state == ST_FREE) {
        return;
    }

    if (c->state == ST_READY) {
        if (why != 5) {
            r->disconnects++;
        }

        for (i = 0; i < c->nmemb; i++) {
            w->convs[c->memb[i].conv].live--;
        }

    } else {
        w->pending--;
        w->connected++;

        if (why == 3) {
            r->conn_timeout++;
        } else if (c->state == ST_CONNECTING || why == 0) {
            r->conn_fail++;
        } else if (c->state == ST_UPGRADE) {
            r->hs_fail++;
        } else {
            r->auth_fail++;
        }
    }

    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }

    c->state = ST_CLOSED;
    cb_buf_free(&c->in);
    cb_buf_free(&c->out);
    cb_buf_free(&c->frag);
}


/* ---- pending requests ---- */

static cb_pend_t *
cb_pend_new(cb_w_t *w, cb_conn_t *c, int kind)
{
    cb_pend_t  *p;
    uint32_t    id;

    if (c->pend == NULL) {
        c->pend = calloc(CB_PEND, sizeof(cb_pend_t));
        if (c->pend == NULL) {
            return NULL;
        }
    }

    id = ++c->next_id;
    if (id == 0) {
        id = ++c->next_id;
    }

    p = &c->pend[id % CB_PEND];

    if (p->kind != P_FREE) {
        /* ring wrapped: the old request never got its reply */
        w->r->err_other++;
        if (p->kind == P_SEND) {
            c->inflight--;
            w->inflight--;
        }
    }

    memset(p, 0, sizeof(cb_pend_t));
    p->id = id;
    p->kind = (uint8_t) kind;

    if (kind == P_SEND) {
        c->inflight++;
        w->inflight++;
    }

    return p;
}


static cb_pend_t *
cb_pend_find(cb_conn_t *c, uint32_t id)
{
    cb_pend_t  *p;

    if (c->pend == NULL) {
        return NULL;
    }

    p = &c->pend[id % CB_PEND];

    return (p->kind != P_FREE && p->id == id) ? p : NULL;
}


static void
cb_pend_free(cb_w_t *w, cb_conn_t *c, cb_pend_t *p)
{
    if (p->kind == P_SEND) {
        c->inflight--;
        w->inflight--;
    }

    p->kind = P_FREE;
}


/* ---- messages ---- */

/*
 * "L1:<conv>:<sender>:<sender seq>:<intended ns>:" then padding; a resend
 * (after "unavailable") is marked "R", so that a receiver can tell a
 * message the client itself sent late from one the server reordered.
 */
static size_t
cb_body(cb_w_t *w, char *out, uint32_t gidx, uint32_t gid, uint32_t sseq,
    uint64_t intended, int resend)
{
    size_t  n;
    int     k;

    k = snprintf(out, 128, "L1:%u:%u:%u:%llu:%s", gidx, gid, sseq,
                 (unsigned long long) intended, resend ? "R" : "");
    n = (size_t) k;

    if (n < w->o->size) {
        memset(out + n, 'x', w->o->size - n);
        n = w->o->size;
    }

    out[n] = '\0';

    return n;
}


static int
cb_parse_body(const char *p, size_t len, uint32_t *gidx, uint32_t *gid,
    uint32_t *sseq, uint64_t *t, int *resend)
{
    uint64_t  v[4];
    size_t    i;
    int       k;

    if (len < 3 || memcmp(p, "L1:", 3) != 0) {
        return -1;
    }

    i = 3;

    for (k = 0; k < 4; k++) {
        v[k] = 0;

        if (i >= len || p[i] < '0' || p[i] > '9') {
            return -1;
        }

        while (i < len && p[i] >= '0' && p[i] <= '9') {
            v[k] = v[k] * 10 + (uint64_t) (p[i] - '0');
            i++;
        }

        if (i >= len || p[i] != ':') {
            return -1;
        }
        i++;
    }

    *gidx = (uint32_t) v[0];
    *gid = (uint32_t) v[1];
    *sseq = (uint32_t) v[2];
    *t = v[3];
    *resend = (i < len && p[i] == 'R');

    return 0;
}


/* (re)transmit a send request */
static int
cb_transmit(cb_w_t *w, cb_conn_t *c, cb_pend_t *p)
{
    const cb_opt_t  *o = w->o;
    cb_memb_t       *m;
    cb_conv_t       *cv;
    char            *buf, *body;
    size_t           blen, n, cap;

    m = &c->memb[p->memb];
    cv = &w->convs[m->conv];

    cap = (size_t) o->size + 512 + CB_ID_LEN * 2;
    buf = cb_scratch(w, cap);
    if (buf == NULL) {
        return -1;
    }

    body = w->bodybuf;
    blen = cb_body(w, body, cv->gidx, c->gid, p->sseq, p->intended,
                   p->tries > 1);

    switch (o->mode) {

    case CB_MODE_CHAT:
        n = (size_t) snprintf(buf, cap,
                              "{\"type\":\"send\",\"id\":%u,"
                              "\"conversation_id\":\"%s\","
                              "\"client_msg_id\":\"%s-%u-%u-%u\","
                              "\"body\":\"%s\"}",
                              p->id, cv->id, o->run_id, c->gid, cv->gidx,
                              p->sseq, body);
        break;

    case CB_MODE_SIO:
        n = (size_t) snprintf(buf, cap,
                              "42%u[\"send\",{\"room\":\"%s\","
                              "\"body\":\"%s\"}]",
                              p->id, cv->id, body);
        break;

    default:
        memcpy(buf, body, blen);
        n = blen;
        break;
    }

    if (n >= cap) {
        return -1;
    }

    return cb_ws_text(w, c, buf, n);
}


static void
cb_send_message(cb_w_t *w, uint64_t k, uint64_t intended, uint64_t now)
{
    const cb_opt_t  *o = w->o;
    cb_res_t        *r = w->r;
    cb_conn_t       *c;
    cb_memb_t       *m;
    cb_conv_t       *cv;
    cb_pend_t       *p, tmp;
    char             buf[512];
    uint32_t         mi, nexp;
    size_t           n;
    int              measured;

    r->sched++;
    measured = intended >= w->t_measure;

    /* a golden-ratio stride spreads consecutive messages over users and
     * conversations: no bursts into one conversation */
    c = &w->c[(k * w->stride) % w->n];

    if (c->state != ST_READY || c->nmemb == 0) {
        r->skipped++;
        return;
    }

    mi = 0;
    if (c->nmemb > 1
        && (double) (cb_rand(&w->rng) >> 11) / 9007199254740992.0
           < o->mixed_group_msgs)
    {
        mi = 1;
    }

    m = &c->memb[mi];
    cv = &w->convs[m->conv];

    if (cv->ready != 1) {
        r->skipped++;
        return;
    }

    /* ephemeral typing before some messages (mixed, chat only) */
    if (o->mode == CB_MODE_CHAT && o->typing_prob > 0
        && (double) (cb_rand(&w->rng) >> 11) / 9007199254740992.0
           < o->typing_prob)
    {
        p = cb_pend_new(w, c, P_TYPING);
        if (p != NULL) {
            n = (size_t) snprintf(buf, sizeof(buf),
                                  "{\"type\":\"typing\",\"id\":%u,"
                                  "\"conversation_id\":\"%s\","
                                  "\"state\":\"start\"}", p->id, cv->id);
            cb_ws_text(w, c, buf, n);
            r->typing_sent++;
        }
    }

    nexp = cv->live - (o->self_echo ? 0 : 1);

    if (o->mode == CB_MODE_NCHAN) {
        memset(&tmp, 0, sizeof(tmp));
        p = &tmp;
    } else {
        p = cb_pend_new(w, c, P_SEND);
        if (p == NULL) {
            r->err_other++;
            return;
        }
    }

    p->intended = intended;
    p->memb = mi;
    p->sseq = m->sseq++;
    p->nexp = nexp;
    p->tries = 1;
    p->measured = (uint8_t) measured;

    if (cb_transmit(w, c, p) != 0) {
        r->err_other++;
        cb_pend_free(w, c, p);
        return;
    }

    r->sent++;
    r->expected += nexp;

    if (measured) {
        r->sent_measured++;
    }

    cb_hist_add(&r->h_lag, now > intended ? now - intended : 0);
    if (now > intended + CB_MS) {
        r->late_sends++;
    }
}


static void
cb_retry(cb_w_t *w, uint32_t ci, uint32_t slot)
{
    cb_conn_t  *c;
    cb_pend_t  *p;

    c = &w->c[ci];

    if (c->pend == NULL) {
        return;
    }

    p = &c->pend[slot];

    if (p->kind != P_SEND) {
        return;
    }

    p->tries++;

    if (c->state != ST_READY || cb_transmit(w, c, p) != 0) {
        w->r->send_fail++;
        w->r->expected -= p->nexp;
        cb_pend_free(w, c, p);
        return;
    }

    w->r->retries++;
}


/* delivery tracking: per (receiver, sender) seq window */
static void
cb_deliver(cb_w_t *w, cb_conn_t *c, const char *p, size_t len, int has_seq,
    uint64_t seq)
{
    const cb_opt_t  *o = w->o;
    cb_res_t        *r = w->r;
    cb_memb_t       *m;
    cb_conv_t       *cv;
    cb_track_t      *t;
    cb_pend_t       *pp;
    char             buf[256];
    uint64_t         ts, now, d, i;
    uint32_t         gidx, gid, s, k;
    size_t           n;
    int              resend;

    now = cb_now();
    r->received++;

    if (cb_parse_body(p, len, &gidx, &gid, &s, &ts, &resend) != 0) {
        r->stray++;
        return;
    }

    m = NULL;
    cv = NULL;

    for (k = 0; k < c->nmemb; k++) {
        cv = &w->convs[c->memb[k].conv];
        if (cv->gidx == gidx) {
            m = &c->memb[k];
            break;
        }
    }

    if (m == NULL || gid < cv->base || gid >= cv->base + cv->size) {
        r->stray++;
        return;
    }

    t = &m->pairs[gid - cv->base];

    if (s >= t->next) {
        d = (uint64_t) s - t->next + 1;
        t->win = (d >= 64) ? 1 : (t->win << d) | 1;
        t->next = s + 1;
        r->unique++;

    } else {
        i = (uint64_t) t->next - 1 - s;

        if (i < 64 && (t->win >> i & 1)) {
            r->dup++;
            return;

        }

        if (i < 64) {
            t->win |= 1ULL << i;
        }

        r->unique++;

        /* a resend overtaken by later sends is the client's doing */
        if (resend) {
            r->ooo_retry++;
        } else {
            r->ooo++;
        }
    }

    if (gid == c->gid) {
        r->self_recv++;

    } else if (ts >= w->t_measure && ts < w->t_send_end) {
        cb_hist_add(&r->h_e2e, now > ts ? now - ts : 0);
        r->recv_measured++;
    }

    if (has_seq) {
        if (!m->have_seq) {
            m->have_seq = 1;
            m->last_seq = seq;

        } else if (seq == m->last_seq + 1) {
            m->last_seq = seq;

        } else if (seq > m->last_seq + 1) {
            r->seq_gap += seq - m->last_seq - 1;
            m->last_seq = seq;

        } else {
            r->seq_back++;
        }

        if (o->read_every > 0 && ++m->nrecv % o->read_every == 0) {
            pp = cb_pend_new(w, c, P_READ);
            if (pp != NULL) {
                n = (size_t) snprintf(buf, sizeof(buf),
                                      "{\"type\":\"read\",\"id\":%u,"
                                      "\"conversation_id\":\"%s\","
                                      "\"seq\":%llu}", pp->id, cv->id,
                                      (unsigned long long) m->last_seq);
                cb_ws_text(w, c, buf, n);
                r->read_sent++;
            }
        }
    }
}


/* ---- protocol handlers ---- */

static void
cb_chat_message(cb_w_t *w, cb_conn_t *c, const char *p, size_t len)
{
    cb_res_t   *r = w->r;
    cb_pend_t  *pp;
    cb_jv_t     v, body, seq;
    uint64_t    now, delay;
    int         retry;

    if (cb_json_get(p, len, "type", &v) != 0) {
        r->err_other++;
        return;
    }

    if (cb_jv_eq(&v, "event")) {
        /* live: acks coalesced as the browser client sends them */
        if (w->o->live && w->o->ack_ms
            && cb_json_get(p, len, "cursor", &v) == 0 && v.len < 200)
        {
            now = cb_now();

            if (now - c->t_ack >= (uint64_t) w->o->ack_ms * CB_MS) {
                char    abuf[256];
                size_t  an;

                c->t_ack = now;
                an = (size_t) snprintf(abuf, sizeof(abuf),
                                       "{\"type\":\"ack\",\"cursor\":"
                                       "\"%.*s\"}", (int) v.len, v.p);
                cb_ws_text(w, c, abuf, an);
                r->acks_sent++;
            }
        }

        if (cb_json_get(p, len, "event.kind", &v) == 0
            && cb_jv_eq(&v, "message.new")
            && cb_json_get(p, len, "event.message.body", &body) == 0)
        {
            if (cb_json_get(p, len, "event.seq", &seq) != 0
                && cb_json_get(p, len, "event.message.seq", &seq) != 0)
            {
                cb_deliver(w, c, body.p, body.len, 0, 0);
            } else {
                cb_deliver(w, c, body.p, body.len, 1,
                           (uint64_t) cb_jv_int(&seq));
            }
            return;
        }

        r->other_events++;
        return;
    }

    if (!cb_jv_eq(&v, "reply")) {
        r->other_events++;
        return;
    }

    if (cb_json_get(p, len, "id", &v) != 0) {
        r->err_other++;
        return;
    }

    pp = cb_pend_find(c, (uint32_t) cb_jv_int(&v));
    if (pp == NULL) {
        r->err_other++;
        return;
    }

    now = cb_now();

    if (cb_json_get(p, len, "ok", &v) == 0 && v.type == 't') {
        switch (pp->kind) {
        case P_HELLO:
            cb_pend_free(w, c, pp);
            cb_conn_ready(w, c);
            return;
        case P_SEND:
            r->acked++;
            if (pp->measured) {
                cb_hist_add(&r->h_ack, now - pp->intended);
            }
            break;
        default:
            break;
        }

        cb_pend_free(w, c, pp);
        return;
    }

    /* ok:false */
    retry = 0;
    delay = 100 * CB_MS;

    if (cb_json_get(p, len, "error.code", &v) == 0) {
        if (cb_jv_eq(&v, "unavailable")) {
            r->err_unavailable++;
            retry = 1;
        } else if (cb_jv_eq(&v, "rate_limited")) {
            r->err_rate_limited++;
            retry = 1;
        } else {
            r->err_other++;
        }
    } else {
        r->err_other++;
    }

    if (cb_json_get(p, len, "error.retry_after_ms", &v) == 0) {
        delay = (uint64_t) cb_jv_int(&v) * CB_MS;
    }

    if (w->o->verbose) {
        fprintf(stderr, "worker %d: user %u: %.*s\n", w->w, c->gid,
                (int) (len > 300 ? 300 : len), p);
    }

    switch (pp->kind) {

    case P_HELLO:
        cb_pend_free(w, c, pp);
        cb_conn_close(w, c, 4);
        return;

    case P_SEND:
        if (retry && pp->tries <= w->o->retries) {
            cb_heap_push(w, now + delay, (uint32_t) (c - w->c),
                         pp->id % CB_PEND);
            return;
        }

        r->send_fail++;
        r->expected -= pp->nexp;
        break;

    default:
        break;
    }

    cb_pend_free(w, c, pp);
}


static void
cb_sio_joins(cb_w_t *w, cb_conn_t *c)
{
    cb_pend_t  *p;
    char        buf[256];
    uint32_t    i;
    size_t      n;

    if (c->nmemb == 0) {
        cb_conn_ready(w, c);
        return;
    }

    c->state = ST_SIO_JOIN;
    c->joins_left = c->nmemb;

    for (i = 0; i < c->nmemb; i++) {
        p = cb_pend_new(w, c, P_JOIN);
        if (p == NULL) {
            cb_conn_close(w, c, 2);
            return;
        }

        n = (size_t) snprintf(buf, sizeof(buf), "42%u[\"join\",\"%s\"]",
                              p->id, w->convs[c->memb[i].conv].id);
        cb_ws_text(w, c, buf, n);
    }
}


static void
cb_sio_message(cb_w_t *w, cb_conn_t *c, const char *p, size_t len)
{
    cb_res_t    *r = w->r;
    cb_pend_t   *pp;
    const char  *b, *e;
    char         buf[CB_TOKEN_MAX + 32];
    uint32_t     id;
    size_t       i, n;

    if (len == 0) {
        r->err_other++;
        return;
    }

    switch (p[0]) {

    case '0':                                   /* engine.io open */
        if (c->state != ST_SIO_OPEN) {
            r->err_other++;
            return;
        }

        n = cb_token(w, c->gid);
        if (n > 0) {
            n = (size_t) snprintf(buf, sizeof(buf), "40{\"token\":\"%s\"}",
                                  w->token);
        } else {
            n = (size_t) snprintf(buf, sizeof(buf), "40");
        }

        cb_ws_text(w, c, buf, n);
        c->state = ST_SIO_CONNECT;
        return;

    case '2':                                   /* engine.io ping */
        r->pings++;
        cb_ws_text(w, c, "3", 1);
        return;

    case '1':
        cb_conn_close(w, c, 1);
        return;

    case '4':
        break;

    default:
        r->other_events++;
        return;
    }

    if (len < 2) {
        r->err_other++;
        return;
    }

    switch (p[1]) {

    case '0':                                   /* namespace connected */
        if (c->state == ST_SIO_CONNECT) {
            cb_sio_joins(w, c);
        }
        return;

    case '4':                                   /* connect_error */
        if (w->o->verbose) {
            fprintf(stderr, "worker %d: %.*s\n", w->w, (int) len, p);
        }
        cb_conn_close(w, c, 4);
        return;

    case '2':                                   /* event */
        b = memmem(p, len, "\"L1:", 4);
        if (b == NULL) {
            r->other_events++;
            return;
        }
        b++;
        e = memchr(b, '"', (size_t) (p + len - b));
        if (e == NULL) {
            r->stray++;
            return;
        }
        cb_deliver(w, c, b, (size_t) (e - b), 0, 0);
        return;

    case '3':                                   /* ack */
        id = 0;
        for (i = 2; i < len && p[i] >= '0' && p[i] <= '9'; i++) {
            id = id * 10 + (uint32_t) (p[i] - '0');
        }

        pp = cb_pend_find(c, id);
        if (pp == NULL) {
            r->err_other++;
            return;
        }

        if (pp->kind == P_JOIN) {
            cb_pend_free(w, c, pp);
            if (--c->joins_left == 0 && c->state == ST_SIO_JOIN) {
                cb_conn_ready(w, c);
            }
            return;
        }

        if (pp->kind == P_SEND) {
            r->acked++;
            if (pp->measured) {
                cb_hist_add(&r->h_ack, cb_now() - pp->intended);
            }
        }

        cb_pend_free(w, c, pp);
        return;

    default:
        r->other_events++;
        return;
    }
}


static void
cb_ws_message(cb_w_t *w, cb_conn_t *c, int op, const char *p, size_t len)
{
    (void) op;

    switch (w->o->mode) {
    case CB_MODE_CHAT:
        cb_chat_message(w, c, p, len);
        break;
    case CB_MODE_SIO:
        cb_sio_message(w, c, p, len);
        break;
    default:
        if (len >= 3 && memcmp(p, "L1:", 3) == 0) {
            cb_deliver(w, c, p, len, 0, 0);
        } else {
            w->r->other_events++;
        }
        break;
    }
}


/* parse frames from c->in; -1 when the connection was closed */
static int
cb_ws_frames(cb_w_t *w, cb_conn_t *c)
{
    unsigned char  *h;
    uint64_t        plen;
    size_t          avail, hl, i;
    unsigned char   mk[4];
    char           *pl;
    int             fin, op, masked;

    for ( ;; ) {
        h = (unsigned char *) c->in.p + c->in.pos;
        avail = c->in.len - c->in.pos;

        if (avail < 2) {
            return 0;
        }

        fin = h[0] & 0x80;
        op = h[0] & 0x0f;
        masked = h[1] & 0x80;
        plen = h[1] & 0x7f;
        hl = 2;

        if (plen == 126) {
            if (avail < 4) {
                return 0;
            }
            plen = (uint64_t) h[2] << 8 | h[3];
            hl = 4;

        } else if (plen == 127) {
            if (avail < 10) {
                return 0;
            }
            plen = 0;
            for (i = 0; i < 8; i++) {
                plen = plen << 8 | h[2 + i];
            }
            hl = 10;
        }

        if (masked) {
            memcpy(mk, h + hl, 4);
            hl += 4;
        }

        if (plen > CB_BUF_MAX) {
            cb_conn_close(w, c, 2);
            return -1;
        }

        if (avail < hl + plen) {
            return 0;
        }

        pl = (char *) h + hl;

        if (masked) {
            for (i = 0; i < plen; i++) {
                pl[i] ^= (char) mk[i & 3];
            }
        }

        c->in.pos += hl + plen;

        if (op & 0x8) {
            if (op == 0x9) {                        /* ping */
                w->r->pings++;
                cb_ws_frame(w, c, 0xA, pl, plen);

            } else if (op == 0x8) {                 /* close */
                if (c->state == ST_READY && w->o->verbose) {
                    fprintf(stderr, "worker %d: user %u: close %d\n", w->w,
                            c->gid, plen >= 2
                            ? ((unsigned char) pl[0] << 8
                               | (unsigned char) pl[1]) : 0);
                }
                cb_ws_frame(w, c, 0x8, pl, plen >= 2 ? 2 : 0);
                cb_flush_fd(w, c->fd, &c->out, &c->writable);
                cb_conn_close(w, c, 1);
                return -1;
            }

            continue;
        }

        if (op == 0) {
            if (!c->fragmenting || cb_buf_add(&c->frag, pl, plen) != 0) {
                cb_conn_close(w, c, 2);
                return -1;
            }

            if (fin) {
                c->fragmenting = 0;
                cb_ws_message(w, c, c->frag_op, c->frag.p + c->frag.pos,
                              c->frag.len - c->frag.pos);
                c->frag.pos = c->frag.len = 0;
            }

        } else if (!fin) {
            c->fragmenting = 1;
            c->frag_op = (uint8_t) op;
            c->frag.pos = c->frag.len = 0;
            if (cb_buf_add(&c->frag, pl, plen) != 0) {
                cb_conn_close(w, c, 2);
                return -1;
            }

        } else {
            cb_ws_message(w, c, op, pl, plen);
        }

        if (c->state == ST_CLOSED) {
            return -1;
        }
    }
}


/* the 101 response; -1 when the connection was closed */
static int
cb_upgrade_response(cb_w_t *w, cb_conn_t *c)
{
    const cb_opt_t  *o = w->o;
    const char      *p, *he, *v;
    char             expect[64];
    size_t           n, hl, vl;
    cb_pend_t       *pp;
    char             buf[CB_TOKEN_MAX + 64];

    p = c->in.p + c->in.pos;
    n = c->in.len - c->in.pos;

    he = memmem(p, n, "\r\n\r\n", 4);
    if (he == NULL) {
        if (n > 65536) {
            cb_conn_close(w, c, 2);
            return -1;
        }
        return 0;
    }

    hl = (size_t) (he - p) + 4;

    cb_ws_accept(c->key, expect);

    if (n < 12 || memcmp(p, "HTTP/1.1 101", 12) != 0
        || cb_header(p, hl, "\r\nsec-websocket-accept:", &v, &vl) != 0
        || vl != strlen(expect) || memcmp(v, expect, vl) != 0)
    {
        if (o->verbose || w->r->hs_fail < 3) {
            fprintf(stderr, "worker %d: upgrade refused: %.*s\n", w->w,
                    (int) (memchr(p, '\r', n) ? (char *) memchr(p, '\r', n)
                           - p : 0), p);
        }
        cb_conn_close(w, c, 2);
        return -1;
    }

    if (o->mode == CB_MODE_CHAT
        && (cb_header(p, hl, "\r\nsec-websocket-protocol:", &v, &vl) != 0
            || vl != 7 || memcmp(v, "chat.v1", 7) != 0))
    {
        if (w->r->hs_fail < 3) {
            fprintf(stderr, "worker %d: no chat.v1 subprotocol in 101\n",
                    w->w);
        }
        cb_conn_close(w, c, 2);
        return -1;
    }

    c->in.pos += hl;

    switch (o->mode) {

    case CB_MODE_CHAT:
        if (o->auth == CB_AUTH_HELLO) {
            pp = cb_pend_new(w, c, P_HELLO);
            if (pp == NULL) {
                cb_conn_close(w, c, 2);
                return -1;
            }
            cb_token(w, c->gid);
            n = (size_t) snprintf(buf, sizeof(buf),
                                  "{\"type\":\"hello\",\"id\":%u,"
                                  "\"token\":\"%s\"}", pp->id, w->token);
            cb_ws_text(w, c, buf, n);
            c->state = ST_HELLO;

        } else {
            cb_conn_ready(w, c);
        }
        break;

    case CB_MODE_SIO:
        c->state = ST_SIO_OPEN;
        break;

    default:
        cb_conn_ready(w, c);
        break;
    }

    return 0;
}


static void
cb_conn_read(cb_w_t *w, cb_conn_t *c)
{
    ssize_t  got;
    int      eof;

    eof = 0;

    for ( ;; ) {
        if (cb_buf_reserve(&c->in, 8192) != 0) {
            cb_conn_close(w, c, 2);
            return;
        }

        got = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len, 0);

        if (got > 0) {
            c->in.len += (size_t) got;
            w->r->bytes_in += (uint64_t) got;

            if (w->o->quickack) {
                int  one = 1;

                setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one,
                           sizeof(one));
            }

            if (c->state == ST_UPGRADE) {
                if (cb_upgrade_response(w, c) != 0) {
                    return;
                }
            }

            if (c->state > ST_UPGRADE && c->state < ST_CLOSED) {
                if (cb_ws_frames(w, c) != 0) {
                    return;
                }
            }

            continue;
        }

        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        }

        if (got < 0 && errno == EINTR) {
            continue;
        }

        eof = 1;
        break;
    }

    if (eof) {
        if (w->o->verbose && c->state == ST_READY) {
            fprintf(stderr, "worker %d: user %u: connection closed\n", w->w,
                    c->gid);
        }
        cb_conn_close(w, c, 1);
    }
}


static void
cb_conn_event(cb_w_t *w, cb_conn_t *c, uint32_t events)
{
    if (c->state == ST_CLOSED || c->fd < 0) {
        return;
    }

    if (c->state == ST_CONNECTING) {
        if ((events & (EPOLLERR | EPOLLHUP)) || cb_sock_error(c->fd) != 0) {
            cb_conn_close(w, c, 0);
            return;
        }

        c->state = ST_UPGRADE;
        c->writable = 1;
        cb_mark_dirty(w, c);
    }

    if (events & EPOLLOUT) {
        c->writable = 1;
        if (c->out.pos < c->out.len) {
            cb_mark_dirty(w, c);
        }
    }

    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        cb_conn_read(w, c);
    }
}


/* ---- control channel ---- */

static int
cb_ctl_send(cb_w_t *w, char cmd, uint64_t a, uint64_t b)
{
    cb_ctl_t  m;
    ssize_t   n;

    memset(&m, 0, sizeof(m));
    m.cmd = cmd;
    m.worker = w->w;
    m.t = cb_now();
    m.a = a;
    m.b = b;

    do {
        n = write(w->ctl_out, &m, sizeof(m));
    } while (n < 0 && errno == EINTR);

    return n == (ssize_t) sizeof(m) ? 0 : -1;
}


static void cb_start_run(cb_w_t *w, uint64_t t_run);


/* returns -1 when the parent asked to stop */
static int
cb_ctl_read(cb_w_t *w)
{
    cb_ctl_t  m;
    ssize_t   n;

    for ( ;; ) {
        n = read(w->ctl_in, &m, sizeof(m));

        if (n < 0 && errno == EINTR) {
            continue;
        }

        if (n < 0 && errno == EAGAIN) {
            return 0;
        }

        if (n != (ssize_t) sizeof(m)) {
            return -1;                  /* parent gone */
        }

        switch (m.cmd) {

        case CB_CTL_CONNECT:
            if (w->phase == PH_WAIT_CONNECT) {
                w->phase = PH_CONNECT;
                w->t_connect = m.t;
                w->cpu0 = cb_cpu_seconds();
            }
            break;

        case CB_CTL_RUN:
            if (w->phase == PH_WAIT_RUN) {
                cb_start_run(w, m.t);
            }
            break;

        case CB_CTL_ABORT:
            return -1;

        default:
            break;
        }
    }
}


static uint64_t
cb_gcd(uint64_t a, uint64_t b)
{
    uint64_t  t;

    while (b != 0) {
        t = a % b;
        a = b;
        b = t;
    }

    return a;
}


static void
cb_start_run(cb_w_t *w, uint64_t t_run)
{
    const cb_opt_t  *o = w->o;
    double           rate_w, secs;

    w->phase = PH_RUN;
    w->t_run = t_run;
    w->r->t_run_start = t_run;
    w->cpu0 = cb_cpu_seconds();
    w->t_cpu0 = cb_now();

    if (o->scenario == CB_SC_IDLE) {
        secs = o->hold;
        rate_w = 0;
        w->t_measure = t_run;

    } else if (o->scenario == CB_SC_STORM) {
        secs = o->hold;
        rate_w = 0;
        w->t_measure = t_run;

    } else {
        secs = o->warmup + o->duration;
        rate_w = o->rate * (double) w->n / (double) o->conns;
        w->t_measure = t_run + (uint64_t) (o->warmup * 1e9);
    }

    w->t_send_end = t_run + (uint64_t) (secs * 1e9);
    w->total_msgs = (uint64_t) (rate_w * secs);
    w->msg_iv = rate_w > 0 ? 1e9 / rate_w : 0;
    w->next_msg = 0;

    w->stride = (uint64_t) (w->n * 0.6180339887) | 1;
    while (w->n > 1 && cb_gcd(w->stride, w->n) != 1) {
        w->stride++;
    }
}


/* ---- the loop ---- */

static void
cb_housekeep(cb_w_t *w, uint64_t now)
{
    uint64_t    to;
    uint32_t    i;
    cb_conn_t  *c;
    cb_rest_t  *rc;

    to = (uint64_t) (w->o->connect_timeout * 1e9);

    /* REST requests that got no answer in time: retried on a new one */
    for (i = 0; i < w->nrest; i++) {
        rc = &w->rest[i];

        if ((rc->state == H_BUSY || rc->state == H_CONNECTING)
            && now - rc->t_start > to)
        {
            fprintf(stderr, "worker %d: create conversation: no response "
                    "in %.0f s\n", w->w, w->o->connect_timeout);
            cb_conv_result(w, rc->conv, 0);
            cb_rest_close(rc);
            cb_rest_kick(w);
        }
    }

    if (w->pending == 0) {
        return;
    }

    for (i = 0; i < w->next_connect; i++) {
        c = &w->c[i];
        if (c->state > ST_FREE && c->state < ST_READY
            && now - c->t_start > to)
        {
            cb_conn_close(w, c, 3);
        }
    }
}


static uint64_t
cb_tick(cb_w_t *w, uint64_t now)
{
    const cb_opt_t  *o = w->o;
    uint64_t         next, t;
    int              storm;

    next = now + 50 * CB_MS;

    if (now >= w->t_housekeep) {
        w->t_housekeep = now + 250 * CB_MS;
        cb_housekeep(w, now);
    }

    switch (w->phase) {

    case PH_SETUP:
        if (w->setup_done >= w->nconv) {
            cb_ctl_send(w, CB_CTL_SETUP_DONE, w->r->setup_fail, 0);
            w->phase = PH_WAIT_CONNECT;
        }
        break;

    case PH_CONNECT:
        storm = o->scenario == CB_SC_STORM;

        while (w->next_connect < w->n
               && (storm || w->pending < o->max_pending))
        {
            t = w->t_connect + (uint64_t) (w->conn_iv * w->next_connect);
            if (t > now) {
                if (t < next) {
                    next = t;
                }
                break;
            }

            cb_conn_start(w, w->next_connect, storm ? t : now);
            w->next_connect++;
        }

        if (w->connected >= w->n) {
            w->r->cpu_connect = cb_cpu_seconds() - w->cpu0;
            w->r->wall_connect = (double) (cb_now() - w->t_connect) / 1e9;
            cb_ctl_send(w, CB_CTL_READY, w->r->conn_ok, w->n);
            w->phase = PH_WAIT_RUN;
        }
        break;

    case PH_RUN:
        if (now < w->t_run) {
            next = w->t_run;
            break;
        }

        while (w->next_msg < w->total_msgs) {
            t = w->t_run + (uint64_t) (w->msg_iv * (double) w->next_msg);
            if (t > now) {
                if (t < next) {
                    next = t;
                }
                break;
            }

            cb_send_message(w, w->next_msg, t, now);
            w->next_msg++;
        }

        if (w->next_msg >= w->total_msgs && now >= w->t_send_end) {
            /* generator CPU over the sending window (not the drain) */
            w->r->cpu_run = cb_cpu_seconds() - w->cpu0;
            w->r->wall_run = (double) (now - w->t_cpu0) / 1e9;
            w->r->t_run_end = now;
            w->phase = PH_DRAIN;
            w->t_drain_end = now + (uint64_t) (o->drain * 1e9);
        } else if (w->next_msg >= w->total_msgs && w->t_send_end < next) {
            next = w->t_send_end;
        }
        break;

    case PH_DRAIN:
        if ((w->r->unique >= w->r->expected && w->inflight == 0
             && w->nheap == 0)
            || now >= w->t_drain_end)
        {
            w->phase = PH_DONE;
        }
        break;

    default:
        break;
    }

    /* retries due */
    while (w->nheap > 0 && w->heap[0].t <= now) {
        cb_timer_t  tm = w->heap[0];

        cb_heap_pop(w);
        cb_retry(w, tm.ci, tm.slot);
    }

    if (w->nheap > 0 && w->heap[0].t < next) {
        next = w->heap[0].t;
    }

    return next;
}


static void
cb_finish(cb_w_t *w)
{
    cb_res_t       *r = w->r;
    cb_conn_t      *c;
    struct rusage   ru;
    uint32_t        i, j;

    r->t_done = cb_now();

    for (i = 0; i < w->n; i++) {
        c = &w->c[i];

        if (c->pend != NULL) {
            for (j = 0; j < CB_PEND; j++) {
                if (c->pend[j].kind == P_SEND) {
                    r->unacked++;
                }
            }
        }

        if (c->state == ST_READY) {
            cb_ws_frame(w, c, 0x8, "\x03\xe8", 2);
            cb_flush_fd(w, c->fd, &c->out, &c->writable);
            cb_conn_close(w, c, 5);
        } else if (c->fd >= 0) {
            cb_conn_close(w, c, 5);
        }
    }

    getrusage(RUSAGE_SELF, &ru);
    r->maxrss_kb = ru.ru_maxrss;
}


int
cb_worker(const cb_opt_t *o, int wi, int ctl_in, int ctl_out, cb_res_t *res)
{
    static cb_w_t        ws;
    cb_w_t              *w = &ws;
    struct epoll_event   ev, evs[CB_NEVENTS];
    struct timespec      ts;
    struct rlimit        rl;
    cpu_set_t            set;
    uint64_t             now, next, kind;
    uint32_t             hi, i, idx;
    int                  n, k;

    memset(w, 0, sizeof(cb_w_t));
    w->o = o;
    w->r = res;
    w->w = wi;
    w->ctl_in = ctl_in;
    w->ctl_out = ctl_out;
    w->rng = 0x9E3779B97F4A7C15ULL ^ ((uint64_t) getpid() << 20) ^ cb_now();

    cb_hist_init(&res->h_e2e);
    cb_hist_init(&res->h_ack);
    cb_hist_init(&res->h_conn);
    cb_hist_init(&res->h_lag);

    /* wake up on time: the timetable has sub-millisecond steps */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

    if (o->npin > 0) {
        CPU_ZERO(&set);
        CPU_SET(o->pin[wi % o->npin], &set);
        if (sched_setaffinity(0, sizeof(set), &set) != 0) {
            fprintf(stderr, "worker %d: sched_setaffinity: %s\n", wi,
                    strerror(errno));
        }
    }

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    cb_worker_range(o, wi, &w->lo, &hi);
    w->n = hi - w->lo;
    res->users = w->n;

    w->bodybuf = malloc((size_t) o->size + 256);
    w->c = calloc(w->n ? w->n : 1, sizeof(cb_conn_t));
    w->dirty = calloc(w->n ? w->n : 1, sizeof(uint32_t));
    if (w->c == NULL || w->dirty == NULL || w->bodybuf == NULL) {
        snprintf(res->error, sizeof(res->error), "out of memory");
        return 1;
    }

    for (i = 0; i < w->n; i++) {
        w->c[i].fd = -1;
        w->c[i].gid = w->lo + i;
    }

    if (cb_topology(w) != 0) {
        snprintf(res->error, sizeof(res->error), "out of memory");
        return 1;
    }

    w->ep = epoll_create1(EPOLL_CLOEXEC);
    if (w->ep < 0) {
        snprintf(res->error, sizeof(res->error), "epoll_create1: %s",
                 strerror(errno));
        return 1;
    }

    fcntl(ctl_in, F_SETFL, fcntl(ctl_in, F_GETFL) | O_NONBLOCK);
    ev.events = EPOLLIN;
    ev.data.u64 = EV_CTL << 32;
    epoll_ctl(w->ep, EPOLL_CTL_ADD, ctl_in, &ev);

    w->conn_iv = 1e9 / (o->connect_rate * (double) w->n
                        / (double) o->conns);

    if (o->mode == CB_MODE_CHAT && w->nconv > 0) {
        w->nrest = o->rest_parallel;
        w->rest = calloc(w->nrest, sizeof(cb_rest_t));
        if (w->rest == NULL) {
            return 1;
        }
        for (i = 0; i < w->nrest; i++) {
            w->rest[i].fd = -1;
        }
        cb_rest_kick(w);

    } else {
        w->setup_done = w->nconv;
    }

    w->phase = PH_SETUP;

    /* bounded: every phase ends by count or by time (parent timeouts) */
    while (w->phase != PH_DONE) {
        now = cb_now();
        next = cb_tick(w, now);
        cb_flush_dirty(w);

        if (w->phase == PH_DONE) {
            break;
        }

        now = cb_now();
        next = next > now ? next - now : 0;
        ts.tv_sec = (time_t) (next / CB_NS);
        ts.tv_nsec = (long) (next % CB_NS);

        n = epoll_pwait2(w->ep, evs, CB_NEVENTS, &ts, NULL);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            snprintf(res->error, sizeof(res->error), "epoll_wait: %s",
                     strerror(errno));
            return 1;
        }

        for (k = 0; k < n; k++) {
            kind = evs[k].data.u64 >> 32;
            idx = (uint32_t) evs[k].data.u64;

            if (kind == EV_WS) {
                cb_conn_event(w, &w->c[idx], evs[k].events);

            } else if (kind == EV_REST) {
                cb_rest_event(w, &w->rest[idx], evs[k].events);

            } else if (cb_ctl_read(w) != 0) {
                snprintf(res->error, sizeof(res->error), "aborted");
                return 2;
            }
        }
    }

    cb_finish(w);
    res->done = 1;
    cb_ctl_send(w, CB_CTL_FINISHED, 0, 0);

    return 0;
}
