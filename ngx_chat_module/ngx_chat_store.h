
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_STORE_H_INCLUDED_
#define _NGX_CHAT_STORE_H_INCLUDED_


#include "ngx_chat_module.h"

#include <jansson.h>


#define NGX_CHAT_STMT_SEND_STAGE     0
#define NGX_CHAT_STMT_CLOCK          1
#define NGX_CHAT_STMT_EVENTS_AFTER   2
#define NGX_CHAT_STMT_MEMBERSHIPS    3
#define NGX_CHAT_STMT_CATCHUP        4
#define NGX_CHAT_STMT_CREATE_CONV    5
#define NGX_CHAT_STMT_LIST_CONVS     6
#define NGX_CHAT_STMT_GET_CONV       7
#define NGX_CHAT_STMT_HISTORY        8
#define NGX_CHAT_STMT_SEND_EVENTS    9
#define NGX_CHAT_STMT_CREATE_EVENT   10
#define NGX_CHAT_STMT_CLOCK_START    11
#define NGX_CHAT_STMT_RAISE          12
#define NGX_CHAT_STMT_SETTLE         13
#define NGX_CHAT_STMT_LAST_SEEN      14
#define NGX_CHAT_STMT_PRESENCE       15
#define NGX_CHAT_STMT_RECEIPT_STAGE  16
#define NGX_CHAT_STMT_RECEIPT_EVENTS 17
#define NGX_CHAT_STMT_UNREAD_TOTAL   18
#define NGX_CHAT_STMT_MEMBER         19
#define NGX_CHAT_STMT_NOTIFY_SWEEP   20
#define NGX_CHAT_STMT_NOTIFICATIONS  21
#define NGX_CHAT_STMT_NOTIFY_ACK     22
#define NGX_CHAT_STMT_MUTE           23
#define NGX_CHAT_STMT_OP_STAGE       24
#define NGX_CHAT_STMT_OP_EVENT       25
#define NGX_CHAT_STMT_REPLIES        26
#define NGX_CHAT_STMT_SEARCH         27
#define NGX_CHAT_STMT_CALL           28
#define NGX_CHAT_STMT_ATTACH_ADD     29
#define NGX_CHAT_STMT_ATTACH_GET     30
#define NGX_CHAT_STMT_ATTACH_SWEEP   31
#define NGX_CHAT_STMT_PAGE           32

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
    ngx_str_t                  mentions;         /* JSON array or empty */
    ngx_msec_t                 deadline;         /* give up "busy" retries */
    ngx_msec_t                 busy_since;       /* first found busy */
    ngx_msec_t                 start;            /* queued (metrics) */
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
    ngx_str_t                  contacts;         /* small conversations */
    ngx_str_t                  blocks;           /* users it blocks, one
                                                    per line */
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


#endif /* _NGX_CHAT_STORE_H_INCLUDED_ */
