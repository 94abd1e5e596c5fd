
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_STREAM_H_INCLUDED_
#define _NGX_CHAT_STREAM_H_INCLUDED_


#include "ngx_chat_module.h"


#define NGX_CHAT_STREAM_SSE   0      /* GET /chat/events */
#define NGX_CHAT_STREAM_POLL  1      /* GET /chat/poll */


ngx_int_t ngx_chat_stream_handler(ngx_http_request_t *r, ngx_uint_t kind);


#endif /* _NGX_CHAT_STREAM_H_INCLUDED_ */
