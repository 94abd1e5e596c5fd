
/*
 * Copyright (C) ngx_chat_module authors
 *
 * Per-worker pool of non-blocking libpq connections.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include "ngx_chat_module.h"


#define NGX_CHAT_DB_CLOSED        0
#define NGX_CHAT_DB_CONNECTING    1
#define NGX_CHAT_DB_SETUP         2
#define NGX_CHAT_DB_IDLE          3
#define NGX_CHAT_DB_BUSY          4

#define NGX_CHAT_DB_RETRY_MIN     100
#define NGX_CHAT_DB_RETRY_DEFAULT 1000
#define NGX_CHAT_DB_GUARD_SLACK   5000
#define NGX_CHAT_DB_TEXT_LEN      512
#define NGX_CHAT_DB_MAX_KEYWORDS  8

#define NGX_CHAT_DB_SCHEMA_SQL                                               \
    "SELECT coalesce(max(version), 0) FROM chat_schema_version"


typedef struct {
    PGconn                    *pg;
    ngx_connection_t          *c;
    ngx_chat_query_t          *query;            /* in flight */
    PGresult                  *res;              /* of the running command */
    ngx_event_t                timer;            /* connect, guard, retry */
    ngx_file_uniq_t            uniq;             /* identity of the socket */
    ngx_msec_t                 backoff;
    ngx_uint_t                 state;
    ngx_uint_t                 step;             /* setup: 0 schema check */
    ngx_uint_t                 index;
    PostgresPollingStatusType  poll;

    unsigned                   first:1;          /* first attempt */
    unsigned                   flushing:1;
} ngx_chat_db_conn_t;


typedef struct {
    ngx_chat_db_conn_t        *conns;
    ngx_uint_t                 nconns;
    ngx_uint_t                 nstmts;

    ngx_queue_t                queue;            /* of ngx_chat_query_t */
    ngx_uint_t                 nqueued;
    ngx_uint_t                 queue_size;

    ngx_event_t                dispatch;
    ngx_log_t                 *log;

    ngx_msec_t                 connect_timeout;
    ngx_msec_t                 guard;
    ngx_msec_t                 retry_max;

    const char                *keywords[NGX_CHAT_DB_MAX_KEYWORDS];
    const char                *values[NGX_CHAT_DB_MAX_KEYWORDS];

    unsigned                   running:1;
    unsigned                   schema_behind:1;
    unsigned                   reported:1;       /* outage logged */
} ngx_chat_db_t;


static ngx_int_t ngx_chat_db_init_params(ngx_cycle_t *cycle);
static void ngx_chat_db_check_host(const char *host);
static void ngx_chat_db_connect(ngx_chat_db_conn_t *dbc);
static void ngx_chat_db_connect_poll(ngx_chat_db_conn_t *dbc);
static ngx_int_t ngx_chat_db_attach(ngx_chat_db_conn_t *dbc);
static void ngx_chat_db_detach(ngx_chat_db_conn_t *dbc);
static ngx_int_t ngx_chat_db_check_socket(ngx_chat_db_conn_t *dbc);
static ngx_int_t ngx_chat_db_arm(ngx_chat_db_conn_t *dbc, ngx_uint_t rd,
    ngx_uint_t wr);
static ngx_int_t ngx_chat_db_flush(ngx_chat_db_conn_t *dbc);
static void ngx_chat_db_read_handler(ngx_event_t *rev);
static void ngx_chat_db_write_handler(ngx_event_t *wev);
static void ngx_chat_db_timer_handler(ngx_event_t *ev);
static void ngx_chat_db_dispatch_handler(ngx_event_t *ev);
static void ngx_chat_db_results(ngx_chat_db_conn_t *dbc);
static void ngx_chat_db_setup(ngx_chat_db_conn_t *dbc);
static void ngx_chat_db_setup_next(ngx_chat_db_conn_t *dbc);
static ngx_int_t ngx_chat_db_check_schema(ngx_chat_db_conn_t *dbc,
    PGresult *res);
static void ngx_chat_db_up(ngx_chat_db_conn_t *dbc);
static void ngx_chat_db_dispatch(void);
static void ngx_chat_db_send(ngx_chat_db_conn_t *dbc, ngx_chat_query_t *q);
static void ngx_chat_db_query_done(ngx_chat_db_conn_t *dbc);
static void ngx_chat_db_log_stmt_error(ngx_chat_query_t *q, PGresult *res);
static void ngx_chat_db_fail(ngx_chat_db_conn_t *dbc, const char *detail);
static void ngx_chat_db_close(ngx_chat_db_conn_t *dbc);
static void ngx_chat_db_schedule(ngx_chat_db_conn_t *dbc);
static void ngx_chat_db_fail_queue(void);
static ngx_uint_t ngx_chat_db_usable(void);
static ngx_uint_t ngx_chat_db_count(ngx_uint_t state);
static ngx_chat_db_conn_t *ngx_chat_db_idle(void);
static void ngx_chat_db_notice(void *arg, const PGresult *res);
static ngx_str_t *ngx_chat_db_text(const char *msg);


static ngx_chat_db_t  ngx_chat_db;


