
/*
 * Copyright (C) ngx_chat_module authors
 *
 * Per-worker pool of non-blocking libpq connections.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include "ngx_chat_module.h"
#include "ngx_chat_db.h"
#include "ngx_chat_metrics.h"
#include "ngx_chat_store.h"
#include "ngx_chat_json.h"


#define NGX_CHAT_DB_CLOSED        0
#define NGX_CHAT_DB_CONNECTING    1
#define NGX_CHAT_DB_SETUP         2
#define NGX_CHAT_DB_IDLE          3
#define NGX_CHAT_DB_BUSY          4
#define NGX_CHAT_DB_HELD          5     /* in a transaction, for its handler */
#define NGX_CHAT_DB_ROLLBACK      6     /* ending a transaction left open */

#define NGX_CHAT_DB_RETRY_MIN     100
#define NGX_CHAT_DB_RETRY_DEFAULT 1000
#define NGX_CHAT_DB_GUARD_SLACK   5000
#define NGX_CHAT_DB_TEXT_LEN      512
#define NGX_CHAT_DB_MAX_KEYWORDS  16

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


/* a file libpq finds in the home directory unless it is named */
typedef struct {
    const char                *keyword;
    const char                *env;
    const char                *path;             /* under the home */
    const char                *unless;           /* makes libpq skip it */
    const char                *unless_env;
} ngx_chat_db_file_t;


/* one entry of the host list of a conninfo, as libpq will get it */
typedef struct {
    ngx_str_t                  host;
    ngx_str_t                  hostaddr;
    ngx_str_t                  port;
} ngx_chat_db_host_t;


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
    unsigned                   keep_result:1;
    unsigned                   schema_behind:1;
    unsigned                   reported:1;       /* outage logged */
} ngx_chat_db_t;


static char *ngx_chat_db_resolve(ngx_conf_t *cf, ngx_chat_main_conf_t *cmcf,
    PQconninfoOption *opts);
static ngx_int_t ngx_chat_db_split(ngx_conf_t *cf, const char *list,
    ngx_array_t *a);
static ngx_uint_t ngx_chat_db_host_is_name(ngx_str_t *host);
static ngx_int_t ngx_chat_db_add_host(ngx_conf_t *cf, ngx_array_t *out,
    ngx_str_t *host, ngx_str_t *port, ngx_uint_t *resolved);
static ngx_str_t *ngx_chat_db_join(ngx_conf_t *cf, ngx_array_t *hosts,
    size_t offset);
static u_char *ngx_chat_db_conninfo(ngx_conf_t *cf, PQconninfoOption *opts,
    ngx_str_t *host, ngx_str_t *hostaddr, ngx_str_t *port);
static const char *ngx_chat_db_opt(PQconninfoOption *opts,
    const char *keyword);
static ngx_int_t ngx_chat_db_init_params(ngx_cycle_t *cycle);
static ngx_int_t ngx_chat_db_pin_files(ngx_cycle_t *cycle,
    PQconninfoOption *opts, ngx_uint_t n);
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
static void ngx_chat_db_rollback(ngx_chat_db_conn_t *dbc);
static ngx_uint_t ngx_chat_db_alive(ngx_chat_db_conn_t *dbc);
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


static ngx_chat_db_file_t  ngx_chat_db_files[] = {
    { "passfile", "PGPASSFILE", ".pgpass", NULL, NULL },
    { "sslcert", "PGSSLCERT", ".postgresql/postgresql.crt", NULL, NULL },
    { "sslkey", "PGSSLKEY", ".postgresql/postgresql.key", NULL, NULL },
    { "sslrootcert", "PGSSLROOTCERT", ".postgresql/root.crt", NULL, NULL },
    { "sslcrl", "PGSSLCRL", ".postgresql/root.crl",
      "sslcrldir", "PGSSLCRLDIR" },
    { NULL, NULL, NULL, NULL, NULL }
};


/*
 * "chat_db conninfo", at configuration time: nginx -t, start and reload,
 * in the master before any worker exists, where blocking is allowed.  A
 * host name would make libpq call getaddrinfo() -- blocking DNS -- on
 * every connect inside a worker: names are resolved here, once, and
 * given to libpq as hostaddr.  host stays, for TLS verification and the
 * password file; every address of a name becomes an entry of the host list
 * of its own, so libpq still tries them in turn.  A reload resolves again.
 */

