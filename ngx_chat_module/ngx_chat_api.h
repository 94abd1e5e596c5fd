
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_API_H_INCLUDED_
#define _NGX_CHAT_API_H_INCLUDED_


#include "ngx_chat_module.h"


ngx_int_t ngx_chat_api_init(ngx_conf_t *cf);
ngx_int_t ngx_chat_api_handler(ngx_http_request_t *r, ngx_str_t *path);
ngx_int_t ngx_chat_http_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message, ngx_msec_t retry_after);


#endif /* _NGX_CHAT_API_H_INCLUDED_ */