ngx_int_t
ngx_chat_db_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t             i;
    ngx_chat_db_conn_t    *dbc;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_chat_worker.cmcf;

    ngx_memzero(&ngx_chat_db, sizeof(ngx_chat_db_t));
    ngx_queue_init(&ngx_chat_db.queue);

    ngx_chat_db.log = ngx_chat_worker.log ? ngx_chat_worker.log : cycle->log;

    ngx_chat_db.dispatch.handler = ngx_chat_db_dispatch_handler;
    ngx_chat_db.dispatch.log = ngx_chat_db.log;

    if (cmcf == NULL
        || cmcf->db_conninfo.len == 0
        || cmcf->db_pool_size == 0)
    {
        return NGX_OK;
    }

    for (i = 0; ngx_chat_stmts[i].name; i++) { /* void */ }

    ngx_chat_db.nstmts = i;
    ngx_chat_db.queue_size = cmcf->db_queue_size;
    ngx_chat_db.connect_timeout = cmcf->db_connect_timeout;
    ngx_chat_db.retry_max = ngx_max(cmcf->db_retry_max, NGX_CHAT_DB_RETRY_MIN);

    if (cmcf->db_statement_timeout) {
        ngx_chat_db.guard = cmcf->db_statement_timeout
                            + NGX_CHAT_DB_GUARD_SLACK;
    }

    switch (ngx_chat_db_init_params(cycle)) {

    case NGX_OK:
        break;

    case NGX_DECLINED:
        /* a bad conninfo only disables the store until the next reload */
        return NGX_OK;

    default:
        return NGX_ERROR;
    }

    ngx_chat_db.conns = ngx_pcalloc(cycle->pool,
                                    cmcf->db_pool_size
                                    * sizeof(ngx_chat_db_conn_t));
    if (ngx_chat_db.conns == NULL) {
        return NGX_ERROR;
    }

    ngx_chat_db.nconns = cmcf->db_pool_size;
    ngx_chat_db.running = 1;

    for (i = 0; i < ngx_chat_db.nconns; i++) {
        dbc = &ngx_chat_db.conns[i];

        dbc->index = i;
        dbc->first = 1;
        dbc->backoff = NGX_CHAT_DB_RETRY_MIN;

        dbc->timer.handler = ngx_chat_db_timer_handler;
        dbc->timer.data = dbc;
        dbc->timer.log = ngx_chat_db.log;
        dbc->timer.cancelable = 1;
    }

    for (i = 0; i < ngx_chat_db.nconns; i++) {
        ngx_chat_db_connect(&ngx_chat_db.conns[i]);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_chat_db_init_params(ngx_cycle_t *cycle)
{
    char                  *errmsg;
    u_char                *conninfo, *options, *p;
    size_t                 len;
    ngx_uint_t             n;
    const char            *user_options, *host, *hostaddr;
    ngx_chat_main_conf_t  *cmcf;
    PQconninfoOption      *opts, *o;

    cmcf = ngx_chat_worker.cmcf;

    conninfo = ngx_pnalloc(cycle->pool, cmcf->db_conninfo.len + 1);
    if (conninfo == NULL) {
        return NGX_ERROR;
    }

    (void) ngx_cpystrn(conninfo, cmcf->db_conninfo.data,
                       cmcf->db_conninfo.len + 1);

    errmsg = NULL;

    opts = PQconninfoParse((char *) conninfo, &errmsg);
    if (opts == NULL) {
        ngx_log_error(NGX_LOG_ERR, ngx_chat_db.log, 0,
                      "chat: invalid database conninfo \"%V\": %V",
                      &cmcf->db_conninfo,
                      ngx_chat_db_text(errmsg ? errmsg : "out of memory"));

        if (errmsg) {
            PQfreemem(errmsg);
        }

        return NGX_DECLINED;
    }

    user_options = NULL;
    host = NULL;
    hostaddr = NULL;

    for (o = opts; o->keyword; o++) {
        if (o->val == NULL || o->val[0] == '\0') {
            continue;
        }

        if (ngx_strcmp(o->keyword, "options") == 0) {
            user_options = o->val;

        } else if (ngx_strcmp(o->keyword, "host") == 0) {
            host = o->val;

        } else if (ngx_strcmp(o->keyword, "hostaddr") == 0) {
            hostaddr = o->val;
        }
    }

    if (host && hostaddr == NULL && ngx_worker == 0) {
        ngx_chat_db_check_host(host);
    }

    options = NULL;

    if (user_options || cmcf->db_statement_timeout) {
        len = (user_options ? ngx_strlen(user_options) + 1 : 0)
              + sizeof("-c statement_timeout=") - 1 + NGX_TIME_T_LEN + 1;

        options = ngx_pnalloc(cycle->pool, len);
        if (options == NULL) {
            PQconninfoFree(opts);
            return NGX_ERROR;
        }

        p = options;

        if (user_options) {
            p = ngx_sprintf(p, "%s", user_options);
        }

        if (cmcf->db_statement_timeout) {
            p = ngx_sprintf(p, "%s-c statement_timeout=%M",
                            user_options ? " " : "",
                            cmcf->db_statement_timeout);
        }

        *p = '\0';
    }

    PQconninfoFree(opts);

    /*
     * With expand_dbname the conninfo string is expanded in place of
     * "dbname": keywords before it are defaults the conninfo may override,
     * keywords after it override the conninfo.
     */

    n = 0;

    ngx_chat_db.keywords[n] = "fallback_application_name";
    ngx_chat_db.values[n++] = "nginx chat";

    ngx_chat_db.keywords[n] = "dbname";
    ngx_chat_db.values[n++] = (const char *) conninfo;

    /* GSSAPI negotiation may block in Kerberos library calls */
    ngx_chat_db.keywords[n] = "gssencmode";
    ngx_chat_db.values[n++] = "disable";

    if (options) {
        ngx_chat_db.keywords[n] = "options";
        ngx_chat_db.values[n++] = (const char *) options;
    }

    ngx_chat_db.keywords[n] = NULL;
    ngx_chat_db.values[n] = NULL;

    return NGX_OK;
}


static void
ngx_chat_db_check_host(const char *host)
{
    u_char      *p, *last, *end;
#if (NGX_HAVE_INET6)
    u_char       addr6[16];
#endif
    ngx_uint_t   numeric;

    p = (u_char *) host;
    last = p + ngx_strlen(host);

    while (p < last) {
        end = ngx_strlchr(p, last, ',');
        if (end == NULL) {
            end = last;
        }

        numeric = (end == p || *p == '/' || *p == '@'
                   || ngx_inet_addr(p, end - p) != INADDR_NONE);

#if (NGX_HAVE_INET6)
        if (!numeric) {
            numeric = (ngx_inet6_addr(p, end - p, addr6) == NGX_OK);
        }
#endif

        if (!numeric) {
            ngx_log_error(NGX_LOG_WARN, ngx_chat_db.log, 0,
                          "chat: database host \"%*s\" is resolved with a "
                          "blocking DNS lookup on every connect; use "
                          "\"hostaddr=\" or a socket directory",
                          end - p, p);
            return;
        }

        p = end + 1;
    }
}


void
ngx_chat_db_exit_process(void)
{
    ngx_uint_t           i;
    ngx_chat_query_t    *q;
    ngx_chat_db_conn_t  *dbc;

    if (ngx_chat_db.log == NULL) {
        /* init_process never ran */
        return;
    }

    ngx_chat_db.running = 0;

    if (ngx_chat_db.dispatch.posted) {
        ngx_delete_posted_event(&ngx_chat_db.dispatch);
    }

    for (i = 0; i < ngx_chat_db.nconns; i++) {
        dbc = &ngx_chat_db.conns[i];

        q = dbc->query;
        dbc->query = NULL;

        ngx_chat_db_close(dbc);

        if (q) {
            q->handler(q, NULL, NGX_DECLINED);
        }
    }

    ngx_chat_db_fail_queue();
}


ngx_int_t
ngx_chat_db_query(ngx_chat_query_t *q)
{
    if (!ngx_chat_db_usable()) {
        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                       "chat db: store unavailable, query declined");
        return NGX_DECLINED;
    }

    /* idle connections take queued queries as soon as dispatch runs */

    if (ngx_chat_db.nqueued
        >= ngx_chat_db.queue_size + ngx_chat_db_count(NGX_CHAT_DB_IDLE))
    {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                       "chat db: queue full (%ui), query declined",
                       ngx_chat_db.nqueued);
        return NGX_DECLINED;
    }

    q->start = ngx_current_msec;

    ngx_queue_insert_tail(&ngx_chat_db.queue, &q->queue);
    ngx_chat_db.nqueued++;

    /*
     * Sending is deferred to a posted event: the handler must never run
     * before the caller has seen NGX_OK, and a batch being built may still
     * grow until then.
     */

    if (!ngx_chat_db.dispatch.posted) {
        ngx_post_event(&ngx_chat_db.dispatch, &ngx_posted_events);
    }

    return NGX_OK;
}