char *
ngx_chat_db_conf(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_main_conf_t *cmcf = conf;

    char              *rv, *errmsg;
    ngx_str_t         *value;
    PQconninfoOption  *opts;

    if (cmcf->db_conninfo.data) {
        return "is duplicate";
    }

    value = cf->args->elts;

    errmsg = NULL;

    opts = PQconninfoParse((char *) value[1].data, &errmsg);
    if (opts == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid chat_db conninfo: %V",
                           ngx_chat_db_text(errmsg ? errmsg
                                                   : "out of memory"));
        if (errmsg) {
            PQfreemem(errmsg);
        }

        return NGX_CONF_ERROR;
    }

    cmcf->db_conninfo = value[1];

    rv = ngx_chat_db_resolve(cf, cmcf, opts);

    PQconninfoFree(opts);

    return rv;
}


static char *
ngx_chat_db_resolve(ngx_conf_t *cf, ngx_chat_main_conf_t *cmcf,
    PQconninfoOption *opts)
{
    u_char              *conninfo;
    ngx_str_t           *host, *port, none;
    ngx_uint_t           i, resolved;
    ngx_array_t          hosts, ports, out;
    const char          *hostaddr;

    hostaddr = ngx_chat_db_opt(opts, "hostaddr");

    /* with hostaddr the operator has chosen the addresses already */

    if (hostaddr) {
        return NGX_CONF_OK;
    }

    if (ngx_chat_db_split(cf, ngx_chat_db_opt(opts, "host"), &hosts)
           != NGX_OK
        || ngx_chat_db_split(cf, ngx_chat_db_opt(opts, "port"), &ports)
           != NGX_OK
        || ngx_array_init(&out, cf->pool, 4, sizeof(ngx_chat_db_host_t))
           != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    /* libpq's own rule: one port for all hosts, or one port per host */

    if (ports.nelts > 1 && ports.nelts != hosts.nelts) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_db has %ui ports for %ui hosts",
                           ports.nelts, hosts.nelts);
        return NGX_CONF_ERROR;
    }

    ngx_str_null(&none);

    host = hosts.elts;
    port = ports.elts;
    resolved = 0;

    for (i = 0; i < hosts.nelts; i++) {
        if (ngx_chat_db_add_host(cf, &out, &host[i],
                                 ports.nelts > 1 ? &port[i] : &none,
                                 &resolved)
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    if (!resolved) {
        /* socket directories and addresses: libpq resolves nothing */
        return NGX_CONF_OK;
    }

    conninfo = ngx_chat_db_conninfo(cf, opts,
                   ngx_chat_db_join(cf, &out,
                                    offsetof(ngx_chat_db_host_t, host)),
                   ngx_chat_db_join(cf, &out,
                                    offsetof(ngx_chat_db_host_t, hostaddr)),
                   ports.nelts > 1
                   ? ngx_chat_db_join(cf, &out,
                                      offsetof(ngx_chat_db_host_t, port))
                   : NULL);
    if (conninfo == NULL) {
        return NGX_CONF_ERROR;
    }

    cmcf->db_conninfo.data = conninfo;
    cmcf->db_conninfo.len = ngx_strlen(conninfo);

    return NGX_CONF_OK;
}


/* a comma separated list of libpq, empty items kept; none for NULL */

static ngx_int_t
ngx_chat_db_split(ngx_conf_t *cf, const char *list, ngx_array_t *a)
{
    u_char     *p, *last, *end;
    ngx_str_t  *s;

    if (ngx_array_init(a, cf->pool, 4, sizeof(ngx_str_t)) != NGX_OK) {
        return NGX_ERROR;
    }

    if (list == NULL) {
        return NGX_OK;
    }

    p = (u_char *) list;
    last = p + ngx_strlen(list);

    for ( ;; ) {
        end = ngx_strlchr(p, last, ',');
        if (end == NULL) {
            end = last;
        }

        s = ngx_array_push(a);
        if (s == NULL) {
            return NGX_ERROR;
        }

        s->data = p;
        s->len = end - p;

        if (end == last) {
            return NGX_OK;
        }

        p = end + 1;
    }
}


/* what libpq would hand to getaddrinfo() as a name */

static ngx_uint_t
ngx_chat_db_host_is_name(ngx_str_t *host)
{
#if (NGX_HAVE_INET6)
    u_char  addr6[16];
#endif

    /* the default socket, a socket directory, an abstract socket */

    if (host->len == 0 || host->data[0] == '/' || host->data[0] == '@') {
        return 0;
    }

    if (ngx_inet_addr(host->data, host->len) != INADDR_NONE) {
        return 0;
    }

#if (NGX_HAVE_INET6)
    if (ngx_inet6_addr(host->data, host->len, addr6) == NGX_OK) {
        return 0;
    }
#endif

    return 1;
}


/* one host of the list; a name becomes one entry per address */

static ngx_int_t
ngx_chat_db_add_host(ngx_conf_t *cf, ngx_array_t *out, ngx_str_t *host,
    ngx_str_t *port, ngx_uint_t *resolved)
{
    u_char              *p, *last;
    size_t               len;
    ngx_str_t            list;
    ngx_uint_t           i;
    ngx_url_t            u;
    ngx_chat_db_host_t  *h;

    if (!ngx_chat_db_host_is_name(host)) {
        h = ngx_array_push(out);
        if (h == NULL) {
            return NGX_ERROR;
        }

        h->host = *host;
        ngx_str_null(&h->hostaddr);
        h->port = *port;

        return NGX_OK;
    }

    ngx_memzero(&u, sizeof(ngx_url_t));
    u.host = *host;

    if (ngx_inet_resolve_host(cf->pool, &u) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_db host \"%V\" could not be resolved "
                           "(%s); give \"hostaddr=\" or a socket directory",
                           host, u.err ? u.err : "error");
        return NGX_ERROR;
    }

    /* the addresses, ", " between them: the entries and the log line */

    len = u.naddrs * (NGX_SOCKADDR_STRLEN + 2);

    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    list.data = p;
    last = p + len;

    for (i = 0; i < u.naddrs; i++) {
        h = ngx_array_push(out);
        if (h == NULL) {
            return NGX_ERROR;
        }

        if (i) {
            *p++ = ',';
            *p++ = ' ';
        }

        h->host = *host;
        h->port = *port;
        h->hostaddr.data = p;
        h->hostaddr.len = ngx_sock_ntop(u.addrs[i].sockaddr,
                                        u.addrs[i].socklen, p, last - p, 0);
        p += h->hostaddr.len;
    }

    list.len = p - list.data;

    ngx_conf_log_error(NGX_LOG_NOTICE, cf, 0,
                       "chat_db host \"%V\" resolved to %V: workers connect "
                       "to %s without DNS (resolved again on reload)",
                       host, &list,
                       u.naddrs > 1 ? "these addresses" : "this address");

    (*resolved)++;

    return NGX_OK;
}


