
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_AUTH_H_INCLUDED_
#define _NGX_CHAT_AUTH_H_INCLUDED_


#include "ngx_chat_module.h"


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
ngx_int_t ngx_chat_cors(ngx_http_request_t *r);
ngx_int_t ngx_chat_cors_preflight(ngx_http_request_t *r);
void ngx_chat_tickets_init_zone(ngx_chat_tickets_sh_t *t);
/*
 * NGX_OK, NGX_BUSY when the table is full of other users' live tickets
 * (*retry_after: ms until the oldest one runs out), or NGX_ERROR.
 */
ngx_int_t ngx_chat_ticket_issue(ngx_chat_identity_t *id, ngx_pool_t *pool,
    ngx_str_t *ticket, ngx_msec_t *retry_after);
ngx_int_t ngx_chat_ticket_redeem(ngx_str_t *ticket, ngx_pool_t *pool,
    ngx_chat_identity_t *id);


#endif /* _NGX_CHAT_AUTH_H_INCLUDED_ */