ngx_int_t
ngx_chat_db_ready(void)
{
    return ngx_chat_db.running
           && !ngx_chat_db.schema_behind
           && (ngx_chat_db_count(NGX_CHAT_DB_IDLE)
               + ngx_chat_db_count(NGX_CHAT_DB_BUSY)) > 0;
}


ngx_msec_t
ngx_chat_db_retry_after(void)
{
    ngx_uint_t           i, found;
    ngx_msec_t           left, min;
    ngx_chat_db_conn_t  *dbc;

    found = 0;
    min = 0;

    for (i = 0; i < ngx_chat_db.nconns; i++) {
        dbc = &ngx_chat_db.conns[i];

        if (dbc->state != NGX_CHAT_DB_CLOSED || !dbc->timer.timer_set) {
            continue;
        }

        if ((ngx_msec_int_t) (dbc->timer.timer.key - ngx_current_msec) > 0) {
            left = dbc->timer.timer.key - ngx_current_msec;

        } else {
            left = 0;
        }

        if (!found || left < min) {
            min = left;
            found = 1;
        }
    }

    if (!found) {
        return NGX_CHAT_DB_RETRY_DEFAULT;
    }

    min = ngx_max(min, NGX_CHAT_DB_RETRY_MIN);

    return ngx_min(min, ngx_chat_db.retry_max);
}


