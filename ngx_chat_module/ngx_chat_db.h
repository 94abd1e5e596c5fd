
/*
 * Copyright (C) ngx_chat_module authors
 */


#ifndef _NGX_CHAT_DB_H_INCLUDED_
#define _NGX_CHAT_DB_H_INCLUDED_


#include "ngx_chat_module.h"
#include "ngx_chat_json.h"

#include <libpq-fe.h>


#define NGX_CHAT_QUERY_MAX_PARAMS  8

typedef void (*ngx_chat_query_handler_pt)(ngx_chat_query_t *q,
    PGresult *res, ngx_int_t rc);

/*
 * The caller owns q and everything params point to; the db layer never
 * frees them.  handler is called exactly once if ngx_chat_db_query()
 * returned NGX_OK:
 *   rc == NGX_OK        res is PGRES_TUPLES_OK or PGRES_COMMAND_OK
 *   rc == NGX_ERROR     the statement failed; res holds the error
 *   rc == NGX_DECLINED  the store is unavailable (connection lost);
 *                       res is NULL
 * res is cleared by the db layer after handler returns, unless the handler
 * called ngx_chat_db_keep_result(): then it is the handler's to PQclear().
 *
 * sql, when set, is sent as it is (simple query protocol: several
 * statements, no parameters) instead of the prepared statement stmt.
 *
 * A query with txn set runs inside a transaction that its SQL opened:
 * when it succeeds the handler finds its connection in q->conn, held for
 * it, and may send the next statement of the transaction there with
 * ngx_chat_db_continue() before it returns.  A transaction left open
 * (the handler did not continue, or a statement failed) is rolled back
 * before the connection takes anything else.
 */
struct ngx_chat_query_s {
    ngx_queue_t                queue;
    ngx_uint_t                 stmt;             /* index in ngx_chat_stmts */
    ngx_uint_t                 nparams;
    const char                *params[NGX_CHAT_QUERY_MAX_PARAMS];
    int                        lengths[NGX_CHAT_QUERY_MAX_PARAMS];
    ngx_int_t                (*build)(ngx_chat_query_t *q);
    ngx_chat_query_handler_pt  handler;
    void                      *data;
    ngx_msec_t                 start;
    const char                *sql;
    void                      *conn;
    unsigned                   txn:1;
};

typedef struct {
    const char                *name;
    const char                *sql;
    int                        nparams;
} ngx_chat_stmt_t;

extern ngx_chat_stmt_t         ngx_chat_stmts[];  /* { NULL } terminated */

char *ngx_chat_db_conf(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);
ngx_int_t ngx_chat_db_init_process(ngx_cycle_t *cycle);
void ngx_chat_db_exit_process(void);
ngx_int_t ngx_chat_db_query(ngx_chat_query_t *q);
void ngx_chat_db_continue(ngx_chat_query_t *q, void *conn);
void ngx_chat_db_keep_result(void);
ngx_int_t ngx_chat_db_literal(ngx_chat_buf_t *b, const u_char *data,
    size_t len);
ngx_int_t ngx_chat_db_ready(void);
ngx_msec_t ngx_chat_db_retry_after(void);
ngx_uint_t ngx_chat_db_busy(void);
ngx_uint_t ngx_chat_db_alive_count(void);
ngx_uint_t ngx_chat_db_schema_behind(void);
ngx_uint_t ngx_chat_db_queued(void);


#endif /* _NGX_CHAT_DB_H_INCLUDED_ */