/* the field at offset of every entry, comma separated */

static ngx_str_t *
ngx_chat_db_join(ngx_conf_t *cf, ngx_array_t *hosts, size_t offset)
{
    u_char              *p;
    size_t               len;
    ngx_str_t           *s, *f;
    ngx_uint_t           i;
    ngx_chat_db_host_t  *h;

    s = ngx_palloc(cf->pool, sizeof(ngx_str_t));
    if (s == NULL) {
        return NULL;
    }

    h = hosts->elts;
    len = 0;

    for (i = 0; i < hosts->nelts; i++) {
        f = (ngx_str_t *) ((u_char *) &h[i] + offset);
        len += f->len + 1;
    }

    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NULL;
    }

    s->data = p;

    for (i = 0; i < hosts->nelts; i++) {
        f = (ngx_str_t *) ((u_char *) &h[i] + offset);

        if (i) {
            *p++ = ',';
        }

        p = ngx_cpymem(p, f->data, f->len);
    }

    s->len = p - s->data;

    return s;
}


/*
 * The conninfo the workers get: every option given, as keyword='value',
 * with host, hostaddr and (when not NULL) port replaced.
 */

static u_char *
ngx_chat_db_conninfo(ngx_conf_t *cf, PQconninfoOption *opts,
    ngx_str_t *host, ngx_str_t *hostaddr, ngx_str_t *port)
{
    u_char            *conninfo, *p, *v, *last;
    size_t             len;
    ngx_str_t          val, *repl;
    PQconninfoOption  *o;

    if (host == NULL || hostaddr == NULL) {
        return NULL;
    }

    len = 1;

    for (o = opts; o->keyword; o++) {
        len += ngx_strlen(o->keyword) + sizeof(" =''") - 1
               + 2 * (o->val ? ngx_strlen(o->val) : 0);
    }

    len += 2 * (host->len + hostaddr->len + (port ? port->len : 0));

    conninfo = ngx_pnalloc(cf->pool, len);
    if (conninfo == NULL) {
        return NULL;
    }

    p = conninfo;

    for (o = opts; o->keyword; o++) {

        if (ngx_strcmp(o->keyword, "host") == 0) {
            repl = host;

        } else if (ngx_strcmp(o->keyword, "hostaddr") == 0) {
            repl = hostaddr;

        } else if (port && ngx_strcmp(o->keyword, "port") == 0) {
            repl = port;

        } else if (o->val == NULL) {
            continue;

        } else {
            val.data = (u_char *) o->val;
            val.len = ngx_strlen(o->val);
            repl = &val;
        }

        if (p != conninfo) {
            *p++ = ' ';
        }

        p = ngx_sprintf(p, "%s='", o->keyword);

        for (v = repl->data, last = v + repl->len; v < last; v++) {
            if (*v == '\'' || *v == '\\') {
                *p++ = '\\';
            }

            *p++ = *v;
        }

        *p++ = '\'';
    }

    *p = '\0';

    return conninfo;
}


