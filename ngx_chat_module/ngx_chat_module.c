
/*
 * Copyright (C) ngx_chat_module authors
 */


#include "ngx_chat_module.h"
#include "ngx_chat_auth.h"
#include "ngx_chat_db.h"
#include "ngx_chat_bus.h"
#include "ngx_chat_live.h"
#include "ngx_chat_receipts.h"
#include "ngx_chat_notify.h"
#include "ngx_chat_ws.h"
#include "ngx_chat_stream.h"
#include "ngx_chat_api.h"
#include "ngx_chat_limit.h"
#include "ngx_chat_attach.h"
#include "ngx_chat_html.h"
#include "ngx_chat_health.h"
#include "ngx_chat_metrics.h"


static ngx_int_t ngx_chat_handler(ngx_http_request_t *r);
static void *ngx_chat_create_main_conf(ngx_conf_t *cf);
static char *ngx_chat_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_chat_create_loc_conf(ngx_conf_t *cf);
static char *ngx_chat_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_chat(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
static char *ngx_chat_jwt_alg(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_chat_jwt_key(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_chat_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_chat_init_module(ngx_cycle_t *cycle);
static ngx_int_t ngx_chat_init_process(ngx_cycle_t *cycle);
static void ngx_chat_exit_process(ngx_cycle_t *cycle);


ngx_chat_worker_t  ngx_chat_worker;


static ngx_conf_num_bounds_t  ngx_chat_pool_bounds = {
    ngx_conf_check_num_bounds, 1, 64
};

static ngx_conf_num_bounds_t  ngx_chat_batch_bounds = {
    ngx_conf_check_num_bounds, 1, 4096
};

static ngx_conf_num_bounds_t  ngx_chat_slots_bounds = {
    ngx_conf_check_num_bounds, 1024, 16777216
};

static ngx_conf_num_bounds_t  ngx_chat_chunk_bounds = {
    ngx_conf_check_num_bounds, 512, 1073741824
};


static ngx_command_t  ngx_chat_commands[] = {

    { ngx_string("chat"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_chat,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_db"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_chat_db_conf,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_db_pool_size"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, db_pool_size),
      &ngx_chat_pool_bounds },

    { ngx_string("chat_db_queue_size"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, db_queue_size),
      NULL },

    { ngx_string("chat_db_batch_size"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, db_batch_size),
      &ngx_chat_batch_bounds },

    { ngx_string("chat_db_connect_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, db_connect_timeout),
      NULL },

    { ngx_string("chat_db_statement_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, db_statement_timeout),
      NULL },

    { ngx_string("chat_db_retry_max"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, db_retry_max),
      NULL },

    { ngx_string("chat_jwt_alg"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_chat_jwt_alg,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_jwt_key"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE12,
      ngx_chat_jwt_key,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_jwt_issuer"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, jwt_issuer),
      NULL },

    { ngx_string("chat_jwt_audience"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, jwt_audience),
      NULL },

    { ngx_string("chat_jwt_leeway"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, jwt_leeway),
      NULL },

    { ngx_string("chat_ticket_ttl"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, ticket_ttl),
      NULL },

    { ngx_string("chat_allow_origin"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_conf_set_str_array_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, origins),
      NULL },

    { ngx_string("chat_shm_size"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, shm_size),
      NULL },

    { ngx_string("chat_bus_slots"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, bus_slots),
      &ngx_chat_slots_bounds },

    { ngx_string("chat_gseq_chunk"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, gseq_chunk),
      &ngx_chat_chunk_bounds },

    { ngx_string("chat_bus_hole_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, bus_hole_timeout),
      NULL },

    { ngx_string("chat_max_message_size"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, max_message),
      NULL },

    { ngx_string("chat_max_queue"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, max_queue),
      NULL },

    { ngx_string("chat_ping_interval"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, ping_interval),
      NULL },

    { ngx_string("chat_idle_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, idle_timeout),
      NULL },

    { ngx_string("chat_auth_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, auth_timeout),
      NULL },

    { ngx_string("chat_send_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, send_timeout),
      NULL },

    { ngx_string("chat_sse_heartbeat"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, sse_heartbeat),
      NULL },

    { ngx_string("chat_sse_retry"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, sse_retry),
      NULL },

    { ngx_string("chat_poll_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, poll_timeout),
      NULL },

    { ngx_string("chat_search_language"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, search_language),
      NULL },

    { ngx_string("chat_cors_origins"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_conf_set_str_array_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, cors_origins),
      NULL },

    { ngx_string("chat_cors_credentials"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, cors_credentials),
      NULL },

    { ngx_string("chat_attachments"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, attach_dir),
      NULL },

    { ngx_string("chat_attachment_max_size"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_off_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, attach_max_size),
      NULL },

    { ngx_string("chat_attachment_types"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_chat_attach_types,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_attachment_unsent_ttl"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, attach_unsent),
      NULL },

    { ngx_string("chat_attachment_location"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, attach_location),
      NULL },

    { ngx_string("chat_edit_window"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, edit_window),
      NULL },

    { ngx_string("chat_catchup_page"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, catchup_page),
      &ngx_chat_batch_bounds },

    { ngx_string("chat_max_rewind"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, max_rewind),
      NULL },

    { ngx_string("chat_max_connections_per_address"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, max_connections_per_address),
      NULL },

    { ngx_string("chat_rate_limit"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE3|NGX_CONF_TAKE4,
      ngx_chat_rate_conf,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("chat_max_unauthenticated"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, max_unauthenticated),
      NULL },

    { ngx_string("chat_typing_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, typing_timeout),
      NULL },

    { ngx_string("chat_presence_grace"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, presence_grace),
      NULL },

    { ngx_string("chat_presence_max_members"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, presence_max_members),
      NULL },

    { ngx_string("chat_live_slots"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, live_slots),
      NULL },

    { ngx_string("chat_receipt_flush"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, receipt_flush),
      NULL },

    { ngx_string("chat_receipt_max_members"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, receipt_max_members),
      NULL },

    { ngx_string("chat_notify"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, notify),
      NULL },

    { ngx_string("chat_notify_delay"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, notify_delay),
      NULL },

    { ngx_string("chat_notify_retention"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, notify_retention),
      NULL },

    { ngx_string("chat_max_connections_per_user"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_chat_main_conf_t, max_connections),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_chat_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_chat_postconfiguration,            /* postconfiguration */

    ngx_chat_create_main_conf,             /* create main configuration */
    ngx_chat_init_main_conf,               /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_chat_create_loc_conf,              /* create location configuration */
    ngx_chat_merge_loc_conf                /* merge location configuration */
};


ngx_module_t  ngx_chat_module = {
    NGX_MODULE_V1,
    &ngx_chat_module_ctx,                  /* module context */
    ngx_chat_commands,                     /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    ngx_chat_init_module,                  /* init module */
    ngx_chat_init_process,                 /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_chat_exit_process,                 /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_str_t  ngx_chat_zone_name = ngx_string("ngx_chat_module");


#if (NGX_PCRE)
#define ngx_chat_location_regex(clcf)  ((clcf)->regex != NULL)
#else
#define ngx_chat_location_regex(clcf)  0
#endif


static ngx_int_t
ngx_chat_single_endpoint(ngx_str_t *path)
{
    ngx_uint_t  i;

    static ngx_str_t  names[] = {
        ngx_string("ws"), ngx_string("events"), ngx_string("poll"),
        ngx_string("health"), ngx_string("ready"), ngx_string("metrics")
    };

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (path->len == names[i].len
            && ngx_strncmp(path->data, names[i].data, path->len) == 0)
        {
            return 1;
        }
    }

    return 0;
}


static ngx_int_t
ngx_chat_handler(ngx_http_request_t *r)
{
    ngx_int_t                  rc;
    ngx_str_t                  path;
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (!ngx_chat_location_regex(clcf) && r->uri.len < clcf->name.len) {
        return ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                                   "no such endpoint", 0);
    }

    /* a preflight is answered here, before any authentication */
    rc = ngx_chat_cors(r);

    if (rc == NGX_DONE) {
        return ngx_chat_cors_preflight(r);
    }

    if (rc == NGX_ERROR) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (clcf->exact_match || ngx_chat_location_regex(clcf)) {
        /*
         * "location = /chat/ready { chat; allow ...; }": an endpoint of one
         * segment (ws, events, poll, health, ready, metrics) in a location
         * of its own, to give it its own access rules; the API and the
         * pages need the prefix location
         */
        path.data = r->uri.data + r->uri.len;

        while (path.data > r->uri.data && path.data[-1] != '/') {
            path.data--;
        }

        path.len = r->uri.data + r->uri.len - path.data;

        if (!ngx_chat_single_endpoint(&path)) {
            return ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                                       "no such endpoint here", 0);
        }

    } else {
        path.data = r->uri.data + clcf->name.len;
        path.len = r->uri.len - clcf->name.len;

        if (path.len && path.data[0] == '/') {

            /*
             * "location /chat" leaves the slash; after "location /chat/"
             * it is a second one: "/chat//metrics" (merge_slashes off)
             * must not reach what "location = /chat/metrics" guards
             */
            if (clcf->name.len && clcf->name.data[clcf->name.len - 1] == '/') {
                return ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                                           "no such endpoint", 0);
            }

            path.data++;
            path.len--;
        }
    }

    if (path.len == 2 && ngx_strncmp(path.data, "ws", 2) == 0) {
        return ngx_chat_ws_handler(r);
    }

    if (path.len == 6 && ngx_strncmp(path.data, "health", 6) == 0) {
        return ngx_chat_health_handler(r, 0);
    }

    if (path.len == 5 && ngx_strncmp(path.data, "ready", 5) == 0) {
        return ngx_chat_health_handler(r, 1);
    }

    if (path.len == 7 && ngx_strncmp(path.data, "metrics", 7) == 0) {
        return ngx_chat_metrics_handler(r);
    }

    if (path.len == 6 && ngx_strncmp(path.data, "events", 6) == 0) {
        return ngx_chat_stream_handler(r, NGX_CHAT_STREAM_SSE);
    }

    if (path.len == 4 && ngx_strncmp(path.data, "poll", 4) == 0) {
        return ngx_chat_stream_handler(r, NGX_CHAT_STREAM_POLL);
    }

    if (path.len >= 3 && ngx_strncmp(path.data, "api", 3) == 0
        && (path.len == 3 || path.data[3] == '/'))
    {
        path.data += 3;
        path.len -= 3;

        return ngx_chat_api_handler(r, &path);
    }

    if (path.len >= 4 && ngx_strncmp(path.data, "html", 4) == 0
        && (path.len == 4 || path.data[4] == '/'))
    {
        path.data += 4;
        path.len -= 4;

        return ngx_chat_html_handler(r, &path);
    }

    return ngx_chat_http_error(r, NGX_HTTP_NOT_FOUND, "not_found",
                               "no such endpoint", 0);
}


static void *
ngx_chat_create_main_conf(ngx_conf_t *cf)
{
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_pcalloc(cf->pool, sizeof(ngx_chat_main_conf_t));
    if (cmcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     cmcf->db_conninfo = { 0, NULL };
     *     cmcf->jwt_keys = NULL;
     *     cmcf->jwt_kids = 0;
     *     cmcf->jwt_issuer = { 0, NULL };
     *     cmcf->jwt_audience = { 0, NULL };
     *     cmcf->shm_zone = NULL;
     *     cmcf->enabled = 0;
     */

    cmcf->db_pool_size = NGX_CONF_UNSET_UINT;
    cmcf->db_queue_size = NGX_CONF_UNSET_UINT;
    cmcf->db_batch_size = NGX_CONF_UNSET_UINT;
    cmcf->db_connect_timeout = NGX_CONF_UNSET_MSEC;
    cmcf->db_statement_timeout = NGX_CONF_UNSET_MSEC;
    cmcf->db_retry_max = NGX_CONF_UNSET_MSEC;
    cmcf->jwt_alg = NGX_CONF_UNSET_UINT;
    cmcf->jwt_leeway = NGX_CONF_UNSET;
    cmcf->ticket_ttl = NGX_CONF_UNSET;
    cmcf->origins = NGX_CONF_UNSET_PTR;
    cmcf->shm_size = NGX_CONF_UNSET_SIZE;
    cmcf->bus_slots = NGX_CONF_UNSET_UINT;
    cmcf->bus_hole_timeout = NGX_CONF_UNSET_MSEC;
    cmcf->gseq_chunk = NGX_CONF_UNSET_UINT;
    cmcf->max_message = NGX_CONF_UNSET_SIZE;
    cmcf->max_queue = NGX_CONF_UNSET_SIZE;
    cmcf->ping_interval = NGX_CONF_UNSET_MSEC;
    cmcf->idle_timeout = NGX_CONF_UNSET_MSEC;
    cmcf->auth_timeout = NGX_CONF_UNSET_MSEC;
    cmcf->send_timeout = NGX_CONF_UNSET_MSEC;
    cmcf->catchup_page = NGX_CONF_UNSET_UINT;
    cmcf->max_rewind = NGX_CONF_UNSET_UINT;
    cmcf->max_connections_per_address = NGX_CONF_UNSET_UINT;
    cmcf->max_unauthenticated = NGX_CONF_UNSET_UINT;
    cmcf->max_connections = NGX_CONF_UNSET_UINT;
    cmcf->typing_timeout = NGX_CONF_UNSET_MSEC;
    cmcf->presence_grace = NGX_CONF_UNSET_MSEC;
    cmcf->presence_max_members = NGX_CONF_UNSET_UINT;
    cmcf->live_slots = NGX_CONF_UNSET_UINT;
    cmcf->receipt_flush = NGX_CONF_UNSET_MSEC;
    cmcf->receipt_max_members = NGX_CONF_UNSET_UINT;
    cmcf->notify = NGX_CONF_UNSET;
    cmcf->notify_delay = NGX_CONF_UNSET_MSEC;
    cmcf->notify_retention = NGX_CONF_UNSET;
    cmcf->sse_heartbeat = NGX_CONF_UNSET_MSEC;
    cmcf->sse_retry = NGX_CONF_UNSET_MSEC;
    cmcf->poll_timeout = NGX_CONF_UNSET_MSEC;
    cmcf->edit_window = NGX_CONF_UNSET_MSEC;
    cmcf->cors_origins = NGX_CONF_UNSET_PTR;
    cmcf->cors_credentials = NGX_CONF_UNSET;
    cmcf->attach_max_size = NGX_CONF_UNSET;
    cmcf->attach_types = NGX_CONF_UNSET_PTR;
    cmcf->attach_unsent = NGX_CONF_UNSET;

    return cmcf;
}


static char *
ngx_chat_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_chat_main_conf_t *cmcf = conf;

    ngx_str_t             *o;
    ngx_uint_t             i;

    ngx_conf_init_uint_value(cmcf->db_pool_size, 4);
    ngx_conf_init_uint_value(cmcf->db_queue_size, 4096);
    ngx_conf_init_uint_value(cmcf->db_batch_size, 256);
    ngx_conf_init_msec_value(cmcf->db_connect_timeout, 5000);
    ngx_conf_init_msec_value(cmcf->db_statement_timeout, 30000);
    ngx_conf_init_msec_value(cmcf->db_retry_max, 5000);
    ngx_conf_init_uint_value(cmcf->jwt_alg, NGX_CHAT_JWT_HS256);
    ngx_conf_init_value(cmcf->jwt_leeway, 10);
    ngx_conf_init_value(cmcf->ticket_ttl, 30);
    ngx_conf_init_ptr_value(cmcf->origins, NULL);
    ngx_conf_init_size_value(cmcf->shm_size, 32 * 1024 * 1024);
    ngx_conf_init_uint_value(cmcf->bus_slots, 65536);
    ngx_conf_init_msec_value(cmcf->bus_hole_timeout, 50);
    ngx_conf_init_uint_value(cmcf->gseq_chunk, 65536);

    /* a send batch and a receipt flush take their positions from one */
    if (cmcf->gseq_chunk < 2 * cmcf->db_batch_size
        || cmcf->gseq_chunk < 256)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_gseq_chunk must be at least 256 and twice "
                           "chat_db_batch_size");
        return NGX_CONF_ERROR;
    }
    ngx_conf_init_size_value(cmcf->max_message, 64 * 1024);
    ngx_conf_init_size_value(cmcf->max_queue, 1024 * 1024);
    ngx_conf_init_msec_value(cmcf->ping_interval, 30000);
    ngx_conf_init_msec_value(cmcf->idle_timeout, 75000);
    ngx_conf_init_msec_value(cmcf->auth_timeout, 10000);
    ngx_conf_init_msec_value(cmcf->send_timeout, 30000);
    ngx_conf_init_uint_value(cmcf->catchup_page, 256);
    ngx_conf_init_uint_value(cmcf->max_rewind, 100000000);
    ngx_conf_init_uint_value(cmcf->max_connections_per_address, 1024);
    ngx_conf_init_uint_value(cmcf->max_unauthenticated, 4096);
    ngx_conf_init_uint_value(cmcf->max_connections, 32);
    ngx_conf_init_msec_value(cmcf->typing_timeout, 10000);
    ngx_conf_init_msec_value(cmcf->presence_grace, 5000);
    ngx_conf_init_uint_value(cmcf->presence_max_members, 100);
    ngx_conf_init_uint_value(cmcf->live_slots, 4096);
    ngx_conf_init_msec_value(cmcf->receipt_flush, 200);
    ngx_conf_init_uint_value(cmcf->receipt_max_members, 100);
    ngx_conf_init_value(cmcf->notify, 1);
    ngx_conf_init_msec_value(cmcf->notify_delay, 10000);
    ngx_conf_init_value(cmcf->notify_retention, 7 * 86400);

    ngx_conf_init_msec_value(cmcf->sse_heartbeat, 15000);
    ngx_conf_init_msec_value(cmcf->sse_retry, 2000);
    ngx_conf_init_msec_value(cmcf->poll_timeout, 30000);
    ngx_conf_init_msec_value(cmcf->edit_window, 0);
    if (cmcf->search_language.data == NULL) {
        ngx_str_set(&cmcf->search_language, "simple");
    }

    for (i = 0; i < cmcf->search_language.len; i++) {
        if (!((cmcf->search_language.data[i] >= 'a'
               && cmcf->search_language.data[i] <= 'z')
              || cmcf->search_language.data[i] == '_'))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "chat_search_language must name a text "
                               "search configuration, like \"simple\"");
            return NGX_CONF_ERROR;
        }
    }

    ngx_conf_init_ptr_value(cmcf->cors_origins, cmcf->origins);
    ngx_conf_init_value(cmcf->cors_credentials, 0);

    if (cmcf->cors_credentials && cmcf->cors_origins) {
        o = cmcf->cors_origins->elts;

        for (i = 0; i < cmcf->cors_origins->nelts; i++) {
            if (o[i].len == 1 && o[i].data[0] == '*') {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "chat_cors_credentials on needs a list "
                                   "of origins, not \"*\"");
                return NGX_CONF_ERROR;
            }
        }
    }

    if (ngx_chat_attach_conf(cf, cmcf) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    /* idle proxies and NATs cut a silent connection after about 60 s */
    if (cmcf->sse_heartbeat < 1000 || cmcf->sse_heartbeat > 30000) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_sse_heartbeat must be 1s to 30s");
        return NGX_CONF_ERROR;
    }

    if (cmcf->poll_timeout > 300000) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_poll_timeout must be at most 300s");
        return NGX_CONF_ERROR;
    }

    if (cmcf->receipt_flush == 0) {
        cmcf->receipt_flush = 1;
    }

    if (cmcf->live_slots < 16 || cmcf->live_slots > 1024 * 1024) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_live_slots must be 16 to 1048576");
        return NGX_CONF_ERROR;
    }

    if (cmcf->typing_timeout < 1000) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_typing_timeout must be at least 1s");
        return NGX_CONF_ERROR;
    }

    if (cmcf->max_message < 1024) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_max_message_size must be at least 1k");
        return NGX_CONF_ERROR;
    }

    /* a queue must hold at least one full message and its framing */
    if (cmcf->max_queue < 2 * cmcf->max_message) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_max_queue must be at least twice "
                           "chat_max_message_size");
        return NGX_CONF_ERROR;
    }

    /* rate buckets take at most a sixteenth of the zone */
    cmcf->rate_entries = ngx_max(cmcf->shm_size / 16 / 256, 256);

    if (cmcf->shm_size < 8 * ngx_pagesize + 64 * 1024
        + sizeof(ngx_chat_metrics_sh_t)
        + cmcf->bus_slots * sizeof(ngx_chat_slot_t)
        + cmcf->live_slots * 3 * sizeof(uint64_t))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_shm_size is too small for %ui bus slots",
                           cmcf->bus_slots);
        return NGX_CONF_ERROR;
    }

    /* an empty value would be a check that no token can pass */

    if (cmcf->jwt_issuer.data != NULL && cmcf->jwt_issuer.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_jwt_issuer must not be empty");
        return NGX_CONF_ERROR;
    }

    if (cmcf->jwt_audience.data != NULL && cmcf->jwt_audience.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_jwt_audience must not be empty");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_chat_create_loc_conf(ngx_conf_t *cf)
{
    ngx_chat_loc_conf_t  *clcf;

    clcf = ngx_pcalloc(cf->pool, sizeof(ngx_chat_loc_conf_t));
    if (clcf == NULL) {
        return NULL;
    }

    clcf->enable = NGX_CONF_UNSET;

    return clcf;
}


static char *
ngx_chat_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_chat_loc_conf_t *prev = parent;
    ngx_chat_loc_conf_t *conf = child;

    size_t                     size;
    ngx_chat_main_conf_t      *cmcf;
    ngx_http_core_loc_conf_t  *clcf;

    ngx_conf_merge_value(conf->enable, prev->enable, 0);

    if (!conf->enable) {
        return NGX_CONF_OK;
    }

    /*
     * REST bodies are read into memory: nginx would write a body larger
     * than its buffer to a temporary file, with blocking file I/O.  The
     * buffer holds a body of chat_max_message_size with room for chunked
     * framing; the api's body filter refuses anything larger.  nginx's own
     * client_max_body_size is off here: the api enforces the limit and
     * answers in JSON, nginx would answer with an HTML page.
     */
    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_chat_module);
    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    size = cmcf->max_message + cmcf->max_message / 8;

    if (clcf->client_body_buffer_size < size) {
        clcf->client_body_buffer_size = size;
    }

    clcf->client_max_body_size = 0;

    return NGX_CONF_OK;
}


