
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_HEALTH_H_INCLUDED_
#define _NGX_CHAT_HEALTH_H_INCLUDED_


#include "ngx_chat_module.h"


ngx_int_t ngx_chat_health_handler(ngx_http_request_t *r, ngx_uint_t ready);


#endif /* _NGX_CHAT_HEALTH_H_INCLUDED_ */