/* the value of an option, NULL when it is not given or empty */

static const char *
ngx_chat_db_opt(PQconninfoOption *opts, const char *keyword)
{
    PQconninfoOption  *o;

    for (o = opts; o->keyword; o++) {
        if (ngx_strcmp(o->keyword, keyword) == 0) {
            return (o->val && o->val[0]) ? o->val : NULL;
        }
    }

    return NULL;
}


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
    ngx_int_t              rc;
    ngx_uint_t             n;
    const char            *user_options;
    ngx_chat_main_conf_t  *cmcf;
    PQconninfoOption      *opts;

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

    user_options = ngx_chat_db_opt(opts, "options");

    options = NULL;

    /*
     * The store's reasoning about positions (ngx_chat_bus.c) needs each
     * statement to see what committed before it: read committed, whatever
     * the database's default.  A transaction left open by a worker that
     * lost its connection ends by itself, and with it its locks.
     */
    len = (user_options ? ngx_strlen(user_options) + 1 : 0)
          + sizeof(" -c default_transaction_isolation=read\\ committed") - 1
          + sizeof(" -c statement_timeout=") - 1 + NGX_TIME_T_LEN
          + sizeof(" -c idle_in_transaction_session_timeout=") - 1
          + NGX_TIME_T_LEN + 1;

    options = ngx_pnalloc(cycle->pool, len);
    if (options == NULL) {
        PQconninfoFree(opts);
        return NGX_ERROR;
    }

    p = options;

    if (user_options) {
        p = ngx_sprintf(p, "%s ", user_options);
    }

    p = ngx_sprintf(p, "-c default_transaction_isolation=read\\ committed");

    if (cmcf->db_statement_timeout) {
        p = ngx_sprintf(p, " -c statement_timeout=%M",
                        cmcf->db_statement_timeout);
    }

    p = ngx_sprintf(p, " -c idle_in_transaction_session_timeout=%M",
                    cmcf->db_statement_timeout
                    ? cmcf->db_statement_timeout + 5000 : (ngx_msec_t) 60000);

    *p = '\0';

    /*
     * With expand_dbname the conninfo string is expanded in place of
     * "dbname": keywords before it are defaults the conninfo may override,
     * keywords after it override the conninfo.
     */

    n = 0;

    ngx_chat_db.keywords[n] = "fallback_application_name";
    ngx_chat_db.values[n++] = "nginx chat";

    rc = ngx_chat_db_pin_files(cycle, opts, n);

    PQconninfoFree(opts);

    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    n = rc;

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


