
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_API_H_INCLUDED_
#define _NGX_CHAT_API_H_INCLUDED_


#include "ngx_chat_module.h"
#include "ngx_chat_db.h"
#include "ngx_chat_store.h"
#include "ngx_chat_attach.h"


typedef void (*ngx_chat_api_form_pt)(ngx_http_request_t *r, u_char *data,
    size_t len);
typedef void (*ngx_chat_api_upload_pt)(ngx_http_request_t *r,
    ngx_chat_upload_t *up, ngx_int_t status);
/* answers a refused body (413, 400); returns what the handler returns */
typedef ngx_int_t (*ngx_chat_api_error_pt)(ngx_http_request_t *r,
    ngx_int_t status, const char *why);


ngx_int_t ngx_chat_api_init(ngx_conf_t *cf);
ngx_int_t ngx_chat_api_handler(ngx_http_request_t *r, ngx_str_t *path);
ngx_int_t ngx_chat_http_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message, ngx_msec_t retry_after);
ngx_int_t ngx_chat_http_send(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, size_t type_len, u_char *data, size_t len);

/* for the module's other HTTP handlers (ngx_chat_html.c) */
ngx_chat_identity_t *ngx_chat_api_start(ngx_http_request_t *r);
ngx_int_t ngx_chat_api_run(ngx_http_request_t *r, ngx_chat_query_t *q);
ngx_http_request_t *ngx_chat_api_owner(ngx_chat_query_t *q);
ngx_int_t ngx_chat_api_store(ngx_http_request_t *r, ngx_chat_send_t *snd);
ngx_http_request_t *ngx_chat_api_sender(ngx_chat_send_t *snd);
ngx_int_t ngx_chat_api_read_form(ngx_http_request_t *r,
    ngx_chat_api_form_pt handler);
ngx_int_t ngx_chat_api_read_upload(ngx_http_request_t *r, ngx_str_t *prefix,
    ngx_chat_api_upload_pt handler);
ngx_int_t ngx_chat_api_set_data(ngx_http_request_t *r, void *data);
void *ngx_chat_api_data(ngx_http_request_t *r);
void ngx_chat_api_on_error(ngx_http_request_t *r,
    ngx_chat_api_error_pt handler);


#endif /* _NGX_CHAT_API_H_INCLUDED_ */
