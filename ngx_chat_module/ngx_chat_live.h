
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_LIVE_H_INCLUDED_
#define _NGX_CHAT_LIVE_H_INCLUDED_


#include "ngx_chat_module.h"
#include "ngx_chat_json.h"


#define NGX_CHAT_PRESENCE_NONE     0
#define NGX_CHAT_PRESENCE_ONLINE   1
#define NGX_CHAT_PRESENCE_AWAY     2
#define NGX_CHAT_PRESENCE_OFFLINE  3

#define NGX_CHAT_PRESENCE_SUB_MAX  256
#define NGX_CHAT_DEVICE_ID_LEN     64


ngx_int_t ngx_chat_live_init_zone(ngx_slab_pool_t *shpool,
    ngx_chat_shctx_t *sh, ngx_chat_main_conf_t *cmcf);
ngx_int_t ngx_chat_live_init_process(ngx_cycle_t *cycle);
void ngx_chat_live_exit_process(void);
void ngx_chat_live_process(void);

ngx_int_t ngx_chat_live_typing(int64_t conv, ngx_str_t *user,
    ngx_uint_t start, uint64_t session);
void ngx_chat_live_typing_release(int64_t conv, ngx_str_t *user,
    uint64_t session);
void ngx_chat_live_sent(int64_t conv, ngx_str_t *user);
void ngx_chat_live_blocks(ngx_str_t *user, u_char *list, size_t len);
void ngx_chat_live_erased(ngx_str_t *user);

ngx_int_t ngx_chat_live_join(ngx_chat_session_t *s, int64_t *contacts,
    ngx_uint_t n);
void ngx_chat_live_device(ngx_chat_session_t *s);
void ngx_chat_live_away(ngx_chat_session_t *s, ngx_uint_t away);
void ngx_chat_live_leave(ngx_chat_session_t *s);
ngx_int_t ngx_chat_live_subscribe(ngx_chat_session_t *s, ngx_str_t *users,
    ngx_uint_t n, ngx_chat_buf_t *out);
ngx_uint_t ngx_chat_live_status(ngx_str_t *user);
ngx_str_t *ngx_chat_live_status_name(ngx_uint_t status);
ngx_int_t ngx_chat_live_valid_device(u_char *p, size_t n);
u_char *ngx_chat_live_ts(u_char *p, uint64_t ms);


#endif /* _NGX_CHAT_LIVE_H_INCLUDED_ */
