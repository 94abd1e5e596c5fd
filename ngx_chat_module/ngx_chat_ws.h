
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_WS_H_INCLUDED_
#define _NGX_CHAT_WS_H_INCLUDED_


#include "ngx_chat_module.h"


extern ngx_chat_transport_t    ngx_chat_ws_transport;
ngx_int_t ngx_chat_ws_handler(ngx_http_request_t *r);


#endif /* _NGX_CHAT_WS_H_INCLUDED_ */
