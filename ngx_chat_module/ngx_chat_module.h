
/*
 * Copyright (C) ngx_chat_module authors
 *
 * Shared types and the interfaces between the module's concerns:
 *
 *   ngx_chat_module.c    directives, configuration, zone, process hooks,
 *                        location handler (routes to ws / api)
 *   ngx_chat_auth.c      JWT verification (HS256/RS256/ES256), tickets
 *   ngx_chat_db.c        per-worker pool of non-blocking libpq connections
 *   ngx_chat_store.c     the SQL statements and the operations built on
 *                        them (batched sends, catch-up, conversations)
 *   ngx_chat_bus.c       shared-memory event ring, doorbells between
 *                        workers, ordered local delivery
 *   ngx_chat_session.c   one authenticated client, transport-agnostic:
 *                        requests, subscriptions, cursor, catch-up
 *   ngx_chat_ws.c        WebSocket transport (RFC 6455)
 *   ngx_chat_api.c       REST API
 *   ngx_chat_json.c      JSON helpers
 */


#ifndef _NGX_CHAT_MODULE_H_INCLUDED_
#define _NGX_CHAT_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <libpq-fe.h>
#include <jansson.h>
#include <openssl/evp.h>


#define NGX_CHAT_SCHEMA_VERSION        2


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
#define NGX_CHAT_CLOSE_RATE_LIMITED    4029


typedef struct ngx_chat_session_s    ngx_chat_session_t;
typedef struct ngx_chat_transport_s  ngx_chat_transport_t;
typedef struct ngx_chat_query_s      ngx_chat_query_t;


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

