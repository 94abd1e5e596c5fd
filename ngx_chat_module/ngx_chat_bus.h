
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_BUS_H_INCLUDED_
#define _NGX_CHAT_BUS_H_INCLUDED_


#include "ngx_chat_module.h"
#include "ngx_chat_transport.h"


ngx_int_t ngx_chat_bus_init_module(ngx_cycle_t *cycle);
ngx_int_t ngx_chat_bus_init_zone(ngx_shm_zone_t *shm_zone, void *data);
ngx_int_t ngx_chat_bus_init_process(ngx_cycle_t *cycle);
void ngx_chat_bus_exit_process(void);
void ngx_chat_bus_on_db_ready(void);
ngx_int_t ngx_chat_bus_started(void);
uint64_t ngx_chat_bus_position(void);
uint64_t ngx_chat_bus_ring_start(void);
void ngx_chat_bus_notify(void);
int64_t ngx_chat_random_key(void);
int64_t ngx_chat_bus_holder(void);
ngx_int_t ngx_chat_bus_can_reserve(void);
ngx_int_t ngx_chat_bus_reserve(ngx_uint_t n, int64_t key, uint64_t *lo,
    ngx_chat_resv_t **entry);
void ngx_chat_bus_publish_reserved(ngx_chat_resv_t *r, int64_t key,
    uint64_t gseq, int64_t conversation, u_char *data, size_t len);
void ngx_chat_bus_release(ngx_chat_resv_t *r, int64_t key);
void ngx_chat_bus_forget_message(int64_t conv, uint64_t gseq, u_char *data,
    size_t len);
void ngx_chat_bus_void(ngx_chat_resv_t *r, int64_t key);
void ngx_chat_bus_unknown(ngx_chat_resv_t *r, int64_t key);
ngx_int_t ngx_chat_bus_register(ngx_chat_session_t *s);
void ngx_chat_bus_unregister(ngx_chat_session_t *s);
ngx_int_t ngx_chat_bus_subscribe(ngx_chat_session_t *s, int64_t conv);
ngx_int_t ngx_chat_bus_subscribe_span(ngx_chat_session_t *s, int64_t conv,
    uint64_t from, uint64_t until);
ngx_int_t ngx_chat_bus_subscribed(ngx_chat_session_t *s, int64_t conv);
void ngx_chat_bus_unsubscribe(ngx_chat_session_t *s, int64_t conv);
void ngx_chat_bus_unsubscribe_all(ngx_chat_session_t *s);
ngx_int_t ngx_chat_bus_replay(ngx_chat_session_t *s);

typedef void (*ngx_chat_bus_each_pt)(ngx_chat_session_t *s, void *data);

void ngx_chat_bus_each(int64_t conv, ngx_chat_bus_each_pt handler,
    void *data);
ngx_chat_session_t *ngx_chat_bus_find(ngx_str_t *user, uint64_t id);
void ngx_chat_bus_each_of(ngx_str_t *user, ngx_chat_bus_each_pt handler,
    void *data);
uint64_t ngx_chat_bus_known(void);
ngx_uint_t ngx_chat_bus_resets(void);
void ngx_chat_event_init(ngx_chat_event_t *ev, uint64_t gseq, int64_t conv,
    u_char *data, size_t len);
ngx_int_t ngx_chat_event_envelope(ngx_chat_event_t *ev);
u_char *ngx_chat_cursor_print(u_char *p, uint64_t gseq);
ngx_int_t ngx_chat_cursor_parse(u_char *p, size_t n, uint64_t *gseq);

#define NGX_CHAT_CURSOR_LEN  (16 + 1 + NGX_INT64_LEN)


#endif /* _NGX_CHAT_BUS_H_INCLUDED_ */
