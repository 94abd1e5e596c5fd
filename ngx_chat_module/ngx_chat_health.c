/*
 * Copyright (C) ngx_chat_module authors
 */


/*
 * /chat/health and /chat/ready, for load balancers and orchestrators.
 *
 * health says the worker that took the request runs its event loop: it
 * needs nothing else, so a store outage never makes an orchestrator kill
 * healthy workers.  ready says this worker can serve chat now: its
 * PostgreSQL pool has a live connection, the schema is current, the bus
 * reads the store's order of events, and the shared zone has room.  Both
 * read only this worker's state and the zone: no query, no lock, so a
 * probe costs nothing and cannot queue behind chat traffic.
 */


#include "ngx_chat_module.h"
#include "ngx_chat_api.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_db.h"
#include "ngx_chat_health.h"


/* a zone with fewer free pages than this is reported exhausted */
#define NGX_CHAT_HEALTH_MIN_FREE_PAGES  16


static ngx_int_t ngx_chat_health_send(ngx_http_request_t *r,
    ngx_uint_t status, u_char *data, size_t len);


ngx_int_t
ngx_chat_health_handler(ngx_http_request_t *r, ngx_uint_t ready)
{
    u_char           *p, *last;
    size_t            zone_size, zone_free;
    uint64_t          position, known;
    ngx_uint_t        store_ok, schema_ok, bus_ok, zone_ok, all_ok;
    ngx_uint_t        conns, busy;
    ngx_slab_pool_t  *shpool;
    u_char            buf[640];

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_ALLOWED, "bad_request",
                                   "GET or HEAD only", 0);
    }

    last = buf + sizeof(buf);

    if (!ready) {
        p = ngx_snprintf(buf, last - buf, "{\"status\":\"ok\",\"pid\":%P}",
                         ngx_pid);

        return ngx_chat_health_send(r, NGX_HTTP_OK, buf, p - buf);
    }

    if (!ngx_chat_worker.ready || ngx_chat_worker.cmcf == NULL
        || ngx_chat_worker.cmcf->shm_zone == NULL)
    {
        return ngx_chat_http_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                   "unavailable", "the worker is starting",
                                   1000);
    }

    conns = ngx_chat_db_alive_count();
    busy = ngx_chat_db_busy();
    schema_ok = !ngx_chat_db_schema_behind();
    store_ok = ngx_chat_db_ready();

    bus_ok = ngx_chat_bus_started();
    position = ngx_chat_bus_position();
    known = bus_ok ? ngx_chat_bus_known() : 0;

    shpool = ngx_chat_worker.shpool;
    zone_size = ngx_chat_worker.cmcf->shm_zone->shm.size;

    /* a word read without the zone's mutex: a gauge, not an account */
    zone_free = shpool ? *(volatile ngx_uint_t *) &shpool->pfree
                         << ngx_pagesize_shift
                       : 0;
    zone_ok = shpool != NULL
              && zone_free >= ((size_t) NGX_CHAT_HEALTH_MIN_FREE_PAGES
                               << ngx_pagesize_shift);

    all_ok = store_ok && schema_ok && bus_ok && zone_ok;

    p = ngx_snprintf(buf, last - buf,
                     "{\"ready\":%s,\"pid\":%P,\"checks\":{"
                     "\"store\":{\"ok\":%s,\"connections\":%ui,"
                     "\"busy\":%ui,\"retry_after_ms\":%M},"
                     "\"schema\":{\"ok\":%s,\"version\":%d},"
                     "\"bus\":{\"ok\":%s,\"position\":%uL,\"lag\":%uL},"
                     "\"zone\":{\"ok\":%s,\"size\":%uz,\"free\":%uz}}}",
                     all_ok ? "true" : "false", ngx_pid,
                     store_ok ? "true" : "false", conns, busy,
                     store_ok ? (ngx_msec_t) 0 : ngx_chat_db_retry_after(),
                     schema_ok ? "true" : "false", NGX_CHAT_SCHEMA_VERSION,
                     bus_ok ? "true" : "false", position,
                     known > position ? known - position : (uint64_t) 0,
                     zone_ok ? "true" : "false", zone_size, zone_free);

    if (!all_ok) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "chat: not ready: store %ui, schema %ui, bus %ui, "
                      "zone %ui", store_ok, schema_ok, bus_ok, zone_ok);
    }

    return ngx_chat_health_send(r, all_ok ? NGX_HTTP_OK
                                          : NGX_HTTP_SERVICE_UNAVAILABLE,
                                buf, p - buf);
}


static ngx_int_t
ngx_chat_health_send(ngx_http_request_t *r, ngx_uint_t status, u_char *data,
    size_t len)
{
    ngx_table_elt_t  *h;

    static ngx_str_t  type = ngx_string("application/json");

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Cache-Control");
    ngx_str_set(&h->value, "no-store");

    return ngx_chat_http_send(r, status, &type, type.len, data, len);
}