typedef struct {
    uint64_t                   published;        /* highest gseq in ring */
    ngx_uint_t                 started;          /* published is known */
    u_char                     epoch[16];        /* chat_clock.epoch */
    size_t                     epoch_len;
    ngx_uint_t                 nslots;
    ngx_chat_slot_t           *slots;
    ngx_chat_tickets_sh_t      tickets;
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


/*
 * One event on its way to sessions.  Durable events have a gseq; the
 * encodings a transport needs are built on first use and shared by every
 * session the event goes to.
 */
typedef struct {
    uint64_t                   gseq;             /* 0: ephemeral */
    int64_t                    conversation;
    ngx_str_t                  kind;             /* in payload */
    ngx_str_t                  payload;          /* event object JSON */
    ngx_str_t                  envelope;         /* {"type":"event",...} */
} ngx_chat_event_t;


/*
 * Transport interface.  The core (session) never knows which transport
 * carries it.  A transport:
 *   - creates the session with ngx_chat_session_create() once the
 *     connection is established (identity may be NULL when the client
 *     will authenticate in-band with "hello"; cursor, when not empty, is
 *     the cursor the client resumes from);
 *   - hands every complete, valid UTF-8 text message to
 *     ngx_chat_session_recv();
 *   - calls ngx_chat_session_drained() when its output queue becomes empty
 *     after a send() or send_event() answered NGX_AGAIN;
 *   - calls ngx_chat_session_closed() exactly once when the connection is
 *     gone, only from its own event handlers, never from inside send() or
 *     close(); after that call the session never calls the transport.
 *
 * Flow control: send() and send_event() queue their data and answer
 *   NGX_OK      queued, there is room for more;
 *   NGX_AGAIN   queued, but the queue is now past its window: the session
 *               delivers no more events until drained() (a reader that does
 *               not drain within chat_send_timeout is cut by the transport);
 *   NGX_ERROR   the connection is closing or had to be cut.
 */
struct ngx_chat_transport_s {
    ngx_str_t                  name;

    /* a reply or a control message: one JSON text */
    ngx_int_t                (*send)(ngx_chat_session_t *s, u_char *data,
                                     size_t len);

    /* an event, in the transport's own encoding */
    ngx_int_t                (*send_event)(ngx_chat_session_t *s,
                                           ngx_chat_event_t *ev);

    /*
     * Start an orderly close.  code is a WebSocket close code (PROTOCOL
     * section 4); other transports map it to their own form.
     */
    void                     (*close)(ngx_chat_session_t *s, ngx_uint_t code,
                                      const char *reason);

    /* bytes queued and not yet written to the socket */
    size_t                   (*pending)(ngx_chat_session_t *s);
};


#define NGX_CHAT_SESSION_NEW        0    /* waiting for hello */
#define NGX_CHAT_SESSION_JOINING    1    /* loading memberships */
#define NGX_CHAT_SESSION_CATCHUP    2    /* replaying from cursor */
#define NGX_CHAT_SESSION_LIVE       3
#define NGX_CHAT_SESSION_CLOSED     4

struct ngx_chat_session_s {
    ngx_chat_transport_t      *transport;
    void                      *tctx;             /* the transport's */
    ngx_log_t                 *log;

    ngx_str_t                  user;
    ngx_str_t                  name;
    ngx_uint_t                 role;
    time_t                     exp;

    uint64_t                   id;
    uint64_t                   cursor;           /* last gseq delivered */
    uint64_t                   catchup_upto;     /* worker position */
    uint64_t                   start;            /* cursor when it began */

    ngx_uint_t                 state;
    ngx_uint_t                 refs;             /* pending operations */
    ngx_uint_t                 sends;            /* sends in the store */
    size_t                     send_bytes;       /* their bodies */

    ngx_queue_t                queue;            /* all local sessions */
    ngx_queue_t                user_queue;       /* sessions of one user */
    void                      *user_node;
    ngx_queue_t                catchup_queue;    /* waiting for the pool */

    void                     **subs;             /* by conversation id */
    ngx_uint_t                 nsubs;
    ngx_uint_t                 nalloc;

    ngx_event_t                timer;            /* auth and token expiry */

    u_char                    *idmem;            /* user and name */
    u_char                    *hello_id;         /* reply id while joining */
    size_t                     hello_id_len;
    uint64_t                   want;             /* cursor asked for */

    unsigned                   authenticated:1;
    unsigned                   hello_done:1;
    unsigned                   catchup_busy:1;
    unsigned                   catchup_waiting:1;
    unsigned                   wait_drain:1;
    unsigned                   transport_gone:1;
    unsigned                   pending_close:1;
    unsigned                   has_cursor:1;
    unsigned                   bad_cursor:1;
    unsigned                   catchup_stale:1;
    unsigned                   delivered:1;      /* since start */
    unsigned                   unauth:1;         /* counted as such */
};


/* ngx_chat_session.c */
ngx_chat_session_t *ngx_chat_session_create(ngx_chat_transport_t *t,
    void *tctx, ngx_log_t *log, ngx_chat_identity_t *id, ngx_str_t *cursor);
void ngx_chat_session_recv(ngx_chat_session_t *s, u_char *data, size_t len);
void ngx_chat_session_drained(ngx_chat_session_t *s);
void ngx_chat_session_closed(ngx_chat_session_t *s);
ngx_int_t ngx_chat_session_deliver(ngx_chat_session_t *s,
    ngx_chat_event_t *ev);
void ngx_chat_session_resync(ngx_chat_session_t *s, const char *reason);


/* ngx_chat_auth.c */
char *ngx_chat_auth_init_conf(ngx_conf_t *cf, ngx_chat_main_conf_t *cmcf);
/*
 * Verifies a compact JWT with the configured algorithm and key.  On
 * success fills id (strings allocated from pool) and returns NGX_OK.
 * Otherwise returns NGX_DECLINED and sets *code to "unauthorized" or
 * "token_expired" and *msg to a short human-readable reason.
 */
ngx_int_t ngx_chat_auth_verify(ngx_str_t *token, ngx_pool_t *pool,
    ngx_chat_identity_t *id, const char **code, const char **msg);
/* Authorization: Bearer, or ?ticket=; NGX_DECLINED when neither present */
ngx_int_t ngx_chat_auth_request(ngx_http_request_t *r,
    ngx_chat_identity_t *id, const char **code, const char **msg);
ngx_int_t ngx_chat_origin_allowed(ngx_http_request_t *r);
void ngx_chat_tickets_init_zone(ngx_chat_tickets_sh_t *t);
/*
 * NGX_OK, NGX_BUSY when the table is full of other users' live tickets
 * (*retry_after: ms until the oldest one runs out), or NGX_ERROR.
 */
ngx_int_t ngx_chat_ticket_issue(ngx_chat_identity_t *id, ngx_pool_t *pool,
    ngx_str_t *ticket, ngx_msec_t *retry_after);
ngx_int_t ngx_chat_ticket_redeem(ngx_str_t *ticket, ngx_pool_t *pool,
    ngx_chat_identity_t *id);


/* ngx_chat_db.c */
#define NGX_CHAT_QUERY_MAX_PARAMS  8

typedef void (*ngx_chat_query_handler_pt)(ngx_chat_query_t *q,
    PGresult *res, ngx_int_t rc);

/*
 * The caller owns q and everything params point to; the db layer never
 * frees them.  handler is called exactly once if ngx_chat_db_query()
 * returned NGX_OK:
 *   rc == NGX_OK        res is PGRES_TUPLES_OK or PGRES_COMMAND_OK
 *   rc == NGX_ERROR     the statement failed; res holds the error
 *   rc == NGX_DECLINED  the store is unavailable (connection lost);
 *                       res is NULL
 * res is cleared by the db layer after handler returns.
 */
struct ngx_chat_query_s {
    ngx_queue_t                queue;
    ngx_uint_t                 stmt;             /* index in ngx_chat_stmts */
    ngx_uint_t                 nparams;
    const char                *params[NGX_CHAT_QUERY_MAX_PARAMS];
    int                        lengths[NGX_CHAT_QUERY_MAX_PARAMS];
    ngx_int_t                (*build)(ngx_chat_query_t *q);
    ngx_chat_query_handler_pt  handler;
    void                      *data;
    ngx_msec_t                 start;
};

typedef struct {
    const char                *name;
    const char                *sql;
    int                        nparams;
} ngx_chat_stmt_t;

extern ngx_chat_stmt_t         ngx_chat_stmts[];  /* { NULL } terminated */

char *ngx_chat_db_conf(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
ngx_int_t ngx_chat_db_init_process(ngx_cycle_t *cycle);
void ngx_chat_db_exit_process(void);
ngx_int_t ngx_chat_db_query(ngx_chat_query_t *q);
ngx_int_t ngx_chat_db_ready(void);
ngx_msec_t ngx_chat_db_retry_after(void);
ngx_uint_t ngx_chat_db_busy(void);


/* ngx_chat_store.c */
#define NGX_CHAT_STMT_SEND_BATCH     0
#define NGX_CHAT_STMT_CLOCK          1
#define NGX_CHAT_STMT_EVENTS_AFTER   2
#define NGX_CHAT_STMT_MEMBERSHIPS    3
#define NGX_CHAT_STMT_CATCHUP        4
#define NGX_CHAT_STMT_CREATE_CONV    5
#define NGX_CHAT_STMT_LIST_CONVS     6
#define NGX_CHAT_STMT_GET_CONV       7
#define NGX_CHAT_STMT_HISTORY        8

typedef struct ngx_chat_send_s  ngx_chat_send_t;

typedef void (*ngx_chat_send_handler_pt)(ngx_chat_send_t *snd);

/*
 * One message to store.  The owner (a session or a REST request) fills
 * the fields; the store copies nothing, so the owner keeps them alive
 * until handler runs.  After the handler returns the item is freed by
 * the store.
 */
struct ngx_chat_send_s {
    ngx_queue_t                queue;
    ngx_str_t                  sender;
    int64_t                    conversation;
    ngx_str_t                  client_msg_id;
    ngx_str_t                  body;
    ngx_str_t                  format;
    int64_t                    reply_to;         /* 0: none */
    ngx_str_t                  attachments;      /* JSON text or empty */
    ngx_msec_t                 deadline;         /* give up "busy" retries */
    ngx_msec_t                 busy_since;       /* first found busy */
    unsigned                   alone:1;          /* in a batch of its own */
    unsigned                   counted:1;        /* in its sender's share */

    /* result */
    ngx_int_t                  rc;               /* NGX_OK or error */
    ngx_uint_t                 duplicate;        /* stored before */
    const char                *error;            /* error code */
    const char                *error_msg;
    ngx_msec_t                 retry_after;
    ngx_str_t                  message;          /* message JSON */

    ngx_chat_send_handler_pt   handler;
    void                      *data;
    u_char                    *req_id;           /* owner's request id */
    size_t                     req_id_len;
    u_char                    *mem;              /* extra bytes, for input */
};

/*
 * A session's memberships, loaded for it to join.  The owner fills user
 * and keeps it alive until handler runs; conversations (comma separated
 * ids) and clock are valid in the handler only.  rc: NGX_OK, or
 * NGX_DECLINED when the store was unavailable.
 */
typedef struct ngx_chat_join_s  ngx_chat_join_t;

struct ngx_chat_join_s {
    ngx_queue_t                queue;
    ngx_str_t                  user;
    ngx_int_t                  rc;
    ngx_str_t                  conversations;
    uint64_t                   clock;
    void                     (*handler)(ngx_chat_join_t *j);
    void                      *data;
};

void ngx_chat_store_on_ready(void);
ngx_chat_send_t *ngx_chat_store_send_alloc(size_t extra);
ngx_chat_send_t *ngx_chat_store_send_from_json(json_t *root,
    ngx_str_t *sender, int64_t conv, size_t extra, const char **code,
    const char **msg);
ngx_int_t ngx_chat_store_send(ngx_chat_send_t *snd);
ngx_int_t ngx_chat_store_join(ngx_chat_join_t *j);
ngx_chat_query_t *ngx_chat_query_alloc(ngx_uint_t stmt, size_t extra);
void ngx_chat_query_free(ngx_chat_query_t *q);


/* ngx_chat_bus.c */
ngx_int_t ngx_chat_bus_init_module(ngx_cycle_t *cycle);
ngx_int_t ngx_chat_bus_init_zone(ngx_shm_zone_t *shm_zone, void *data);
ngx_int_t ngx_chat_bus_init_process(ngx_cycle_t *cycle);
void ngx_chat_bus_exit_process(void);
void ngx_chat_bus_on_db_ready(void);
ngx_int_t ngx_chat_bus_started(void);
uint64_t ngx_chat_bus_position(void);
void ngx_chat_bus_publish(uint64_t gseq, int64_t conversation,
    u_char *data, size_t len);
void ngx_chat_bus_notify(void);
ngx_int_t ngx_chat_bus_register(ngx_chat_session_t *s);
void ngx_chat_bus_unregister(ngx_chat_session_t *s);
ngx_int_t ngx_chat_bus_subscribe(ngx_chat_session_t *s, int64_t conv);
ngx_int_t ngx_chat_bus_subscribed(ngx_chat_session_t *s, int64_t conv);
void ngx_chat_bus_unsubscribe(ngx_chat_session_t *s, int64_t conv);
void ngx_chat_bus_unsubscribe_all(ngx_chat_session_t *s);
ngx_int_t ngx_chat_bus_replay(ngx_chat_session_t *s);
uint64_t ngx_chat_bus_known(void);
void ngx_chat_event_init(ngx_chat_event_t *ev, uint64_t gseq, int64_t conv,
    u_char *data, size_t len);
ngx_int_t ngx_chat_event_envelope(ngx_chat_event_t *ev);
u_char *ngx_chat_cursor_print(u_char *p, uint64_t gseq);
ngx_int_t ngx_chat_cursor_parse(u_char *p, size_t n, uint64_t *gseq);

#define NGX_CHAT_CURSOR_LEN  (16 + 1 + NGX_INT64_LEN)


/* ngx_chat_ws.c */
extern ngx_chat_transport_t    ngx_chat_ws_transport;
ngx_int_t ngx_chat_ws_handler(ngx_http_request_t *r);


/* ngx_chat_api.c */
ngx_int_t ngx_chat_api_init(ngx_conf_t *cf);
ngx_int_t ngx_chat_api_handler(ngx_http_request_t *r, ngx_str_t *path);
ngx_int_t ngx_chat_http_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message, ngx_msec_t retry_after);


#endif /* _NGX_CHAT_MODULE_H_INCLUDED_ */
