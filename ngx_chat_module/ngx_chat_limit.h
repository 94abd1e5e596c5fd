
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_LIMIT_H_INCLUDED_
#define _NGX_CHAT_LIMIT_H_INCLUDED_


#include "ngx_chat_module.h"


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

/* rate limits across workers: chat_rate_limit */
void ngx_chat_rate_init_zone(ngx_chat_rate_sh_t *rs);
#define NGX_CHAT_RATE_ADDR_LEN  16
void ngx_chat_rate_addr(ngx_connection_t *c, u_char *buf, size_t *len);
ngx_int_t ngx_chat_rate_check(ngx_uint_t kind, ngx_str_t *user,
    ngx_str_t *addr, ngx_log_t *log, ngx_msec_t *retry_after);
ngx_int_t ngx_chat_rate_request(ngx_http_request_t *r, ngx_uint_t kind,
    ngx_chat_identity_t *id, ngx_msec_t *retry_after);
char *ngx_chat_rate_conf(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);


#endif /* _NGX_CHAT_LIMIT_H_INCLUDED_ */
