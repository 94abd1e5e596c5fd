
/*
 * Copyright (C) ngx_chat_module authors
 *
 * The types that every file of the module shares.  Each concern declares
 * its interface in a header of its own, next to its .c file; a .c file
 * includes this header and then exactly the headers of the concerns it
 * uses, so its includes say what it depends on.  A header includes only
 * what its own declarations need: ngx_chat_session.h and ngx_chat_bus.h
 * include ngx_chat_transport.h (ngx_chat_event_t), ngx_chat_db.h brings
 * libpq, ngx_chat_json.h and ngx_chat_store.h bring jansson.
 *
 *   ngx_chat_module.h      this header: nginx includes, schema version,
 *                          ids, roles, JWT algorithms, close codes, main
 *                          and location configuration, identity, the
 *                          shared zone (tickets, bus ring), the per-worker
 *                          state; forward typedefs of the session,
 *                          transport and query structs
 *   ngx_chat_module.c      directives, configuration, zone, process hooks,
 *                          location handler (routes to ws / api)
 *   ngx_chat_auth.[ch]     JWT verification (HS256/RS256/ES256), Origin
 *                          allow-list, tickets
 *   ngx_chat_db.[ch]       per-worker pool of non-blocking libpq
 *                          connections; the query and statement types
 *   ngx_chat_store.[ch]    the SQL statements (NGX_CHAT_STMT_*) and the
 *                          operations built on them (batched sends, joins,
 *                          catch-up, conversations); query alloc / free
 *   ngx_chat_bus.[ch]      shared-memory event ring, doorbells between
 *                          workers, ordered local delivery; event
 *                          envelopes, cursors
 *   ngx_chat_transport.h   the transport interface: ngx_chat_event_t, the
 *                          transport struct, and the session calls a
 *                          transport makes (create, recv, drained, closed)
 *   ngx_chat_session.[ch]  one authenticated client, transport-agnostic:
 *                          requests, subscriptions, cursor, catch-up; the
 *                          session struct, deliver, resync
 *   ngx_chat_ws.[ch]       WebSocket transport (RFC 6455)
 *   ngx_chat_api.[ch]      REST API, JSON error replies
 *   ngx_chat_live.[ch]     live state: the ephemeral channel (a second
 *                          ring in the zone), typing, presence, devices
 *   ngx_chat_receipts.[ch] delivered / read positions: acks and reads
 *                          coalesced per worker, written per flush with
 *                          their receipt events
 *   ngx_chat_notify.[ch]   the notification outbox's sweep
 *   ngx_chat_html.[ch]     chat without JavaScript: pages rendered by
 *                          the module, a signed session cookie, forms
 *   ngx_chat_attach.[ch]   attachments: the upload body filter (sizes,
 *                          hash, type by content, multipart forms), the
 *                          file's place, downloads through an internal
 *                          location, the sweep
 *   ngx_chat_json.[ch]     JSON helpers, growable buffers
 *   ngx_chat_limit.[ch]    per-worker caps: connections per address,
 *                          unauthenticated sessions; rate limits (token
 *                          buckets in the zone)
 */


#ifndef _NGX_CHAT_MODULE_H_INCLUDED_
#define _NGX_CHAT_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/evp.h>


#define NGX_CHAT_SCHEMA_VERSION        8


/* a node of a tree keyed by unique integers (conversation ids), or NULL */
static ngx_inline ngx_rbtree_node_t *
ngx_chat_rbtree_lookup(ngx_rbtree_t *tree, ngx_rbtree_key_t key)
{
    ngx_rbtree_node_t  *node;

    for (node = tree->root; node != tree->sentinel; /* void */) {

        if (key == node->key) {
            return node;
        }

        node = (key < node->key) ? node->left : node->right;
    }

    return NULL;
}

#define NGX_CHAT_MAX_ID_LEN            128


/* a string node keyed by s, over a copy of s at mem (after the node) */
static ngx_inline void
ngx_chat_str_node_init(ngx_str_node_t *sn, u_char *mem, ngx_str_t *s)
{
    sn->str.data = mem;
    sn->str.len = s->len;
    ngx_memcpy(mem, s->data, s->len);
    sn->node.key = ngx_crc32_short(s->data, s->len);
}


/* "<conv>:<user>": the key of state per (conversation, user) */

#define NGX_CHAT_CONV_KEY_LEN  (NGX_INT64_LEN + 1 + NGX_CHAT_MAX_ID_LEN)

static ngx_inline void
ngx_chat_conv_key(u_char *buf, int64_t conv, ngx_str_t *user, ngx_str_t *key)
{
    u_char  *p;

    /* user ids are at most NGX_CHAT_MAX_ID_LEN (the JWT check) */
    p = ngx_sprintf(buf, "%L:", conv);
    p = ngx_cpymem(p, user->data, user->len);

    key->data = buf;
    key->len = p - buf;
}

#define NGX_CHAT_ROLE_USER             0
#define NGX_CHAT_ROLE_SERVICE          1

