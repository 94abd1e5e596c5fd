
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_SESSION_H_INCLUDED_
#define _NGX_CHAT_SESSION_H_INCLUDED_


#include "ngx_chat_module.h"
#include "ngx_chat_transport.h"


#define NGX_CHAT_SESSION_NEW        0    /* waiting for hello */
#define NGX_CHAT_SESSION_JOINING    1    /* loading memberships */
#define NGX_CHAT_SESSION_CATCHUP    2    /* replaying from cursor */
#define NGX_CHAT_SESSION_LIVE       3
#define NGX_CHAT_SESSION_CLOSED     4

/* typing states one connection holds at once: the oldest stops */
#define NGX_CHAT_SESSION_TYPING     8

struct ngx_chat_session_s {
    ngx_chat_transport_t      *transport;
    void                      *tctx;             /* the transport's */
    ngx_log_t                 *log;

    ngx_str_t                  user;
    ngx_str_t                  name;
    ngx_uint_t                 role;
    time_t                     exp;

    u_char                    *blocks;           /* "\nuser\n...\n" */
    size_t                     blocks_len;
    unsigned                   blocks_live:1;    /* set by a change */
    u_char                     addr[16];         /* rate limit key */
    size_t                     addr_len;
    ngx_uint_t                 refused;          /* rate limited in a row */

    uint64_t                   id;
    uint64_t                   cursor;           /* last gseq delivered */
    uint64_t                   catchup_upto;     /* worker position */
    uint64_t                   start;            /* cursor when it began */

    ngx_uint_t                 state;
    ngx_uint_t                 refs;             /* pending operations */
    ngx_uint_t                 sends;            /* sends in the store */
    ngx_uint_t                 resets;           /* bus resets at join */
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

    uint64_t                   device;           /* device_id's hash; 0 */
    uint64_t                   live_mark;        /* ngx_chat_live.c */
    void                     **psubs;            /* presence_sub links */
    ngx_uint_t                 npsubs;
    int64_t                    typing[NGX_CHAT_SESSION_TYPING];
    ngx_uint_t                 ntyping;          /* conversations typed in */
    void                      *acks;             /* ngx_chat_receipts.c */
    ngx_uint_t                 ack_head;
    ngx_uint_t                 nacks;
    ngx_uint_t                 nalloc_acks;
    uint64_t                   store_below;      /* catch-up from the store
                                                    until past it */
    ngx_uint_t                 rejoins;          /* joins redone */

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
    unsigned                   metered:1;        /* in chat_connections */
    unsigned                   present:1;        /* a device in the zone */
    unsigned                   acking:1;         /* the client sends acks */
    unsigned                   join_stale:1;     /* membership changed while
                                                    joining */
};


ngx_int_t ngx_chat_session_deliver(ngx_chat_session_t *s,
    ngx_chat_event_t *ev);
void ngx_chat_session_resync(ngx_chat_session_t *s, const char *reason);
void ngx_chat_session_end(ngx_chat_session_t *s, ngx_uint_t code,
    const char *reason);
ngx_int_t ngx_chat_session_device(ngx_chat_session_t *s, ngx_str_t *device);
void ngx_chat_session_set_blocks(ngx_chat_session_t *s, u_char *list,
    size_t len, ngx_uint_t live);
ngx_int_t ngx_chat_session_blocked(ngx_chat_session_t *s, ngx_str_t *user);


#endif /* _NGX_CHAT_SESSION_H_INCLUDED_ */