ngx_uint_t
ngx_chat_db_busy(void)
{
    ngx_uint_t  i, n;

    n = ngx_chat_db.nqueued;

    for (i = 0; i < ngx_chat_db.nconns; i++) {
        if (ngx_chat_db.conns[i].query) {
            n++;
        }
    }

    return n;
}


static void
ngx_chat_db_connect(ngx_chat_db_conn_t *dbc)
{
    PGconn  *pg;

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: connecting", dbc->index);

    dbc->state = NGX_CHAT_DB_CONNECTING;

    pg = PQconnectStartParams(ngx_chat_db.keywords, ngx_chat_db.values, 1);
    if (pg == NULL) {
        ngx_chat_db_fail(dbc, "out of memory");
        return;
    }

    dbc->pg = pg;

    (void) PQsetNoticeReceiver(pg, ngx_chat_db_notice, dbc);

    if (PQstatus(pg) == CONNECTION_BAD) {
        ngx_chat_db_fail(dbc, NULL);
        return;
    }

    /* right after PQconnectStart libpq waits for the socket to be writable */
    dbc->poll = PGRES_POLLING_WRITING;

    if (ngx_chat_db_attach(dbc) != NGX_OK
        || ngx_chat_db_arm(dbc, 0, 1) != NGX_OK)
    {
        ngx_chat_db_fail(dbc, "could not register the socket");
        return;
    }

    if (ngx_chat_db.connect_timeout) {
        ngx_add_timer(&dbc->timer, ngx_chat_db.connect_timeout);
    }
}


static void
ngx_chat_db_connect_poll(ngx_chat_db_conn_t *dbc)
{
    ngx_int_t  rc;

    dbc->poll = PQconnectPoll(dbc->pg);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: connect poll: %d", dbc->index, dbc->poll);

    if (dbc->poll == PGRES_POLLING_FAILED) {
        ngx_chat_db_fail(dbc, NULL);
        return;
    }

    if (ngx_chat_db_check_socket(dbc) != NGX_OK) {
        ngx_chat_db_fail(dbc, "could not register the new socket");
        return;
    }

    switch (dbc->poll) {

    case PGRES_POLLING_OK:
        ngx_chat_db_setup(dbc);
        return;

    case PGRES_POLLING_READING:
        rc = ngx_chat_db_arm(dbc, 1, 0);
        break;

    default: /* PGRES_POLLING_WRITING */
        rc = ngx_chat_db_arm(dbc, 0, 1);
        break;
    }

    if (rc != NGX_OK) {
        ngx_chat_db_fail(dbc, "could not register the socket");
    }
}


static ngx_int_t
ngx_chat_db_attach(ngx_chat_db_conn_t *dbc)
{
    ngx_socket_t       fd;
    ngx_file_info_t    fi;
    ngx_connection_t  *c;

    fd = PQsocket(dbc->pg);
    if (fd == (ngx_socket_t) -1) {
        return NGX_ERROR;
    }

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR) {
        ngx_log_error(NGX_LOG_ALERT, ngx_chat_db.log, ngx_errno,
                      ngx_fd_info_n " of database socket %d failed", fd);
        return NGX_ERROR;
    }

    c = ngx_get_connection(fd, ngx_chat_db.log);
    if (c == NULL) {
        return NGX_ERROR;
    }

    c->data = dbc;
    c->number = ngx_atomic_fetch_add(ngx_connection_counter, 1);

    c->read->handler = ngx_chat_db_read_handler;
    c->write->handler = ngx_chat_db_write_handler;
    c->read->log = ngx_chat_db.log;
    c->write->log = ngx_chat_db.log;

    dbc->c = c;
    dbc->uniq = ngx_file_uniq(&fi);

    return NGX_OK;
}


/*
 * The socket belongs to libpq, which closes it itself (PQfinish, or when
 * it gives up on an address): nginx must forget the connection without
 * touching the descriptor.  NGX_CLOSE_EVENT makes epoll skip epoll_ctl(),
 * since closing the socket removes it from the epoll set, and the number
 * may already belong to a new socket.
 */

static void
ngx_chat_db_detach(ngx_chat_db_conn_t *dbc)
{
    ngx_connection_t  *c;

    c = dbc->c;
    if (c == NULL) {
        return;
    }

    dbc->c = NULL;

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    if (ngx_del_conn) {
        ngx_del_conn(c, NGX_CLOSE_EVENT);

    } else {
        if (c->read->active) {
            ngx_del_event(c->read, NGX_READ_EVENT, NGX_CLOSE_EVENT);
        }

        if (c->write->active) {
            ngx_del_event(c->write, NGX_WRITE_EVENT, NGX_CLOSE_EVENT);
        }
    }

    c->read->closed = 1;
    c->write->closed = 1;

    ngx_free_connection(c);

    c->fd = (ngx_socket_t) -1;
}


/*
 * During connect libpq may close its socket and open another one (next
 * address, SSL or GSS fallback); the new socket often gets the same
 * number, so the inode tells them apart.
 */

