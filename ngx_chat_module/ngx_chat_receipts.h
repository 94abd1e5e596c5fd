
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_RECEIPTS_H_INCLUDED_
#define _NGX_CHAT_RECEIPTS_H_INCLUDED_


#include "ngx_chat_module.h"
#include "ngx_chat_transport.h"


ngx_int_t ngx_chat_receipts_init_process(ngx_cycle_t *cycle);
void ngx_chat_receipts_exit_process(void);
void ngx_chat_receipts_mark(int64_t conv, ngx_str_t *user,
    int64_t delivered, int64_t read, uint64_t asof);
void ngx_chat_receipts_delivered(ngx_chat_session_t *s,
    ngx_chat_event_t *ev);
void ngx_chat_receipts_ack(ngx_chat_session_t *s, uint64_t gseq);
void ngx_chat_receipts_free(ngx_chat_session_t *s);


#endif /* _NGX_CHAT_RECEIPTS_H_INCLUDED_ */