#define NGX_CHAT_JWT_HS256             1
#define NGX_CHAT_JWT_RS256             2
#define NGX_CHAT_JWT_ES256             3

/* WebSocket close codes used across the module (PROTOCOL.md section 4) */
#define NGX_CHAT_CLOSE_NORMAL          1000
#define NGX_CHAT_CLOSE_GOING_AWAY      1001
#define NGX_CHAT_CLOSE_PROTOCOL        1002
#define NGX_CHAT_CLOSE_UNSUPPORTED     1003
#define NGX_CHAT_CLOSE_BAD_DATA        1007
#define NGX_CHAT_CLOSE_POLICY          1008
#define NGX_CHAT_CLOSE_TOO_BIG         1009
#define NGX_CHAT_CLOSE_INTERNAL        1011
#define NGX_CHAT_CLOSE_TOKEN_EXPIRED   4001
#define NGX_CHAT_CLOSE_SLOW            4008
#define NGX_CHAT_CLOSE_REPLACED        4009
#define NGX_CHAT_CLOSE_RATE_LIMITED    4029


typedef struct ngx_chat_session_s    ngx_chat_session_t;
typedef struct ngx_chat_transport_s  ngx_chat_transport_t;
typedef struct ngx_chat_query_s      ngx_chat_query_t;
typedef struct ngx_chat_live_sh_s    ngx_chat_live_sh_t;


/*
 * Rate limits (chat_rate_limit): one token bucket per (kind, user) and
 * per (kind, client address) in the zone, shared by all workers; the
 * slab mutex is the only lock (ngx_chat_limit.c).
 */
#define NGX_CHAT_RATE_SEND      0
#define NGX_CHAT_RATE_TYPING    1
#define NGX_CHAT_RATE_CONNECT   2
#define NGX_CHAT_RATE_REST      3
#define NGX_CHAT_RATE_KINDS     4

#define NGX_CHAT_RATE_USER      0
#define NGX_CHAT_RATE_ADDRESS   1

typedef struct {
    ngx_uint_t                 rate;             /* per 1000 s; 0: off */
    ngx_uint_t                 burst;            /* x 1000 */
} ngx_chat_rate_conf_t;

typedef struct {
    ngx_rbtree_t               rbtree;
    ngx_rbtree_node_t          sentinel;
    ngx_queue_t                lru;              /* least recent last */
    ngx_uint_t                 count;
} ngx_chat_rate_sh_t;


/* one "chat_jwt_key": the file is read at configuration time */
typedef struct {
    ngx_str_t                  file;
    ngx_str_t                  kid;              /* empty: no kid */
    ngx_str_t                  secret;           /* HS256 key bytes */
    EVP_PKEY                  *pkey;             /* RS256 / ES256 */
} ngx_chat_jwt_key_t;


typedef struct {
    ngx_str_t                  db_conninfo;
    ngx_uint_t                 db_pool_size;
    ngx_uint_t                 db_queue_size;
    ngx_uint_t                 db_batch_size;
    ngx_msec_t                 db_connect_timeout;
    ngx_msec_t                 db_statement_timeout;
    ngx_msec_t                 db_retry_max;

    ngx_uint_t                 jwt_alg;
    ngx_array_t               *jwt_keys;         /* of ngx_chat_jwt_key_t */
    ngx_uint_t                 jwt_kids;         /* keys with a kid */
    ngx_str_t                  jwt_issuer;       /* iss required, if set */
    ngx_str_t                  jwt_audience;     /* in aud required, if set */
    time_t                     jwt_leeway;
    time_t                     ticket_ttl;
    ngx_array_t               *origins;          /* of ngx_str_t */

    size_t                     shm_size;
    ngx_uint_t                 bus_slots;
    ngx_msec_t                 bus_hole_timeout;
    ngx_uint_t                 gseq_chunk;
    ngx_shm_zone_t            *shm_zone;

    size_t                     max_message;      /* ws message, REST body */
    size_t                     max_queue;        /* output bytes per conn */
    ngx_msec_t                 ping_interval;
    ngx_msec_t                 idle_timeout;
    ngx_msec_t                 auth_timeout;
    ngx_msec_t                 send_timeout;
    ngx_uint_t                 catchup_page;
    ngx_uint_t                 max_rewind;       /* events; 0: any */
    ngx_uint_t                 max_connections;  /* per user per worker */
    ngx_uint_t                 max_connections_per_address;
    ngx_uint_t                 max_unauthenticated;

    ngx_msec_t                 typing_timeout;
    ngx_msec_t                 presence_grace;
    ngx_uint_t                 presence_max_members;
    ngx_uint_t                 live_slots;
    ngx_msec_t                 receipt_flush;
    ngx_uint_t                 receipt_max_members;
    ngx_flag_t                 notify;
    ngx_msec_t                 notify_delay;
    time_t                     notify_retention;

    ngx_msec_t                 sse_heartbeat;
    ngx_msec_t                 sse_retry;
    ngx_msec_t                 poll_timeout;     /* the longest hold */

    ngx_msec_t                 edit_window;      /* 0: any time */

    ngx_str_t                  search_language;  /* a text search config */

    ngx_array_t               *cors_origins;     /* of ngx_str_t */
    ngx_flag_t                 cors_credentials;
    ngx_str_t                  attach_dir;       /* empty: no uploads */
    off_t                      attach_max_size;
    ngx_array_t               *attach_types;     /* of ngx_str_t */
    time_t                     attach_unsent;
    ngx_str_t                  attach_location;  /* internal, for nginx */
    ngx_chat_rate_conf_t       rates[NGX_CHAT_RATE_KINDS][2];
    ngx_uint_t                 rate_entries;     /* buckets in the zone */

    ngx_flag_t                 enabled;          /* any "chat" location */
} ngx_chat_main_conf_t;


