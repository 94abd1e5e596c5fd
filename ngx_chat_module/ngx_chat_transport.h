
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_TRANSPORT_H_INCLUDED_
#define _NGX_CHAT_TRANSPORT_H_INCLUDED_


#include "ngx_chat_module.h"


/*
 * One event on its way to sessions.  Durable events have a gseq; the
 * encodings a transport needs are built on first use and shared by every
 * session the event goes to.
 */
typedef struct {
    uint64_t                   gseq;             /* 0: ephemeral */
    int64_t                    conversation;
    int64_t                    seq;              /* message.new; 0: not
                                                    parsed, -1: none */
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


/* ngx_chat_session.c: what a transport calls */
ngx_chat_session_t *ngx_chat_session_create(ngx_chat_transport_t *t,
    void *tctx, ngx_connection_t *c, ngx_log_t *log, ngx_chat_identity_t *id,
    ngx_str_t *cursor);
void ngx_chat_session_recv(ngx_chat_session_t *s, u_char *data, size_t len);
void ngx_chat_session_drained(ngx_chat_session_t *s);
void ngx_chat_session_closed(ngx_chat_session_t *s);


#endif /* _NGX_CHAT_TRANSPORT_H_INCLUDED_ */