/*
 * libpq looks up the home directory -- getpwuid(), through NSS, which may
 * ask a directory server -- on every connect where it needs the password
 * file or, with TLS, the client certificate, key, root certificate and
 * CRL and none of them is named.  The worker looks it up once, here, and
 * names libpq's own default paths, as defaults that the conninfo still
 * overrides, for each file neither the conninfo nor the environment names.
 * Returns the next keyword slot.
 */

static ngx_int_t
ngx_chat_db_pin_files(ngx_cycle_t *cycle, PQconninfoOption *opts,
    ngx_uint_t n)
{
    u_char              *p;
    size_t               len;
    ngx_str_t            home;
    struct passwd       *pw;
    ngx_chat_db_file_t  *f;

    /* libpq 15 takes $HOME first, like pqGetHomeDirectory() */

    home.data = (u_char *) getenv("HOME");

    if (home.data == NULL || home.data[0] == '\0') {
        pw = getpwuid(geteuid());

        if (pw == NULL || pw->pw_dir == NULL || pw->pw_dir[0] == '\0') {
            return n;
        }

        home.data = (u_char *) pw->pw_dir;
    }

    home.len = ngx_strlen(home.data);

    for (f = ngx_chat_db_files; f->keyword; f++) {

        if (ngx_chat_db_opt(opts, f->keyword) || getenv(f->env)) {
            continue;
        }

        if (f->unless
            && (ngx_chat_db_opt(opts, f->unless) || getenv(f->unless_env)))
        {
            continue;
        }

        len = home.len + 1 + ngx_strlen(f->path) + 1;

        p = ngx_pnalloc(cycle->pool, len);
        if (p == NULL) {
            return NGX_ERROR;
        }

        (void) ngx_sprintf(p, "%V/%s%Z", &home, f->path);

        ngx_chat_db.keywords[n] = f->keyword;
        ngx_chat_db.values[n++] = (const char *) p;
    }

    return n;
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
    ngx_uint_t  i;

    if (!ngx_chat_db.running || ngx_chat_db.schema_behind) {
        return 0;
    }

    for (i = 0; i < ngx_chat_db.nconns; i++) {
        if (ngx_chat_db_alive(&ngx_chat_db.conns[i])) {
            return 1;
        }
    }

    return 0;
}


/* for /chat/ready */

ngx_uint_t
ngx_chat_db_alive_count(void)
{
    ngx_uint_t  i, n;

    n = 0;

    for (i = 0; i < ngx_chat_db.nconns; i++) {
        if (ngx_chat_db_alive(&ngx_chat_db.conns[i])) {
            n++;
        }
    }

    return n;
}


ngx_uint_t
ngx_chat_db_queued(void)
{
    return ngx_chat_db.nqueued;
}