typedef struct {
    ngx_flag_t                 enable;
} ngx_chat_loc_conf_t;


/* who is talking: from a verified JWT or a redeemed ticket */
typedef struct {
    ngx_str_t                  user;             /* sub */
    ngx_str_t                  name;
    ngx_uint_t                 role;             /* NGX_CHAT_ROLE_* */
    time_t                     exp;              /* token expiry, seconds */
} ngx_chat_identity_t;


/*
 * Tickets live in the shared zone so that any worker may redeem a ticket
 * that another worker issued.  No function pointers of this module are
 * stored in shared memory: a dynamic module may be mapped at another
 * address after a reload, so the tree uses nginx's own
 * ngx_str_rbtree_insert_value().
 */
typedef struct {
    ngx_rbtree_t               rbtree;
    ngx_rbtree_node_t          sentinel;
    ngx_queue_t                expire;           /* oldest first */
    ngx_uint_t                 count;
    ngx_rbtree_t               users;            /* users with tickets */
    ngx_rbtree_node_t          users_sentinel;
} ngx_chat_tickets_sh_t;



/* one cached durable event in the bus ring */
typedef struct {
    uint64_t                   gseq;             /* 0: empty */
    int64_t                    conversation;
    uint32_t                   len;
    u_char                    *data;             /* event object JSON */
} ngx_chat_slot_t;


#define NGX_CHAT_MAX_WORKERS  256

typedef struct ngx_chat_metrics_sh_s  ngx_chat_metrics_sh_t;

/*
 * Positions handed out to a transaction that may still commit.  Readers
 * never pass lo - 1 while the entry is there (ngx_chat_bus.c).
 */
#define NGX_CHAT_RESV_MAX     1024

#define NGX_CHAT_RESV_INFLIGHT  1   /* its owner will say how it ended */
#define NGX_CHAT_RESV_UNKNOWN   2   /* nobody will: read the store */

typedef struct {
    uint64_t                   lo;               /* 0: a free entry */
    uint64_t                   hi;
    int64_t                    key;              /* the transaction's lock */
    ngx_pid_t                  pid;              /* owner */
    ngx_pid_t                  settler;          /* reading the store */
    ngx_msec_t                 since;
    ngx_uint_t                 state;
} ngx_chat_resv_t;


typedef struct {
    uint64_t                   published;        /* highest gseq in ring */
    uint64_t                   next;             /* next to hand out */
    uint64_t                   limit;            /* end of the chunk */
    uint64_t                   spare_lo;         /* the next chunk, or 0 */
    uint64_t                   spare_hi;
    ngx_pid_t                  raising;          /* asking for a chunk */
    ngx_msec_t                 raising_since;
    int64_t                    holder;           /* this instance's key */
    ngx_uint_t                 nresv;            /* entries in use */
    ngx_chat_resv_t            resv[NGX_CHAT_RESV_MAX];
    uint64_t                   evict;            /* next to evict from */
    ngx_uint_t                 started;          /* published is known */
    u_char                     epoch[16];        /* chat_clock.epoch */
    size_t                     epoch_len;
    ngx_uint_t                 nslots;
    ngx_chat_slot_t           *slots;
    ngx_chat_tickets_sh_t      tickets;
    ngx_chat_rate_sh_t         rate;             /* ngx_chat_limit.c */
    u_char                     html_key[32];     /* signs page sessions */
    ngx_chat_live_sh_t        *live;             /* ngx_chat_live.c */
    ngx_chat_metrics_sh_t     *metrics;          /* ngx_chat_metrics.c */
} ngx_chat_shctx_t;


/* per-worker state shared between the files of the module */
typedef struct {
    ngx_chat_main_conf_t      *cmcf;
    ngx_cycle_t               *cycle;
    ngx_log_t                 *log;
    ngx_chat_shctx_t          *sh;
    ngx_slab_pool_t           *shpool;
    ngx_uint_t                 slot;             /* ngx_worker */
    ngx_uint_t                 ready;            /* after init_process */
} ngx_chat_worker_t;


extern ngx_chat_worker_t       ngx_chat_worker;
extern ngx_module_t            ngx_chat_module;


#endif /* _NGX_CHAT_MODULE_H_INCLUDED_ */
