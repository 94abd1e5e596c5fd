
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_HTML_H_INCLUDED_
#define _NGX_CHAT_HTML_H_INCLUDED_


#include "ngx_chat_module.h"


ngx_int_t ngx_chat_html_handler(ngx_http_request_t *r, ngx_str_t *path);
/* the page session of the request's cookie: NGX_OK fills id */
ngx_int_t ngx_chat_html_session(ngx_http_request_t *r,
    ngx_chat_identity_t *id);


#endif /* _NGX_CHAT_HTML_H_INCLUDED_ */