ngx_uint_t
ngx_chat_db_schema_behind(void)
{
    return ngx_chat_db.schema_behind;
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
    case NGX_CHAT_DB_ROLLBACK:
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

        /* several statements: the first error, else the last result */

        if (dbc->res == NULL) {
            dbc->res = res;

        } else if (PQresultStatus(dbc->res) != PGRES_TUPLES_OK
                   && PQresultStatus(dbc->res) != PGRES_COMMAND_OK)
        {
            PQclear(res);

        } else {
            PQclear(dbc->res);
            dbc->res = res;
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

    case NGX_CHAT_DB_ROLLBACK:
        if (dbc->timer.timer_set) {
            ngx_del_timer(&dbc->timer);
        }

        if (dbc->res) {
            PQclear(dbc->res);
            dbc->res = NULL;
        }

        if (PQtransactionStatus(dbc->pg) != PQTRANS_IDLE) {
            ngx_chat_db_fail(dbc, "could not end a transaction");
            return;
        }

        dbc->state = NGX_CHAT_DB_IDLE;
        ngx_chat_db_dispatch();
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

    if (!(q->sql ? PQsendQuery(dbc->pg, q->sql)
                 : PQsendQueryPrepared(dbc->pg, ngx_chat_stmts[q->stmt].name,
                                       (int) q->nparams, q->params,
                                       q->lengths, NULL, 0))
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

    if (q->txn && rc == NGX_OK) {
        q->conn = dbc;
        dbc->state = NGX_CHAT_DB_HELD;
    }

    ngx_chat_db.keep_result = 0;

    ngx_chat_metrics_query(q->sql ? NGX_CHAT_M_STMTS - 1 : q->stmt,
                           ngx_current_msec - q->start);

    q->handler(q, res, rc);

    if (res && !ngx_chat_db.keep_result) {
        PQclear(res);
    }

    ngx_chat_db.keep_result = 0;

    if (dbc->state == NGX_CHAT_DB_HELD
        || (dbc->state == NGX_CHAT_DB_IDLE
            && PQtransactionStatus(dbc->pg) != PQTRANS_IDLE))
    {
        ngx_chat_db_rollback(dbc);
    }

    ngx_chat_db_dispatch();
}


/* the next statement of the transaction that holds conn */

void
ngx_chat_db_continue(ngx_chat_query_t *q, void *conn)
{
    ngx_chat_db_conn_t  *dbc;

    dbc = conn;

    if (dbc->state != NGX_CHAT_DB_HELD) {
        ngx_log_error(NGX_LOG_ALERT, ngx_chat_db.log, 0,
                      "chat: a transaction went on without its connection");
        q->handler(q, NULL, NGX_DECLINED);
        return;
    }

    q->start = ngx_current_msec;

    ngx_chat_db_send(dbc, q);
}


/*
 * Appends data as a dollar-quoted SQL literal, with a random tag that the
 * data is checked not to hold: for the simple query protocol, which has
 * no parameters.
 */
ngx_int_t
ngx_chat_db_literal(ngx_chat_buf_t *b, const u_char *data, size_t len)
{
    u_char      tag[24], *p;
    size_t      n;
    ngx_uint_t  tries;

    for (tries = 0; /* void */; tries++) {
        p = ngx_sprintf(tag, "$c%08xD$", (uint32_t) ngx_random());
        n = p - tag;

        /* without its closing '$': data that ends in it would close early */
        if (len < n - 1 || memmem(data, len, tag, n - 1) == NULL) {
            break;
        }

        if (tries == 16) {
            return NGX_ERROR;
        }
    }

    if (ngx_chat_buf_add(b, tag, n) != NGX_OK
        || (len && ngx_chat_buf_add(b, data, len) != NGX_OK)
        || ngx_chat_buf_add(b, tag, n) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


void
ngx_chat_db_keep_result(void)
{
    ngx_chat_db.keep_result = 1;
}


static void
ngx_chat_db_rollback(ngx_chat_db_conn_t *dbc)
{
    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_chat_db.log, 0,
                   "chat db #%ui: rolling back", dbc->index);

    dbc->state = NGX_CHAT_DB_ROLLBACK;

    if (!PQsendQuery(dbc->pg, "ROLLBACK")
        || ngx_chat_db_flush(dbc) != NGX_OK)
    {
        ngx_chat_db_fail(dbc, NULL);
        return;
    }

    if (ngx_chat_db.guard) {
        ngx_add_timer(&dbc->timer, ngx_chat_db.guard);
    }
}


/* connected and set up: idle, or working for somebody */

static ngx_uint_t
ngx_chat_db_alive(ngx_chat_db_conn_t *dbc)
{
    return dbc->state == NGX_CHAT_DB_IDLE
           || dbc->state == NGX_CHAT_DB_BUSY
           || dbc->state == NGX_CHAT_DB_HELD
           || dbc->state == NGX_CHAT_DB_ROLLBACK;
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
    case NGX_CHAT_DB_HELD:
    case NGX_CHAT_DB_ROLLBACK:
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
        /* the slowest statements end here: they count too */
        ngx_chat_metrics_query(q->sql ? NGX_CHAT_M_STMTS - 1 : q->stmt,
                               ngx_current_msec - q->start);
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

    ngx_chat_count(NGX_CHAT_MC_DB_RECONNECTS, 1);

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

        if (ngx_chat_db_alive(dbc) || dbc->first)
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