static ngx_int_t
ngx_chat_db_check_socket(ngx_chat_db_conn_t *dbc)
{
    ngx_socket_t     fd;
    ngx_file_info_t  fi;

    fd = PQsocket(dbc->pg);

    if (dbc->c
        && fd == dbc->c->fd
        && ngx_fd_info(fd, &fi) != NGX_FILE_ERROR
        && ngx_file_uniq(&fi) == dbc->uniq)
    {
        return NGX_OK;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: socket changed to %d", dbc->index, fd);

    ngx_chat_db_detach(dbc);

    return ngx_chat_db_attach(dbc);
}


/* both events are level-triggered: armed only while really wanted */

static ngx_int_t
ngx_chat_db_arm(ngx_chat_db_conn_t *dbc, ngx_uint_t rd, ngx_uint_t wr)
{
    ngx_event_t  *rev, *wev;

    rev = dbc->c->read;
    wev = dbc->c->write;

    if (rd && !rev->active) {
        if (ngx_add_event(rev, NGX_READ_EVENT, NGX_LEVEL_EVENT) != NGX_OK) {
            return NGX_ERROR;
        }

    } else if (!rd && rev->active) {
        if (ngx_del_event(rev, NGX_READ_EVENT, 0) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (wr && !wev->active) {
        if (ngx_add_event(wev, NGX_WRITE_EVENT, NGX_LEVEL_EVENT) != NGX_OK) {
            return NGX_ERROR;
        }

    } else if (!wr && wev->active) {
        if (ngx_del_event(wev, NGX_WRITE_EVENT, 0) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_chat_db_flush(ngx_chat_db_conn_t *dbc)
{
    int  rc;

    rc = PQflush(dbc->pg);
    if (rc == -1) {
        return NGX_ERROR;
    }

    dbc->flushing = (rc == 1);

    return ngx_chat_db_arm(dbc, 1, dbc->flushing);
}


static void
ngx_chat_db_read_handler(ngx_event_t *rev)
{
    PGnotify            *n;
    ngx_connection_t    *c;
    ngx_chat_db_conn_t  *dbc;

    c = rev->data;
    dbc = c->data;

    if (dbc->state == NGX_CHAT_DB_CONNECTING) {
        if (dbc->poll == PGRES_POLLING_READING) {
            ngx_chat_db_connect_poll(dbc);
        }

        return;
    }

    if (!PQconsumeInput(dbc->pg)) {
        ngx_chat_db_fail(dbc, NULL);
        return;
    }

    while ((n = PQnotifies(dbc->pg)) != NULL) {
        PQfreemem(n);
    }

    if (dbc->flushing && ngx_chat_db_flush(dbc) != NGX_OK) {
        ngx_chat_db_fail(dbc, NULL);
        return;
    }

    ngx_chat_db_results(dbc);
}


static void
ngx_chat_db_write_handler(ngx_event_t *wev)
{
    ngx_connection_t    *c;
    ngx_chat_db_conn_t  *dbc;

    c = wev->data;
    dbc = c->data;

    if (dbc->state == NGX_CHAT_DB_CONNECTING) {
        if (dbc->poll == PGRES_POLLING_WRITING) {
            ngx_chat_db_connect_poll(dbc);
        }

        return;
    }

    if (!dbc->flushing) {
        if (ngx_chat_db_arm(dbc, 1, 0) != NGX_OK) {
            ngx_chat_db_fail(dbc, "could not register the socket");
        }

        return;
    }

    if (ngx_chat_db_flush(dbc) != NGX_OK) {
        ngx_chat_db_fail(dbc, NULL);
        return;
    }

    /* PQflush() reads whatever the server sent while it could not write */
    ngx_chat_db_results(dbc);
}


static void
ngx_chat_db_timer_handler(ngx_event_t *ev)
{
    ngx_chat_db_conn_t  *dbc;

    dbc = ev->data;

    switch (dbc->state) {

    case NGX_CHAT_DB_CLOSED:
        ngx_chat_db_connect(dbc);
        return;

    case NGX_CHAT_DB_CONNECTING:
    case NGX_CHAT_DB_SETUP:
        ngx_chat_db_fail(dbc, "timed out");
        return;

    case NGX_CHAT_DB_BUSY:
        ngx_chat_db_fail(dbc, "no answer to a query in time");
        return;

    default:
        return;
    }
}


static void
ngx_chat_db_dispatch_handler(ngx_event_t *ev)
{
    ngx_chat_db_dispatch();
}


static void
ngx_chat_db_results(ngx_chat_db_conn_t *dbc)
{
    PGresult  *res;

    for ( ;; ) {
        if (PQisBusy(dbc->pg)) {
            return;
        }

        res = PQgetResult(dbc->pg);
        if (res == NULL) {
            break;
        }

        if (dbc->res == NULL) {
            dbc->res = res;

        } else {
            PQclear(res);
        }
    }

    if (PQstatus(dbc->pg) == CONNECTION_BAD) {
        ngx_chat_db_fail(dbc, NULL);
        return;
    }

    switch (dbc->state) {

    case NGX_CHAT_DB_SETUP:
        ngx_chat_db_setup_next(dbc);
        return;

    case NGX_CHAT_DB_BUSY:
        ngx_chat_db_query_done(dbc);
        return;

    default:
        if (dbc->res) {
            PQclear(dbc->res);
            dbc->res = NULL;
        }

        return;
    }
}


static void
ngx_chat_db_setup(ngx_chat_db_conn_t *dbc)
{
    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: connected, checking schema", dbc->index);

    dbc->state = NGX_CHAT_DB_SETUP;
    dbc->step = 0;

    if (PQsetnonblocking(dbc->pg, 1) == -1
        || !PQsendQuery(dbc->pg, NGX_CHAT_DB_SCHEMA_SQL)
        || ngx_chat_db_flush(dbc) != NGX_OK)
    {
        ngx_chat_db_fail(dbc, NULL);
    }
}


static void
ngx_chat_db_setup_next(ngx_chat_db_conn_t *dbc)
{
    u_char            detail[NGX_CHAT_DB_TEXT_LEN];
    PGresult         *res;
    ngx_int_t         rc;
    ngx_chat_stmt_t  *stmt;

    res = dbc->res;

    if (dbc->step == 0) {
        rc = ngx_chat_db_check_schema(dbc, res);

        if (rc == NGX_DECLINED) {
            ngx_chat_db_close(dbc);
            ngx_chat_db_schedule(dbc);
            ngx_chat_db_fail_queue();
            return;
        }

        if (rc == NGX_ERROR) {
            (void) ngx_snprintf(detail, sizeof(detail) - 1,
                                "checking the schema version failed: %s%Z",
                                res ? PQresultErrorMessage(res) : "");
            detail[sizeof(detail) - 1] = '\0';

            ngx_chat_db_fail(dbc, (char *) detail);
            return;
        }

    } else if (res == NULL || PQresultStatus(res) != PGRES_COMMAND_OK) {
        (void) ngx_snprintf(detail, sizeof(detail) - 1,
                            "preparing statement \"%s\" failed: %s%Z",
                            ngx_chat_stmts[dbc->step - 1].name,
                            res ? PQresultErrorMessage(res) : "");
        detail[sizeof(detail) - 1] = '\0';

        ngx_chat_db_fail(dbc, (char *) detail);
        return;
    }

    if (res) {
        PQclear(res);
        dbc->res = NULL;
    }

    stmt = &ngx_chat_stmts[dbc->step];

    if (stmt->name == NULL) {
        ngx_chat_db_up(dbc);
        return;
    }

    dbc->step++;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: preparing \"%s\"", dbc->index, stmt->name);

    if (!PQsendPrepare(dbc->pg, stmt->name, stmt->sql, stmt->nparams, NULL)
        || ngx_chat_db_flush(dbc) != NGX_OK)
    {
        ngx_chat_db_fail(dbc, NULL);
    }
}


/*
 * NGX_OK: the schema is recent enough; NGX_DECLINED: it is behind (logged
 * once until it is fixed); NGX_ERROR: the check itself failed.
 */

static ngx_int_t
ngx_chat_db_check_schema(ngx_chat_db_conn_t *dbc, PGresult *res)
{
    char       *state;
    ngx_int_t   version;

    if (res == NULL) {
        return NGX_ERROR;
    }

    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        state = PQresultErrorField(res, PG_DIAG_SQLSTATE);

        /* 42P01: undefined_table */

        if (state == NULL || ngx_strcmp(state, "42P01") != 0) {
            return NGX_ERROR;
        }

        if (!ngx_chat_db.schema_behind) {
            ngx_log_error(NGX_LOG_ERR, ngx_chat_db.log, 0,
                          "chat: database schema table chat_schema_version "
                          "is missing, the module needs schema version %d; "
                          "run the sql/ migrations",
                          NGX_CHAT_SCHEMA_VERSION);
        }

        ngx_chat_db.schema_behind = 1;
        return NGX_DECLINED;
    }

    if (PQntuples(res) != 1 || PQnfields(res) != 1) {
        return NGX_ERROR;
    }

    version = ngx_atoi((u_char *) PQgetvalue(res, 0, 0),
                       PQgetlength(res, 0, 0));

    if (version == NGX_ERROR) {
        return NGX_ERROR;
    }

    if (version < NGX_CHAT_SCHEMA_VERSION) {
        if (!ngx_chat_db.schema_behind) {
            ngx_log_error(NGX_LOG_ERR, ngx_chat_db.log, 0,
                          "chat: database schema version %i is behind "
                          "the module's %d; run the sql/ migrations",
                          version, NGX_CHAT_SCHEMA_VERSION);
        }

        ngx_chat_db.schema_behind = 1;
        return NGX_DECLINED;
    }

    if (ngx_chat_db.schema_behind) {
        ngx_log_error(NGX_LOG_NOTICE, ngx_chat_db.log, 0,
                      "chat: database schema is at version %i now", version);
        ngx_chat_db.schema_behind = 0;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: schema version %i", dbc->index, version);

    return NGX_OK;
}


static void
ngx_chat_db_up(ngx_chat_db_conn_t *dbc)
{
    if (dbc->timer.timer_set) {
        ngx_del_timer(&dbc->timer);
    }

    dbc->state = NGX_CHAT_DB_IDLE;
    dbc->first = 0;
    dbc->backoff = NGX_CHAT_DB_RETRY_MIN;

    if (ngx_chat_db.reported) {
        ngx_log_error(NGX_LOG_NOTICE, ngx_chat_db.log, 0,
                      "chat: connection to PostgreSQL restored");
        ngx_chat_db.reported = 0;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: ready", dbc->index);

    ngx_chat_db_dispatch();

    ngx_chat_store_on_ready();
}


static void
ngx_chat_db_dispatch(void)
{
    ngx_queue_t         *qq;
    ngx_chat_query_t    *q;
    ngx_chat_db_conn_t  *dbc;

    while (!ngx_queue_empty(&ngx_chat_db.queue)) {

        dbc = ngx_chat_db_idle();
        if (dbc == NULL) {
            return;
        }

        qq = ngx_queue_head(&ngx_chat_db.queue);
        ngx_queue_remove(qq);
        ngx_chat_db.nqueued--;

        q = ngx_queue_data(qq, ngx_chat_query_t, queue);

        ngx_chat_db_send(dbc, q);
    }
}


static void
ngx_chat_db_send(ngx_chat_db_conn_t *dbc, ngx_chat_query_t *q)
{
    if (q->build && q->build(q) == NGX_ERROR) {
        q->handler(q, NULL, NGX_ERROR);
        return;
    }

    if (q->stmt >= ngx_chat_db.nstmts
        || q->nparams > NGX_CHAT_QUERY_MAX_PARAMS)
    {
        ngx_log_error(NGX_LOG_ALERT, ngx_chat_db.log, 0,
                      "chat: invalid query: statement %ui, %ui parameters",
                      q->stmt, q->nparams);
        q->handler(q, NULL, NGX_ERROR);
        return;
    }

    ngx_log_debug4(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: \"%s\" %ui params, queued %M ms",
                   dbc->index, ngx_chat_stmts[q->stmt].name, q->nparams,
                   ngx_current_msec - q->start);

    dbc->query = q;
    dbc->state = NGX_CHAT_DB_BUSY;

    if (!PQsendQueryPrepared(dbc->pg, ngx_chat_stmts[q->stmt].name,
                             (int) q->nparams, q->params, q->lengths, NULL, 0)
        || ngx_chat_db_flush(dbc) != NGX_OK)
    {
        ngx_chat_db_fail(dbc, NULL);
        return;
    }

    if (ngx_chat_db.guard) {
        ngx_add_timer(&dbc->timer, ngx_chat_db.guard);
    }
}


static void
ngx_chat_db_query_done(ngx_chat_db_conn_t *dbc)
{
    PGresult          *res;
    ngx_int_t          rc;
    ngx_chat_query_t  *q;
    ExecStatusType     status;

    if (dbc->timer.timer_set) {
        ngx_del_timer(&dbc->timer);
    }

    q = dbc->query;
    res = dbc->res;

    dbc->query = NULL;
    dbc->res = NULL;
    dbc->state = NGX_CHAT_DB_IDLE;

    status = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;

    if (status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK) {
        rc = NGX_OK;

    } else {
        rc = NGX_ERROR;
        ngx_chat_db_log_stmt_error(q, res);
    }

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: done rc:%i in %M ms",
                   dbc->index, rc, ngx_current_msec - q->start);

    /* q may be gone and dbc busy again once the handler returns */

    q->handler(q, res, rc);

    if (res) {
        PQclear(res);
    }

    ngx_chat_db_dispatch();
}


static void
ngx_chat_db_log_stmt_error(ngx_chat_query_t *q, PGresult *res)
{
    char        *state;
    ngx_uint_t   level;

    if (res == NULL) {
        ngx_log_error(NGX_LOG_ERR, ngx_chat_db.log, 0,
                      "chat: statement \"%s\" returned no result",
                      ngx_chat_stmts[q->stmt].name);
        return;
    }

    state = PQresultErrorField(res, PG_DIAG_SQLSTATE);

    /* 23: integrity constraint violation, 40: transaction rollback */

    if (state
        && (ngx_strncmp(state, "23", 2) == 0
            || ngx_strncmp(state, "40", 2) == 0))
    {
        level = NGX_LOG_WARN;

    } else {
        level = NGX_LOG_ERR;
    }

    ngx_log_error(level, ngx_chat_db.log, 0,
                  "chat: statement \"%s\" failed: %V",
                  ngx_chat_stmts[q->stmt].name,
                  ngx_chat_db_text(PQresultErrorMessage(res)));
}


/*
 * Drops a connection that failed or broke: the query in flight, if any,
 * is declined, and queued queries too once no connection is left.  Only
 * the first failure of an outage is logged as an error.
 */

static void
ngx_chat_db_fail(ngx_chat_db_conn_t *dbc, const char *detail)
{
    char              *severity;
    ngx_uint_t         level;
    const char        *what;
    ngx_chat_query_t  *q;

    if (detail == NULL) {
        severity = NULL;

        if (dbc->res) {
            severity = PQresultErrorField(dbc->res,
                                          PG_DIAG_SEVERITY_NONLOCALIZED);
        }

        /* a FATAL from the server says why it closed the connection */

        if (severity
            && (ngx_strcmp(severity, "FATAL") == 0
                || ngx_strcmp(severity, "PANIC") == 0))
        {
            detail = PQresultErrorMessage(dbc->res);

        } else if (dbc->pg) {
            detail = PQerrorMessage(dbc->pg);

        } else {
            detail = "unknown error";
        }
    }

    switch (dbc->state) {

    case NGX_CHAT_DB_IDLE:
    case NGX_CHAT_DB_BUSY:
        what = "lost connection to PostgreSQL";
        break;

    default:
        what = "could not connect to PostgreSQL";
        break;
    }

    level = ngx_chat_db.reported ? NGX_LOG_INFO : NGX_LOG_ERR;
    ngx_chat_db.reported = 1;

    ngx_log_error(level, ngx_chat_db.log, 0, "chat: %s: %V",
                  what, ngx_chat_db_text(detail));

    q = dbc->query;
    dbc->query = NULL;

    ngx_chat_db_close(dbc);
    ngx_chat_db_schedule(dbc);

    if (q) {
        q->handler(q, NULL, NGX_DECLINED);
    }

    if (!ngx_chat_db_usable()) {
        ngx_chat_db_fail_queue();
    }
}


static void
ngx_chat_db_close(ngx_chat_db_conn_t *dbc)
{
    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: close", dbc->index);

    if (dbc->timer.timer_set) {
        ngx_del_timer(&dbc->timer);
    }

    if (dbc->res) {
        PQclear(dbc->res);
        dbc->res = NULL;
    }

    ngx_chat_db_detach(dbc);

    if (dbc->pg) {
        PQfinish(dbc->pg);
        dbc->pg = NULL;
    }

    dbc->state = NGX_CHAT_DB_CLOSED;
    dbc->first = 0;
    dbc->flushing = 0;
}


static void
ngx_chat_db_schedule(ngx_chat_db_conn_t *dbc)
{
    ngx_msec_t  delay;

    if (!ngx_chat_db.running) {
        return;
    }

    /* jitter keeps the workers from reconnecting in lockstep */

    delay = dbc->backoff + (ngx_msec_t) ngx_random() % (dbc->backoff / 4 + 1);
    delay = ngx_min(delay, ngx_chat_db.retry_max);

    dbc->backoff = ngx_min(dbc->backoff * 2, ngx_chat_db.retry_max);

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: reconnect in %M ms", dbc->index, delay);

    ngx_add_timer(&dbc->timer, delay);
}


static void
ngx_chat_db_fail_queue(void)
{
    ngx_queue_t       *qq;
    ngx_chat_query_t  *q;

    while (!ngx_queue_empty(&ngx_chat_db.queue)) {
        qq = ngx_queue_head(&ngx_chat_db.queue);
        ngx_queue_remove(qq);
        ngx_chat_db.nqueued--;

        q = ngx_queue_data(qq, ngx_chat_query_t, queue);

        q->handler(q, NULL, NGX_DECLINED);
    }
}


/*
 * Queries are accepted while a connection is up, and also while a
 * connection is still making its first attempt since the worker started,
 * so that work arriving right after start waits instead of failing.
 */

static ngx_uint_t
ngx_chat_db_usable(void)
{
    ngx_uint_t           i;
    ngx_chat_db_conn_t  *dbc;

    if (!ngx_chat_db.running || ngx_chat_db.schema_behind) {
        return 0;
    }

    for (i = 0; i < ngx_chat_db.nconns; i++) {
        dbc = &ngx_chat_db.conns[i];

        if (dbc->state == NGX_CHAT_DB_IDLE
            || dbc->state == NGX_CHAT_DB_BUSY
            || dbc->first)
        {
            return 1;
        }
    }

    return 0;
}


static ngx_uint_t
ngx_chat_db_count(ngx_uint_t state)
{
    ngx_uint_t  i, n;

    n = 0;

    for (i = 0; i < ngx_chat_db.nconns; i++) {
        if (ngx_chat_db.conns[i].state == state) {
            n++;
        }
    }

    return n;
}


static ngx_chat_db_conn_t *
ngx_chat_db_idle(void)
{
    ngx_uint_t  i;

    for (i = 0; i < ngx_chat_db.nconns; i++) {
        if (ngx_chat_db.conns[i].state == NGX_CHAT_DB_IDLE) {
            return &ngx_chat_db.conns[i];
        }
    }

    return NULL;
}


static void
ngx_chat_db_notice(void *arg, const PGresult *res)
{
    char        *severity;
    ngx_uint_t   level;

    severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);

    if (severity && ngx_strcmp(severity, "WARNING") == 0) {
        level = NGX_LOG_WARN;

    } else {
        level = NGX_LOG_INFO;
    }

    ngx_log_error(level, ngx_chat_db.log, 0, "chat: PostgreSQL: %V",
                  ngx_chat_db_text(PQresultErrorMessage(res)));
}


/* libpq messages span lines and end with a newline: make one log line */

static ngx_str_t *
ngx_chat_db_text(const char *msg)
{
    u_char            *p, *last;
    const char        *s;
    static u_char      buf[NGX_CHAT_DB_TEXT_LEN];
    static ngx_str_t   text;

    p = buf;
    last = buf + sizeof(buf);

    for (s = msg; *s && p < last; s++) {

        if (*s == '\n' || *s == '\r' || *s == '\t') {
            if (p > buf && p[-1] != ' ') {
                *p++ = ' ';
            }

            continue;
        }

        *p++ = (u_char) *s;
    }

    while (p > buf && p[-1] == ' ') {
        p--;
    }

    text.len = p - buf;
    text.data = buf;

    return &text;
}
