
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_NOTIFY_H_INCLUDED_
#define _NGX_CHAT_NOTIFY_H_INCLUDED_


#include "ngx_chat_module.h"


ngx_int_t ngx_chat_notify_init_process(ngx_cycle_t *cycle);
void ngx_chat_notify_exit_process(void);


#endif /* _NGX_CHAT_NOTIFY_H_INCLUDED_ */
