
/*
 * Copyright (C) ngx_chat_module authors
 *
 * The notification outbox: the platform's back end learns which messages
 * stayed undelivered to a recipient for chat_notify_delay (to send a
 * push or an e-mail), from a table it reads with a service token.
 *
 * The rows are made by chat_notify_sweep() (sql/004_live_state.sql),
 * which the first worker runs once a second with its bus position: every
 * event at or below it is final (committed, or never to be), so the sweep
 * moves its watermark past nothing that could still commit.  The sweep
 * and the watermark are one transaction and the rows are unique per
 * (recipient, message): a worker killed mid-sweep or a PostgreSQL restart
 * cannot make a row twice or skip one.  (Two nginx instances on one
 * database are not supported: README, "One nginx per database".)
 */


#include "ngx_chat_module.h"
#include "ngx_chat_db.h"
#include "ngx_chat_store.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_notify.h"


#define NGX_CHAT_NOTIFY_TICK  1000


typedef struct {
    ngx_event_t                tick;
    ngx_chat_query_t          *query;            /* in flight */
    uint64_t                   made;
    /* nginx's timer debug log reads ev->data as a connection */
    ngx_connection_t           ident;
} ngx_chat_notify_t;


static ngx_chat_notify_t  ngx_chat_notify;


static void ngx_chat_notify_tick(ngx_event_t *ev);
static void ngx_chat_notify_done(ngx_chat_query_t *q, PGresult *res,
    ngx_int_t rc);


ngx_int_t
ngx_chat_notify_init_process(ngx_cycle_t *cycle)
{
    ngx_chat_notify_t  *nt;

    nt = &ngx_chat_notify;

    /* one sweeper per nginx; the SQL side locks against any other */
    if (!ngx_chat_worker.cmcf->notify || ngx_chat_worker.slot != 0) {
        return NGX_OK;
    }

    nt->tick.handler = ngx_chat_notify_tick;
    nt->tick.log = cycle->log;
    nt->ident.fd = (ngx_socket_t) -1;
    nt->tick.data = &nt->ident;
    nt->tick.cancelable = 1;

    ngx_add_timer(&nt->tick, NGX_CHAT_NOTIFY_TICK);

    return NGX_OK;
}


void
ngx_chat_notify_exit_process(void)
{
    ngx_chat_notify_t  *nt;

    nt = &ngx_chat_notify;

    if (nt->tick.timer_set) {
        ngx_del_timer(&nt->tick);
    }

    if (nt->query) {
        /* the db layer still owns it: its handler frees it */
        nt->query->data = NULL;
        nt->query = NULL;
    }
}


static void
ngx_chat_notify_tick(ngx_event_t *ev)
{
    u_char                *p;
    ngx_chat_query_t      *q;
    ngx_chat_notify_t     *nt;
    ngx_chat_main_conf_t  *cmcf;

    nt = &ngx_chat_notify;
    cmcf = ngx_chat_worker.cmcf;

    if (ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }

    ngx_add_timer(&nt->tick, NGX_CHAT_NOTIFY_TICK);

    if (nt->query || !ngx_chat_db_ready() || !ngx_chat_bus_started()
        || ngx_chat_bus_position() == 0)
    {
        return;
    }

    q = ngx_chat_query_alloc(NGX_CHAT_STMT_NOTIFY_SWEEP,
                             3 * (NGX_INT64_LEN + 1));
    if (q == NULL) {
        return;
    }

    p = (u_char *) &q[1];

    q->params[0] = (char *) p;
    p = ngx_sprintf(p, "%uL", ngx_chat_bus_position());
    *p++ = '\0';

    q->params[1] = (char *) p;
    p = ngx_sprintf(p, "%M", cmcf->notify_delay);
    *p++ = '\0';

    q->params[2] = (char *) p;
    p = ngx_sprintf(p, "%T", cmcf->notify_retention);
    *p++ = '\0';

    q->handler = ngx_chat_notify_done;
    q->data = nt;

    if (ngx_chat_db_query(q) != NGX_OK) {
        ngx_chat_query_free(q);
        return;
    }

    nt->query = q;
}


static void
ngx_chat_notify_done(ngx_chat_query_t *q, PGresult *res, ngx_int_t rc)
{
    ngx_int_t           n;
    ngx_chat_notify_t  *nt;

    nt = q->data;
    ngx_chat_query_free(q);

    if (nt == NULL) {
        return;
    }

    nt->query = NULL;

    if (rc != NGX_OK) {
        /* the next tick sweeps again from the same watermark */
        return;
    }

    if (PQntuples(res) == 1) {
        n = ngx_atoi((u_char *) PQgetvalue(res, 0, 0),
                     PQgetlength(res, 0, 0));

        if (n > 0) {
            nt->made += n;
            ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_chat_worker.log, 0,
                           "chat notify: %i notifications", n);
        }
    }
}