static char *
ngx_chat(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_loc_conf_t *lcf = conf;

    ngx_chat_main_conf_t      *cmcf;
    ngx_http_core_loc_conf_t  *clcf;

    if (lcf->enable != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    lcf->enable = 1;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_chat_handler;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_chat_module);
    cmcf->enabled = 1;

    return NGX_CONF_OK;
}


static char *
ngx_chat_jwt_alg(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_main_conf_t *cmcf = conf;

    ngx_str_t  *value;

    if (cmcf->jwt_alg != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "HS256") == 0) {
        cmcf->jwt_alg = NGX_CHAT_JWT_HS256;

    } else if (ngx_strcmp(value[1].data, "RS256") == 0) {
        cmcf->jwt_alg = NGX_CHAT_JWT_RS256;

    } else if (ngx_strcmp(value[1].data, "ES256") == 0) {
        cmcf->jwt_alg = NGX_CHAT_JWT_ES256;

    } else {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid chat_jwt_alg \"%V\", "
                           "it must be \"HS256\", \"RS256\" or \"ES256\"",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* chat_jwt_key file [kid=name]; the file is read by ngx_chat_auth.c */

static char *
ngx_chat_jwt_key(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_chat_main_conf_t *cmcf = conf;

    ngx_str_t           *value, kid;
    ngx_uint_t           i;
    ngx_chat_jwt_key_t  *key;

    value = cf->args->elts;

    ngx_str_null(&kid);

    if (cf->args->nelts == 3) {

        if (value[2].len <= sizeof("kid=") - 1
            || ngx_strncmp(value[2].data, "kid=", sizeof("kid=") - 1) != 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\", "
                               "it must be \"kid=<name>\"", &value[2]);
            return NGX_CONF_ERROR;
        }

        kid.data = value[2].data + sizeof("kid=") - 1;
        kid.len = value[2].len - (sizeof("kid=") - 1);
    }

    if (cmcf->jwt_keys == NULL) {
        cmcf->jwt_keys = ngx_array_create(cf->pool, 2,
                                          sizeof(ngx_chat_jwt_key_t));
        if (cmcf->jwt_keys == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    /* a kid must name one key, or a token could pick between two */

    key = cmcf->jwt_keys->elts;

    for (i = 0; kid.len && i < cmcf->jwt_keys->nelts; i++) {

        if (key[i].kid.len == kid.len
            && ngx_strncmp(key[i].kid.data, kid.data, kid.len) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "duplicate chat_jwt_key kid \"%V\"", &kid);
            return NGX_CONF_ERROR;
        }
    }

    key = ngx_array_push(cmcf->jwt_keys);
    if (key == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(key, sizeof(ngx_chat_jwt_key_t));

    key->file = value[1];
    key->kid = kid;

    if (kid.len) {
        cmcf->jwt_kids++;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_chat_postconfiguration(ngx_conf_t *cf)
{
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_chat_module);

    if (!cmcf->enabled) {
        return NGX_OK;
    }

    if (cmcf->db_conninfo.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"chat\" requires \"chat_db\" in the http block");
        return NGX_ERROR;
    }

    if (cmcf->jwt_keys == NULL || cmcf->jwt_keys->nelts == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"chat\" requires \"chat_jwt_key\" in the "
                           "http block");
        return NGX_ERROR;
    }

    if (ngx_chat_auth_init_conf(cf, cmcf) != NGX_CONF_OK) {
        return NGX_ERROR;
    }

    if (ngx_chat_api_init(cf) != NGX_OK) {
        return NGX_ERROR;
    }

    cmcf->shm_zone = ngx_shared_memory_add(cf, &ngx_chat_zone_name,
                                           cmcf->shm_size, &ngx_chat_module);
    if (cmcf->shm_zone == NULL) {
        return NGX_ERROR;
    }

    cmcf->shm_zone->init = ngx_chat_bus_init_zone;
    cmcf->shm_zone->data = cmcf;

    return NGX_OK;
}


static ngx_int_t
ngx_chat_init_module(ngx_cycle_t *cycle)
{
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_chat_module);

    if (cmcf == NULL || !cmcf->enabled) {
        return NGX_OK;
    }

    return ngx_chat_bus_init_module(cycle);
}


