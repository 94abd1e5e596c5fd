
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_LIMIT_H_INCLUDED_
#define _NGX_CHAT_LIMIT_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


typedef struct ngx_chat_limit_addr_s  ngx_chat_limit_addr_t;


/*
 * Per-worker caps on long-lived connections: connections per client
 * address (limit_conn stops counting a WebSocket once it leaves HTTP) and
 * sessions that have not authenticated yet.
 */
ngx_int_t ngx_chat_limit_addr_acquire(ngx_connection_t *c,
    ngx_chat_limit_addr_t **node);
void ngx_chat_limit_addr_release(ngx_chat_limit_addr_t *node);
ngx_int_t ngx_chat_limit_unauth_full(void);
void ngx_chat_limit_unauth_add(ngx_int_t n);


#endif /* _NGX_CHAT_LIMIT_H_INCLUDED_ */