static ngx_int_t
ngx_chat_init_process(ngx_cycle_t *cycle)
{
    ngx_chat_main_conf_t  *cmcf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    cmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_chat_module);

    if (cmcf == NULL || !cmcf->enabled) {
        return NGX_OK;
    }

    ngx_chat_worker.cmcf = cmcf;
    ngx_chat_worker.cycle = cycle;
    ngx_chat_worker.log = cycle->log;
    ngx_chat_worker.slot = (ngx_process == NGX_PROCESS_WORKER)
                           ? ngx_worker : 0;

    if (ngx_chat_bus_init_process(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_chat_live_init_process(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_chat_receipts_init_process(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_chat_notify_init_process(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_chat_attach_init_process(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_chat_db_init_process(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_chat_metrics_init_process(cycle) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_chat_worker.ready = 1;

    return NGX_OK;
}


static void
ngx_chat_exit_process(ngx_cycle_t *cycle)
{
    if (!ngx_chat_worker.ready) {
        return;
    }

    ngx_chat_worker.ready = 0;

    ngx_chat_metrics_exit_process();
    ngx_chat_db_exit_process();
    ngx_chat_notify_exit_process();
    ngx_chat_attach_exit_process();
    ngx_chat_receipts_exit_process();
    ngx_chat_live_exit_process();
    ngx_chat_bus_exit_process();
}
