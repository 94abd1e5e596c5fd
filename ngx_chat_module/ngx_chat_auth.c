
/*
 * Copyright (C) ngx_chat_module authors
 *
 * Authentication: compact JWS verification (HS256, RS256, ES256) with the
 * algorithm pinned by configuration, the Origin allow-list, and single-use
 * tickets kept in the shared zone.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_chat_module.h"
#include "ngx_chat_auth.h"

#include <jansson.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/hmac.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>


#define NGX_CHAT_JWT_MAX_LEN          8192
#define NGX_CHAT_JWT_DECODED_MAX      (NGX_CHAT_JWT_MAX_LEN / 4 * 3 + 3)
#define NGX_CHAT_JWT_HS256_MIN        32
#define NGX_CHAT_JWT_HS256_LEN        32
#define NGX_CHAT_JWT_ES256_LEN        64
#define NGX_CHAT_JWT_RSA_MIN_BITS     2048
#define NGX_CHAT_KEY_FILE_MAX         65536
#define NGX_CHAT_NAME_MAX_LEN         128

#define NGX_CHAT_TICKET_RAW_LEN       32
#define NGX_CHAT_TICKET_LEN           43
#define NGX_CHAT_TICKETS_MAX          65536
#define NGX_CHAT_TICKETS_MIN          1024
/* zone bytes per allowed live ticket: tickets take about 1/8 of the zone */
#define NGX_CHAT_TICKETS_ZONE_SHARE   2048
#define NGX_CHAT_TICKETS_EXPIRE       3
#define NGX_CHAT_TICKETS_EVICT        16
/* a page opens a few sockets at once; more live tickets are a flood */
#define NGX_CHAT_TICKETS_PER_USER     16


/* the live tickets of one user, so that a flood costs only its own */
typedef struct {
    ngx_str_node_t             sn;               /* crc32 key, user */
    ngx_queue_t                tickets;          /* oldest first */
    ngx_uint_t                 count;
    u_char                     data[1];          /* user */
} ngx_chat_ticket_user_t;


typedef struct {
    ngx_str_node_t             sn;               /* crc32 key, ticket */
    ngx_queue_t                queue;
    ngx_queue_t                user_queue;
    ngx_chat_ticket_user_t    *user;
    time_t                     expire;           /* ticket, wall time */
    time_t                     exp;              /* token */
    ngx_uint_t                 role;
    u_short                    user_len;
    u_short                    name_len;
    u_char                     data[1];          /* ticket, user, name */
} ngx_chat_ticket_node_t;


static ngx_int_t ngx_chat_auth_read_file(ngx_conf_t *cf, ngx_str_t *name,
    ngx_pool_t *pool, ngx_str_t *out);
static char *ngx_chat_auth_load_key(ngx_conf_t *cf,
    ngx_chat_main_conf_t *cmcf, ngx_chat_jwt_key_t *key);
static char *ngx_chat_auth_set_secret(ngx_conf_t *cf,
    ngx_chat_jwt_key_t *key, ngx_str_t *name, ngx_str_t *data);
static char *ngx_chat_auth_set_pkey(ngx_conf_t *cf,
    ngx_chat_main_conf_t *cmcf, ngx_chat_jwt_key_t *key, ngx_str_t *name,
    ngx_str_t *data);
static EVP_PKEY *ngx_chat_auth_load_pkey(ngx_str_t *data);
static int ngx_chat_auth_no_password(char *buf, int size, int rwflag,
    void *data);
static ngx_int_t ngx_chat_auth_check_pkey(ngx_conf_t *cf, ngx_uint_t alg,
    EVP_PKEY *pkey, ngx_str_t *name);
static void ngx_chat_auth_pkey_cleanup(void *data);

static ngx_chat_main_conf_t *ngx_chat_auth_conf(void);
static ngx_int_t ngx_chat_auth_ready(ngx_chat_main_conf_t *cmcf);
static ngx_int_t ngx_chat_jwt_split(ngx_str_t *token, ngx_str_t *seg);
static ngx_int_t ngx_chat_base64url_valid(ngx_str_t *s);
static ngx_int_t ngx_chat_base64url_value(u_char c);
static ngx_int_t ngx_chat_jwt_check_header(ngx_chat_main_conf_t *cmcf,
    ngx_str_t *header, ngx_chat_jwt_key_t **key, const char **msg);
static ngx_int_t ngx_chat_jwt_select_key(ngx_chat_main_conf_t *cmcf,
    json_t *kid, ngx_chat_jwt_key_t **key, const char **msg);
static ngx_int_t ngx_chat_jwt_check_signature(ngx_chat_main_conf_t *cmcf,
    ngx_chat_jwt_key_t *key, ngx_str_t *input, ngx_str_t *sig);
static ngx_int_t ngx_chat_jwt_verify_key(ngx_uint_t alg,
    ngx_chat_jwt_key_t *key, ngx_str_t *input, ngx_str_t *sig);
static ngx_int_t ngx_chat_jwt_verify_hs256(ngx_chat_jwt_key_t *key,
    ngx_str_t *input, ngx_str_t *sig);
static ngx_int_t ngx_chat_jwt_verify_es256(ngx_chat_jwt_key_t *key,
    ngx_str_t *input, ngx_str_t *sig);
static ngx_int_t ngx_chat_jwt_digest_verify(EVP_PKEY *pkey,
    ngx_str_t *input, u_char *sig, size_t len);
static ngx_int_t ngx_chat_jwt_check_claims(ngx_chat_main_conf_t *cmcf,
    json_t *claims, ngx_pool_t *pool, ngx_chat_identity_t *id,
    const char **code, const char **msg);
static ngx_int_t ngx_chat_jwt_check_iss_aud(ngx_chat_main_conf_t *cmcf,
    json_t *claims, const char **msg);
static ngx_int_t ngx_chat_jwt_str_eq(json_t *v, ngx_str_t *s);
static ngx_int_t ngx_chat_jwt_time(json_t *claims, const char *name,
    double *value);
static ngx_int_t ngx_chat_valid_user(const u_char *p, size_t len);
static ngx_int_t ngx_chat_valid_name(const u_char *p, size_t len);

static ngx_int_t ngx_chat_cors_header(ngx_http_request_t *r, char *name,
    char *value, size_t len);
static ngx_int_t ngx_chat_origin_match(ngx_array_t *origins,
    ngx_str_t *origin);

static ngx_int_t ngx_chat_tickets_add_locked(ngx_chat_tickets_sh_t *t,
    ngx_slab_pool_t *shpool, ngx_chat_identity_t *id, ngx_str_t *ticket,
    time_t now, time_t ttl, ngx_uint_t max, ngx_msec_t *retry_after);
static void *ngx_chat_tickets_alloc_locked(ngx_chat_tickets_sh_t *t,
    ngx_slab_pool_t *shpool, size_t size, time_t now);
static void ngx_chat_tickets_expire_locked(ngx_chat_tickets_sh_t *t,
    ngx_slab_pool_t *shpool, time_t now, ngx_uint_t n);
static void ngx_chat_tickets_delete_locked(ngx_chat_tickets_sh_t *t,
    ngx_slab_pool_t *shpool, ngx_chat_ticket_node_t *tn);
static ngx_uint_t ngx_chat_tickets_max(ngx_chat_main_conf_t *cmcf);


static ngx_str_t  ngx_chat_jwt_alg_names[] = {
    ngx_null_string,
    ngx_string("HS256"),
    ngx_string("RS256"),
    ngx_string("ES256")
};


/*
 * Every key is read here, in the master, with the one configured
 * algorithm: workers never open key files, and a key file that went
 * missing fails the (re)load instead of a request.
 */

char *
ngx_chat_auth_init_conf(ngx_conf_t *cf, ngx_chat_main_conf_t *cmcf)
{
    ngx_uint_t           i;
    ngx_chat_jwt_key_t  *key;

    if (cmcf->jwt_alg != NGX_CHAT_JWT_HS256
        && cmcf->jwt_alg != NGX_CHAT_JWT_RS256
        && cmcf->jwt_alg != NGX_CHAT_JWT_ES256)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_jwt_key: unknown algorithm");
        return NGX_CONF_ERROR;
    }

    if (cmcf->jwt_keys == NULL || cmcf->jwt_keys->nelts == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "chat_jwt_key: no key");
        return NGX_CONF_ERROR;
    }

    key = cmcf->jwt_keys->elts;

    for (i = 0; i < cmcf->jwt_keys->nelts; i++) {
        if (ngx_chat_auth_load_key(cf, cmcf, &key[i]) != NGX_CONF_OK) {
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


static char *
ngx_chat_auth_load_key(ngx_conf_t *cf, ngx_chat_main_conf_t *cmcf,
    ngx_chat_jwt_key_t *key)
{
    ngx_str_t    name, data;
    ngx_pool_t  *pool;

    /* ngx_conf_full_name() copies the name with its terminating zero */

    name.len = key->file.len;
    name.data = ngx_pnalloc(cf->temp_pool, name.len + 1);
    if (name.data == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memcpy(name.data, key->file.data, name.len);
    name.data[name.len] = '\0';

    if (ngx_conf_full_name(cf->cycle, &name, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    /* the secret stays for the lifetime of the configuration, PEM not */
    pool = (cmcf->jwt_alg == NGX_CHAT_JWT_HS256) ? cf->pool : cf->temp_pool;

    if (ngx_chat_auth_read_file(cf, &name, pool, &data) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (cmcf->jwt_alg == NGX_CHAT_JWT_HS256) {
        return ngx_chat_auth_set_secret(cf, key, &name, &data);
    }

    return ngx_chat_auth_set_pkey(cf, cmcf, key, &name, &data);
}


static ngx_int_t
ngx_chat_auth_read_file(ngx_conf_t *cf, ngx_str_t *name, ngx_pool_t *pool,
    ngx_str_t *out)
{
    u_char           *p;
    size_t            size, left;
    ssize_t           n;
    ngx_fd_t          fd;
    ngx_int_t         rc;
    ngx_file_info_t   fi;

    fd = ngx_open_file(name->data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "chat_jwt_key: " ngx_open_file_n " \"%s\" failed",
                           name->data);
        return NGX_ERROR;
    }

    rc = NGX_ERROR;

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "chat_jwt_key: " ngx_fd_info_n " \"%s\" failed",
                           name->data);
        goto done;
    }

    if (!ngx_is_file(&fi)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_jwt_key: \"%s\" is not a regular file",
                           name->data);
        goto done;
    }

    if (ngx_file_size(&fi) > NGX_CHAT_KEY_FILE_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_jwt_key: \"%s\" is too large", name->data);
        goto done;
    }

    size = (size_t) ngx_file_size(&fi);

    p = ngx_pnalloc(pool, size + 1);
    if (p == NULL) {
        goto done;
    }

    for (left = size; left; left -= n) {
        n = ngx_read_fd(fd, p + size - left, left);

        if (n == -1) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                               "chat_jwt_key: " ngx_read_fd_n " \"%s\" failed",
                               name->data);
            goto done;
        }

        if (n == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "chat_jwt_key: \"%s\" was truncated",
                               name->data);
            goto done;
        }
    }

    out->data = p;
    out->len = size;

    rc = NGX_OK;

done:

    if (ngx_close_file(fd) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_ALERT, cf, ngx_errno,
                           "chat_jwt_key: " ngx_close_file_n " \"%s\" failed",
                           name->data);
    }

    return rc;
}


static char *
ngx_chat_auth_set_secret(ngx_conf_t *cf, ngx_chat_jwt_key_t *key,
    ngx_str_t *name, ngx_str_t *data)
{
    /* one trailing newline, so that "echo secret > file" works as well */

    if (data->len && data->data[data->len - 1] == LF) {
        data->len--;

        if (data->len && data->data[data->len - 1] == CR) {
            data->len--;
        }
    }

    if (data->len < NGX_CHAT_JWT_HS256_MIN) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_jwt_key: HS256 secret in \"%V\" must be "
                           "at least 32 bytes", name);
        return NGX_CONF_ERROR;
    }

    key->secret = *data;

    return NGX_CONF_OK;
}


static char *
ngx_chat_auth_set_pkey(ngx_conf_t *cf, ngx_chat_main_conf_t *cmcf,
    ngx_chat_jwt_key_t *key, ngx_str_t *name, ngx_str_t *data)
{
    char                 err[256];
    EVP_PKEY            *pkey;
    unsigned long        e;
    ngx_pool_cleanup_t  *cln;

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        return NGX_CONF_ERROR;
    }

    pkey = ngx_chat_auth_load_pkey(data);

    if (pkey == NULL) {
        e = ERR_peek_last_error();

        if (e) {
            ERR_error_string_n(e, err, sizeof(err));

        } else {
            ngx_cpystrn((u_char *) err, (u_char *) "unknown", sizeof(err));
        }

        ERR_clear_error();

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_jwt_key: no PEM public key or certificate "
                           "in \"%V\" (SSL: %s)", name, err);
        return NGX_CONF_ERROR;
    }

    if (ngx_chat_auth_check_pkey(cf, cmcf->jwt_alg, pkey, name) != NGX_OK) {
        EVP_PKEY_free(pkey);
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_chat_auth_pkey_cleanup;
    cln->data = pkey;

    key->pkey = pkey;

    return NGX_CONF_OK;
}


static EVP_PKEY *
ngx_chat_auth_load_pkey(ngx_str_t *data)
{
    BIO       *bio;
    X509      *x509;
    EVP_PKEY  *pkey;

    bio = BIO_new_mem_buf(data->data, (int) data->len);
    if (bio == NULL) {
        return NULL;
    }

    pkey = PEM_read_bio_PUBKEY(bio, NULL, ngx_chat_auth_no_password, NULL);

    BIO_free(bio);

    if (pkey) {
        return pkey;
    }

    bio = BIO_new_mem_buf(data->data, (int) data->len);
    if (bio == NULL) {
        return NULL;
    }

    x509 = PEM_read_bio_X509(bio, NULL, ngx_chat_auth_no_password, NULL);

    BIO_free(bio);

    if (x509 == NULL) {
        return NULL;
    }

    /* the failed attempt to read a bare public key is no error now */
    ERR_clear_error();

    pkey = X509_get_pubkey(x509);

    X509_free(x509);

    return pkey;
}


static int
ngx_chat_auth_no_password(char *buf, int size, int rwflag, void *data)
{
    /* never prompt on the terminal: a public key needs no passphrase */
    return 0;
}


static ngx_int_t
ngx_chat_auth_check_pkey(ngx_conf_t *cf, ngx_uint_t alg, EVP_PKEY *pkey,
    ngx_str_t *name)
{
    int     bits;
    char    group[64];
    size_t  len;

    if (alg == NGX_CHAT_JWT_RS256) {

        if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_RSA) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "chat_jwt_key: RS256 needs an RSA public key, "
                               "\"%V\" has another type", name);
            return NGX_ERROR;
        }

        bits = EVP_PKEY_get_bits(pkey);

        if (bits < NGX_CHAT_JWT_RSA_MIN_BITS) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "chat_jwt_key: RSA key in \"%V\" has %d bits, "
                               "at least 2048 are required", name, bits);
            return NGX_ERROR;
        }

        return NGX_OK;
    }

    if (EVP_PKEY_get_base_id(pkey) != EVP_PKEY_EC
        || EVP_PKEY_get_group_name(pkey, group, sizeof(group), &len) != 1
        || OBJ_txt2nid(group) != NID_X9_62_prime256v1)
    {
        ERR_clear_error();
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "chat_jwt_key: ES256 needs an EC P-256 public key, "
                           "\"%V\" has another type", name);
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_chat_auth_pkey_cleanup(void *data)
{
    EVP_PKEY_free(data);
}


ngx_int_t
ngx_chat_auth_verify(ngx_str_t *token, ngx_pool_t *pool,
    ngx_chat_identity_t *id, const char **code, const char **msg)
{
    u_char                *p;
    json_t                *claims;
    ngx_int_t              rc;
    ngx_str_t              input, seg[3], dec[3];
    ngx_uint_t             i;
    json_error_t           err;
    ngx_chat_jwt_key_t    *key;
    ngx_chat_main_conf_t  *cmcf;
    u_char                 buf[NGX_CHAT_JWT_DECODED_MAX];

    *code = "unauthorized";

    cmcf = ngx_chat_auth_conf();

    if (cmcf == NULL || ngx_chat_auth_ready(cmcf) != NGX_OK) {
        *msg = "authentication is not configured";
        return NGX_DECLINED;
    }

    if (ngx_chat_jwt_split(token, seg) != NGX_OK) {
        *msg = "malformed token";
        goto declined;
    }

    /* decoded on the stack: a long-lived connection's pool must not grow */

    p = buf;

    for (i = 0; i < 3; i++) {
        dec[i].data = p;

        if (ngx_decode_base64url(&dec[i], &seg[i]) != NGX_OK) {
            *msg = "malformed token";
            goto declined;
        }

        p += dec[i].len;
    }

    if (ngx_chat_jwt_check_header(cmcf, &dec[0], &key, msg) != NGX_OK) {
        goto declined;
    }

    input.data = token->data;
    input.len = seg[1].data + seg[1].len - token->data;

    rc = ngx_chat_jwt_check_signature(cmcf, key, &input, &dec[2]);

    if (rc == NGX_ERROR) {
        *code = "internal";
        *msg = "internal error";
        return NGX_ERROR;
    }

    if (rc != NGX_OK) {
        *msg = "bad signature";
        goto declined;
    }

    /* the claims are parsed only once they are known to be authentic */

    claims = json_loadb((char *) dec[1].data, dec[1].len,
                        JSON_REJECT_DUPLICATES, &err);
    if (claims == NULL) {
        *msg = "malformed token";
        goto declined;
    }

    rc = ngx_chat_jwt_check_claims(cmcf, claims, pool, id, code, msg);

    json_decref(claims);

    if (rc == NGX_OK) {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                       "chat jwt accepted for \"%V\"", &id->user);
        return NGX_OK;
    }

    if (rc == NGX_ERROR) {
        *code = "internal";
        *msg = "internal error";
        return NGX_ERROR;
    }

declined:

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, ngx_cycle->log, 0,
                   "chat jwt rejected: %s", *msg);

    return NGX_DECLINED;
}


static ngx_chat_main_conf_t *
ngx_chat_auth_conf(void)
{
    return ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_chat_module);
}


/* the keys were all loaded or the configuration failed: one tells */

static ngx_int_t
ngx_chat_auth_ready(ngx_chat_main_conf_t *cmcf)
{
    ngx_chat_jwt_key_t  *key;

    if (cmcf->jwt_keys == NULL || cmcf->jwt_keys->nelts == 0) {
        return NGX_DECLINED;
    }

    key = cmcf->jwt_keys->elts;

    switch (cmcf->jwt_alg) {

    case NGX_CHAT_JWT_HS256:
        return key[0].secret.len ? NGX_OK : NGX_DECLINED;

    case NGX_CHAT_JWT_RS256:
    case NGX_CHAT_JWT_ES256:
        return key[0].pkey ? NGX_OK : NGX_DECLINED;

    default:
        return NGX_DECLINED;
    }
}


static ngx_int_t
ngx_chat_jwt_split(ngx_str_t *token, ngx_str_t *seg)
{
    u_char      *p, *start, *last;
    ngx_uint_t   n;

    if (token->len == 0 || token->len > NGX_CHAT_JWT_MAX_LEN) {
        return NGX_DECLINED;
    }

    n = 0;
    start = token->data;
    last = token->data + token->len;

    for (p = start; /* void */; p++) {

        if (p < last && *p != '.') {
            continue;
        }

        if (n == 3) {
            return NGX_DECLINED;
        }

        seg[n].data = start;
        seg[n].len = p - start;

        if (ngx_chat_base64url_valid(&seg[n]) != NGX_OK) {
            return NGX_DECLINED;
        }

        n++;

        if (p == last) {
            break;
        }

        start = p + 1;
    }

    return (n == 3) ? NGX_OK : NGX_DECLINED;
}


/*
 * Unpadded base64url only, and in canonical form: the unused low bits of
 * the last character must be zero, so that one token has one spelling.
 */

static ngx_int_t
ngx_chat_base64url_valid(ngx_str_t *s)
{
    size_t     i;
    ngx_int_t  v;

    if (s->len == 0 || s->len % 4 == 1) {
        return NGX_DECLINED;
    }

    v = 0;

    for (i = 0; i < s->len; i++) {
        v = ngx_chat_base64url_value(s->data[i]);

        if (v < 0) {
            return NGX_DECLINED;
        }
    }

    switch (s->len % 4) {

    case 2:
        return (v & 0x0f) ? NGX_DECLINED : NGX_OK;

    case 3:
        return (v & 0x03) ? NGX_DECLINED : NGX_OK;

    default:
        return NGX_OK;
    }
}


static ngx_int_t
ngx_chat_base64url_value(u_char c)
{
    if (c >= 'A' && c <= 'Z') {
        return c - 'A';
    }

    if (c >= 'a' && c <= 'z') {
        return c - 'a' + 26;
    }

    if (c >= '0' && c <= '9') {
        return c - '0' + 52;
    }

    if (c == '-') {
        return 62;
    }

    if (c == '_') {
        return 63;
    }

    return -1;
}


static ngx_int_t
ngx_chat_jwt_check_header(ngx_chat_main_conf_t *cmcf, ngx_str_t *header,
    ngx_chat_jwt_key_t **key, const char **msg)
{
    json_t        *root, *v;
    ngx_str_t     *alg;
    ngx_int_t      rc;
    json_error_t   err;

    root = json_loadb((char *) header->data, header->len,
                      JSON_REJECT_DUPLICATES, &err);
    if (root == NULL) {
        *msg = "malformed token";
        return NGX_DECLINED;
    }

    rc = NGX_DECLINED;

    if (!json_is_object(root)) {
        *msg = "malformed token";
        goto done;
    }

    /* the algorithm comes from the configuration, never from the token */

    alg = &ngx_chat_jwt_alg_names[cmcf->jwt_alg];
    v = json_object_get(root, "alg");

    if (v == NULL || !json_is_string(v)) {
        *msg = "malformed token";
        goto done;
    }

    if (json_string_length(v) != alg->len
        || ngx_strncmp(json_string_value(v), alg->data, alg->len) != 0)
    {
        *msg = "algorithm not allowed";
        goto done;
    }

    v = json_object_get(root, "typ");

    if (v != NULL
        && (!json_is_string(v)
            || json_string_length(v) != 3
            || ngx_strncasecmp((u_char *) json_string_value(v),
                               (u_char *) "JWT", 3) != 0))
    {
        *msg = "bad token type";
        goto done;
    }

    if (json_object_get(root, "crit") != NULL) {
        *msg = "critical header not supported";
        goto done;
    }

    rc = ngx_chat_jwt_select_key(cmcf, json_object_get(root, "kid"), key,
                                 msg);

done:

    json_decref(root);

    return rc;
}


/*
 * Which keys may verify the token.  With kids configured, a token's kid
 * names the one key to try, and a token without a kid may use only the
 * keys without one: retiring a key by its kid then really retires it.
 * With no kid configured (the one-key form) a token's kid is not looked
 * at, as before keys had kids.
 *
 * *key is the key to use, or NULL for all the keys without a kid.
 */

static ngx_int_t
ngx_chat_jwt_select_key(ngx_chat_main_conf_t *cmcf, json_t *kid,
    ngx_chat_jwt_key_t **key, const char **msg)
{
    size_t               len;
    ngx_uint_t           i;
    const char          *name;
    ngx_chat_jwt_key_t  *k;

    *key = NULL;

    if (cmcf->jwt_kids == 0) {
        return NGX_OK;
    }

    if (kid == NULL) {

        if (cmcf->jwt_kids == cmcf->jwt_keys->nelts) {
            *msg = "key id required";
            return NGX_DECLINED;
        }

        return NGX_OK;
    }

    if (!json_is_string(kid)) {
        *msg = "bad key id";
        return NGX_DECLINED;
    }

    name = json_string_value(kid);
    len = json_string_length(kid);

    k = cmcf->jwt_keys->elts;

    for (i = 0; i < cmcf->jwt_keys->nelts; i++) {

        if (k[i].kid.len && k[i].kid.len == len
            && ngx_memcmp(k[i].kid.data, name, len) == 0)
        {
            *key = &k[i];
            return NGX_OK;
        }
    }

    *msg = "unknown key id";

    return NGX_DECLINED;
}


/* key NULL: any key without a kid that the signature verifies with */

static ngx_int_t
ngx_chat_jwt_check_signature(ngx_chat_main_conf_t *cmcf,
    ngx_chat_jwt_key_t *key, ngx_str_t *input, ngx_str_t *sig)
{
    ngx_int_t            rc;
    ngx_uint_t           i;
    ngx_chat_jwt_key_t  *k;

    if (key != NULL) {
        return ngx_chat_jwt_verify_key(cmcf->jwt_alg, key, input, sig);
    }

    rc = NGX_DECLINED;
    k = cmcf->jwt_keys->elts;

    for (i = 0; i < cmcf->jwt_keys->nelts; i++) {

        if (k[i].kid.len) {
            continue;
        }

        rc = ngx_chat_jwt_verify_key(cmcf->jwt_alg, &k[i], input, sig);

        if (rc != NGX_DECLINED) {
            return rc;
        }
    }

    return rc;
}


static ngx_int_t
ngx_chat_jwt_verify_key(ngx_uint_t alg, ngx_chat_jwt_key_t *key,
    ngx_str_t *input, ngx_str_t *sig)
{
    switch (alg) {

    case NGX_CHAT_JWT_HS256:
        return ngx_chat_jwt_verify_hs256(key, input, sig);

    case NGX_CHAT_JWT_RS256:
        if (sig->len != (size_t) EVP_PKEY_get_size(key->pkey)) {
            return NGX_DECLINED;
        }

        return ngx_chat_jwt_digest_verify(key->pkey, input, sig->data,
                                          sig->len);

    default: /* NGX_CHAT_JWT_ES256 */
        return ngx_chat_jwt_verify_es256(key, input, sig);
    }
}


static ngx_int_t
ngx_chat_jwt_verify_hs256(ngx_chat_jwt_key_t *key, ngx_str_t *input,
    ngx_str_t *sig)
{
    unsigned int  len;
    u_char        mac[EVP_MAX_MD_SIZE];

    if (sig->len != NGX_CHAT_JWT_HS256_LEN) {
        return NGX_DECLINED;
    }

    if (HMAC(EVP_sha256(), key->secret.data, (int) key->secret.len,
             input->data, input->len, mac, &len)
        == NULL)
    {
        ERR_clear_error();
        ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0, "HMAC() failed");
        return NGX_ERROR;
    }

    if (len != NGX_CHAT_JWT_HS256_LEN
        || CRYPTO_memcmp(mac, sig->data, NGX_CHAT_JWT_HS256_LEN) != 0)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}


/*
 * JWS carries an ECDSA signature as the raw 32-byte R and S values
 * (RFC 7518, 3.4); OpenSSL verifies the DER form.
 */

static ngx_int_t
ngx_chat_jwt_verify_es256(ngx_chat_jwt_key_t *key, ngx_str_t *input,
    ngx_str_t *sig)
{
    int         n;
    u_char     *p;
    BIGNUM     *r, *s;
    ECDSA_SIG  *es;
    u_char      der[80];

    if (sig->len != NGX_CHAT_JWT_ES256_LEN) {
        return NGX_DECLINED;
    }

    r = BN_bin2bn(sig->data, NGX_CHAT_JWT_ES256_LEN / 2, NULL);
    s = BN_bin2bn(sig->data + NGX_CHAT_JWT_ES256_LEN / 2,
                  NGX_CHAT_JWT_ES256_LEN / 2, NULL);
    es = ECDSA_SIG_new();

    if (r == NULL || s == NULL || es == NULL || ECDSA_SIG_set0(es, r, s) != 1)
    {
        BN_free(r);
        BN_free(s);
        ECDSA_SIG_free(es);
        goto failed;
    }

    /* r and s belong to es now */

    n = i2d_ECDSA_SIG(es, NULL);

    if (n <= 0 || (size_t) n > sizeof(der)) {
        ECDSA_SIG_free(es);
        goto failed;
    }

    p = der;
    n = i2d_ECDSA_SIG(es, &p);

    ECDSA_SIG_free(es);

    if (n <= 0) {
        goto failed;
    }

    return ngx_chat_jwt_digest_verify(key->pkey, input, der, n);

failed:

    ERR_clear_error();
    ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0,
                  "chat: ECDSA signature conversion failed");

    return NGX_ERROR;
}


static ngx_int_t
ngx_chat_jwt_digest_verify(EVP_PKEY *pkey, ngx_str_t *input, u_char *sig,
    size_t len)
{
    ngx_int_t    rc;
    EVP_MD_CTX  *ctx;

    ctx = EVP_MD_CTX_new();
    if (ctx == NULL) {
        ERR_clear_error();
        ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0,
                      "EVP_MD_CTX_new() failed");
        return NGX_ERROR;
    }

    rc = NGX_DECLINED;

    if (EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, pkey) == 1
        && EVP_DigestVerify(ctx, sig, len, input->data, input->len) == 1)
    {
        rc = NGX_OK;
    }

    EVP_MD_CTX_free(ctx);

    /* a bad signature must not leave errors for nginx's SSL code to log */
    ERR_clear_error();

    return rc;
}


static ngx_int_t
ngx_chat_jwt_check_claims(ngx_chat_main_conf_t *cmcf, json_t *claims,
    ngx_pool_t *pool, ngx_chat_identity_t *id, const char **code,
    const char **msg)
{
    u_char      *p;
    json_t      *v;
    double       now, exp, nbf, iat;
    size_t       ulen, nlen;
    ngx_uint_t   role;
    const char  *user, *name;

    if (!json_is_object(claims)) {
        *msg = "malformed token";
        return NGX_DECLINED;
    }

    /* a token for another service is refused before anything else */

    if (ngx_chat_jwt_check_iss_aud(cmcf, claims, msg) != NGX_OK) {
        return NGX_DECLINED;
    }

    v = json_object_get(claims, "sub");

    if (v == NULL || !json_is_string(v)) {
        *msg = "missing subject";
        return NGX_DECLINED;
    }

    user = json_string_value(v);
    ulen = json_string_length(v);

    if (ngx_chat_valid_user((u_char *) user, ulen) != NGX_OK) {
        *msg = "bad subject";
        return NGX_DECLINED;
    }

    name = NULL;
    nlen = 0;

    v = json_object_get(claims, "name");

    if (v != NULL && !json_is_null(v)) {

        if (!json_is_string(v)) {
            *msg = "bad name";
            return NGX_DECLINED;
        }

        name = json_string_value(v);
        nlen = json_string_length(v);

        if (ngx_chat_valid_name((u_char *) name, nlen) != NGX_OK) {
            *msg = "bad name";
            return NGX_DECLINED;
        }
    }

    role = NGX_CHAT_ROLE_USER;

    v = json_object_get(claims, "role");

    if (v != NULL) {

        if (!json_is_string(v)) {
            *msg = "bad role";
            return NGX_DECLINED;
        }

        if (ngx_strcmp(json_string_value(v), "service") == 0
            && json_string_length(v) == sizeof("service") - 1)
        {
            role = NGX_CHAT_ROLE_SERVICE;

        } else if (ngx_strcmp(json_string_value(v), "user") != 0
                   || json_string_length(v) != sizeof("user") - 1)
        {
            *msg = "bad role";
            return NGX_DECLINED;
        }
    }

    if (ngx_chat_jwt_time(claims, "exp", &exp) != NGX_OK) {
        *msg = "missing or bad exp";
        return NGX_DECLINED;
    }

    nbf = 0;
    iat = 0;

    if (ngx_chat_jwt_time(claims, "nbf", &nbf) == NGX_ERROR
        || ngx_chat_jwt_time(claims, "iat", &iat) == NGX_ERROR)
    {
        *msg = "malformed token";
        return NGX_DECLINED;
    }

    now = (double) ngx_time();

    if (now > exp + (double) cmcf->jwt_leeway) {
        *code = "token_expired";
        *msg = "token expired";
        return NGX_DECLINED;
    }

    if (now + (double) cmcf->jwt_leeway < nbf) {
        *msg = "token not yet valid";
        return NGX_DECLINED;
    }

    if (iat > now + (double) cmcf->jwt_leeway) {
        *msg = "token issued in the future";
        return NGX_DECLINED;
    }

    p = ngx_pnalloc(pool, ulen + nlen);
    if (p == NULL) {
        return NGX_ERROR;
    }

    id->user.data = p;
    id->user.len = ulen;
    p = ngx_cpymem(p, user, ulen);

    if (nlen) {
        id->name.data = p;
        id->name.len = nlen;
        ngx_memcpy(p, name, nlen);

    } else {
        ngx_str_null(&id->name);
    }

    id->role = role;

    if (exp >= (double) NGX_MAX_TIME_T_VALUE) {
        id->exp = NGX_MAX_TIME_T_VALUE;

    } else {
        id->exp = (time_t) exp;
    }

    return NGX_OK;
}


/*
 * RFC 7519 4.1.1, 4.1.3: "iss" must be the configured issuer, and the
 * configured audience must be "aud" or one of the strings in it.  Values
 * are compared byte for byte: StringOrURI is case-sensitive.
 */

static ngx_int_t
ngx_chat_jwt_check_iss_aud(ngx_chat_main_conf_t *cmcf, json_t *claims,
    const char **msg)
{
    size_t       i;
    json_t      *v, *e;
    ngx_uint_t   found;

    if (cmcf->jwt_issuer.len) {
        v = json_object_get(claims, "iss");

        if (v == NULL || !json_is_string(v)) {
            *msg = "missing or bad iss";
            return NGX_DECLINED;
        }

        if (!ngx_chat_jwt_str_eq(v, &cmcf->jwt_issuer)) {
            *msg = "issuer not accepted";
            return NGX_DECLINED;
        }
    }

    if (cmcf->jwt_audience.len == 0) {
        return NGX_OK;
    }

    v = json_object_get(claims, "aud");

    if (v != NULL && json_is_string(v)) {

        if (ngx_chat_jwt_str_eq(v, &cmcf->jwt_audience)) {
            return NGX_OK;
        }

        *msg = "audience not accepted";
        return NGX_DECLINED;
    }

    if (v == NULL || !json_is_array(v)) {
        *msg = "missing or bad aud";
        return NGX_DECLINED;
    }

    /* a malformed array is refused wherever the audience is in it */

    found = 0;

    for (i = 0; i < json_array_size(v); i++) {
        e = json_array_get(v, i);

        if (!json_is_string(e)) {
            *msg = "missing or bad aud";
            return NGX_DECLINED;
        }

        if (ngx_chat_jwt_str_eq(e, &cmcf->jwt_audience)) {
            found = 1;
        }
    }

    if (!found) {
        *msg = "audience not accepted";
        return NGX_DECLINED;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_chat_jwt_str_eq(json_t *v, ngx_str_t *s)
{
    /* a JSON string may hold a NUL: compare lengths, then bytes */

    return json_string_length(v) == s->len
           && ngx_memcmp(json_string_value(v), s->data, s->len) == 0;
}


/* NGX_DECLINED: absent, NGX_ERROR: not a number */

static ngx_int_t
ngx_chat_jwt_time(json_t *claims, const char *name, double *value)
{
    json_t  *v;

    v = json_object_get(claims, name);

    if (v == NULL) {
        return NGX_DECLINED;
    }

    if (!json_is_number(v)) {
        return NGX_ERROR;
    }

    *value = json_number_value(v);

    return NGX_OK;
}


/* ids travel in JSON, SQL parameters and logs: printable ASCII only */

static ngx_int_t
ngx_chat_valid_user(const u_char *p, size_t len)
{
    size_t  i;

    if (len == 0 || len > NGX_CHAT_MAX_ID_LEN) {
        return NGX_DECLINED;
    }

    for (i = 0; i < len; i++) {
        if (p[i] <= ' ' || p[i] >= 0x7f
            || p[i] == '"' || p[i] == '\'' || p[i] == '\\')
        {
            return NGX_DECLINED;
        }
    }

    return NGX_OK;
}


/* UTF-8 is validated by jansson; C0, DEL and C1 controls are refused */

static ngx_int_t
ngx_chat_valid_name(const u_char *p, size_t len)
{
    size_t  i;

    if (len > NGX_CHAT_NAME_MAX_LEN) {
        return NGX_DECLINED;
    }

    for (i = 0; i < len; i++) {

        if (p[i] < ' ' || p[i] == 0x7f) {
            return NGX_DECLINED;
        }

        if (p[i] == 0xc2 && i + 1 < len && p[i + 1] >= 0x80 && p[i + 1] <= 0x9f)
        {
            return NGX_DECLINED;
        }
    }

    return NGX_OK;
}


ngx_int_t
ngx_chat_auth_request(ngx_http_request_t *r, ngx_chat_identity_t *id,
    const char **code, const char **msg)
{
    u_char                *p, *last;
    ngx_int_t              rc;
    ngx_str_t              token, ticket;
    ngx_table_elt_t       *h;
    ngx_chat_main_conf_t  *cmcf;

    *code = NULL;
    *msg = NULL;

    h = r->headers_in.authorization;

    if (h != NULL) {
        p = h->value.data;
        last = p + h->value.len;

        if (h->value.len < sizeof("Bearer ") - 1
            || ngx_strncasecmp(p, (u_char *) "Bearer ", sizeof("Bearer ") - 1)
               != 0)
        {
            *code = "unauthorized";
            *msg = "unsupported authorization scheme";
            return NGX_DECLINED;
        }

        p += sizeof("Bearer ") - 1;

        while (p < last && *p == ' ') {
            p++;
        }

        token.data = p;
        token.len = last - p;

        return ngx_chat_auth_verify(&token, r->pool, id, code, msg);
    }

    if (ngx_http_arg(r, (u_char *) "ticket", sizeof("ticket") - 1, &ticket)
        != NGX_OK)
    {
        return NGX_DECLINED;
    }

    rc = ngx_chat_ticket_redeem(&ticket, r->pool, id);

    if (rc == NGX_ERROR) {
        *code = "internal";
        *msg = "internal error";
        return NGX_ERROR;
    }

    if (rc != NGX_OK) {
        *code = "unauthorized";
        *msg = "invalid or used ticket";
        return NGX_DECLINED;
    }

    /* the token behind the ticket may have run out in the meantime */

    cmcf = ngx_http_get_module_main_conf(r, ngx_chat_module);

    if (ngx_time() > id->exp + cmcf->jwt_leeway) {
        *code = "token_expired";
        *msg = "token expired";
        return NGX_DECLINED;
    }

    return NGX_OK;
}


ngx_int_t
ngx_chat_origin_allowed(ngx_http_request_t *r)
{
    ngx_uint_t             i;
    ngx_list_part_t       *part;
    ngx_table_elt_t       *h;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_get_module_main_conf(r, ngx_chat_module);

    if (cmcf->origins == NULL || cmcf->origins->nelts == 0) {
        return 1;
    }

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash == 0
            || h[i].key.len != sizeof("Origin") - 1
            || ngx_strncasecmp(h[i].key.data, (u_char *) "Origin",
                               sizeof("Origin") - 1)
               != 0)
        {
            continue;
        }

        /* every Origin line must pass, should a client send several */

        if (!ngx_chat_origin_match(cmcf->origins, &h[i].value)) {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "chat: origin \"%V\" is not allowed",
                          &h[i].value);
            return 0;
        }
    }

    return 1;
}


/*
 * Cross-origin use of REST, SSE and long-poll (the platform's web app is
 * usually on another origin): an allowed Origin is echoed, with
 * Vary: Origin; a disallowed one gets no CORS headers and the browser
 * refuses the answer.  NGX_DONE: a preflight, for
 * ngx_chat_cors_preflight(); NGX_OK otherwise.
 */
ngx_int_t
ngx_chat_cors(ngx_http_request_t *r)
{
    ngx_uint_t             i, n;
    ngx_str_t             *origin;
    ngx_list_part_t       *part;
    ngx_table_elt_t       *h, *acrm;
    ngx_chat_main_conf_t  *cmcf;

    cmcf = ngx_http_get_module_main_conf(r, ngx_chat_module);

    if (cmcf->cors_origins == NULL || cmcf->cors_origins->nelts == 0
        || r->internal)
    {
        /* (an internal redirect has them from the first pass) */
        return NGX_OK;
    }

    /* caches keep one answer per origin, and one for none */
    if (ngx_chat_cors_header(r, "Vary", "Origin", 6) != NGX_OK) {
        return NGX_ERROR;
    }

    origin = NULL;
    acrm = NULL;
    n = 0;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == sizeof("Origin") - 1
            && ngx_strncasecmp(h[i].key.data, (u_char *) "Origin",
                               sizeof("Origin") - 1) == 0)
        {
            origin = &h[i].value;
            n++;

        } else if (h[i].key.len == sizeof("Access-Control-Request-Method") - 1
                   && ngx_strncasecmp(h[i].key.data,
                                      (u_char *) "Access-Control-Request-Method",
                                      sizeof("Access-Control-Request-Method")
                                      - 1) == 0)
        {
            acrm = &h[i];
        }
    }

    if (origin == NULL) {
        return NGX_OK;
    }

    if (n == 1 && ngx_chat_origin_match(cmcf->cors_origins, origin))
    {
        if (ngx_chat_cors_header(r, "Access-Control-Allow-Origin",
                                 (char *) origin->data, origin->len)
            != NGX_OK
            || ngx_chat_cors_header(r, "Access-Control-Expose-Headers",
                                    "Retry-After", 11) != NGX_OK
            || (cmcf->cors_credentials
                && ngx_chat_cors_header(r,
                                        "Access-Control-Allow-Credentials",
                                        "true", 4) != NGX_OK))
        {
            return NGX_ERROR;
        }

        if (acrm && r->method == NGX_HTTP_OPTIONS
            && (ngx_chat_cors_header(r, "Access-Control-Allow-Methods",
                                     "GET, POST, PATCH, DELETE", 24)
                != NGX_OK
                || ngx_chat_cors_header(r, "Access-Control-Allow-Headers",
                                        "Authorization, Content-Type, "
                                        "Last-Event-ID", 42) != NGX_OK
                || ngx_chat_cors_header(r, "Access-Control-Max-Age",
                                        "600", 3) != NGX_OK))
        {
            return NGX_ERROR;
        }

    } else {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "chat: no CORS for origin \"%V\"", origin);
    }

    return (acrm && r->method == NGX_HTTP_OPTIONS) ? NGX_DONE : NGX_OK;
}


/* 204 with what ngx_chat_cors() added: no authentication, no body */

ngx_int_t
ngx_chat_cors_preflight(ngx_http_request_t *r)
{
    ngx_int_t  rc;

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    r->headers_out.status = NGX_HTTP_NO_CONTENT;
    r->headers_out.content_length_n = 0;
    r->header_only = 1;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK) {
        return rc;
    }

    return ngx_http_send_special(r, NGX_HTTP_LAST);
}


static ngx_int_t
ngx_chat_cors_header(ngx_http_request_t *r, char *name, char *value,
    size_t len)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key.data = (u_char *) name;
    h->key.len = ngx_strlen(name);
    h->value.data = (u_char *) value;
    h->value.len = len;

    return NGX_OK;
}


static ngx_int_t
ngx_chat_origin_match(ngx_array_t *origins, ngx_str_t *origin)
{
    ngx_str_t   *o;
    ngx_uint_t   i;

    o = origins->elts;

    for (i = 0; i < origins->nelts; i++) {

        if (o[i].len == 1 && o[i].data[0] == '*') {
            return 1;
        }

        if (o[i].len == origin->len
            && ngx_strncasecmp(o[i].data, origin->data, origin->len) == 0)
        {
            return 1;
        }
    }

    return 0;
}


void
ngx_chat_tickets_init_zone(ngx_chat_tickets_sh_t *t)
{
    ngx_rbtree_init(&t->rbtree, &t->sentinel, ngx_str_rbtree_insert_value);
    ngx_queue_init(&t->expire);
    t->count = 0;

    ngx_rbtree_init(&t->users, &t->users_sentinel,
                    ngx_str_rbtree_insert_value);
}


ngx_int_t
ngx_chat_ticket_issue(ngx_chat_identity_t *id, ngx_pool_t *pool,
    ngx_str_t *ticket, ngx_msec_t *retry_after)
{
    time_t                  now;
    ngx_int_t               rc;
    ngx_str_t               raw;
    ngx_uint_t              max;
    ngx_slab_pool_t        *shpool;
    ngx_chat_tickets_sh_t  *t;
    ngx_chat_main_conf_t   *cmcf;
    u_char                  rnd[NGX_CHAT_TICKET_RAW_LEN];

    *retry_after = 0;

    cmcf = ngx_chat_auth_conf();

    if (cmcf == NULL
        || ngx_chat_worker.sh == NULL || ngx_chat_worker.shpool == NULL)
    {
        return NGX_ERROR;
    }

    if (id->user.len == 0 || id->user.len > NGX_CHAT_MAX_ID_LEN
        || id->name.len > NGX_CHAT_NAME_MAX_LEN)
    {
        return NGX_ERROR;
    }

    if (RAND_bytes(rnd, NGX_CHAT_TICKET_RAW_LEN) != 1) {
        ERR_clear_error();
        ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0, "RAND_bytes() failed");
        return NGX_ERROR;
    }

    ticket->data = ngx_pnalloc(pool,
                               ngx_base64_encoded_length(sizeof(rnd)));
    if (ticket->data == NULL) {
        return NGX_ERROR;
    }

    raw.data = rnd;
    raw.len = sizeof(rnd);

    ngx_encode_base64url(ticket, &raw);

    max = ngx_chat_tickets_max(cmcf);
    now = ngx_time();

    t = &ngx_chat_worker.sh->tickets;
    shpool = ngx_chat_worker.shpool;

    ngx_shmtx_lock(&shpool->mutex);

    rc = ngx_chat_tickets_add_locked(t, shpool, id, ticket, now,
                                     cmcf->ticket_ttl, max, retry_after);

    ngx_shmtx_unlock(&shpool->mutex);

    if (rc == NGX_BUSY) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "chat: %ui live tickets, the most allowed, "
                      "ticket for \"%V\" refused", max, &id->user);

    } else if (rc != NGX_OK) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "chat: no memory for a ticket in the shared zone");
    }

    return rc;
}


/*
 * A user at NGX_CHAT_TICKETS_PER_USER loses its own oldest ticket; a
 * valid ticket of anyone else is never evicted: when the table is full
 * of them, the new ticket is refused (NGX_BUSY) until the oldest one
 * runs out.  Work per call is bounded: one lookup of the user, and at
 * most 3 * NGX_CHAT_TICKETS_EVICT expired tickets and one own freed.
 */

static ngx_int_t
ngx_chat_tickets_add_locked(ngx_chat_tickets_sh_t *t,
    ngx_slab_pool_t *shpool, ngx_chat_identity_t *id, ngx_str_t *ticket,
    time_t now, time_t ttl, ngx_uint_t max, ngx_msec_t *retry_after)
{
    u_char                  *p;
    size_t                   size;
    uint32_t                 hash;
    ngx_queue_t             *q;
    ngx_chat_ticket_user_t  *u;
    ngx_chat_ticket_node_t  *tn, *old;

    ngx_chat_tickets_expire_locked(t, shpool, now,
                                   (t->count >= max) ? NGX_CHAT_TICKETS_EVICT
                                                     : NGX_CHAT_TICKETS_EXPIRE);

    /*
     * allocations first: when they make room by expiring tickets, that
     * must not free the user node held below
     */

    size = offsetof(ngx_chat_ticket_node_t, data)
           + ticket->len + id->user.len + id->name.len;

    tn = ngx_chat_tickets_alloc_locked(t, shpool, size, now);
    if (tn == NULL) {
        return NGX_ERROR;
    }

    hash = ngx_crc32_short(id->user.data, id->user.len);

    u = (ngx_chat_ticket_user_t *) ngx_str_rbtree_lookup(&t->users,
                                                         &id->user, hash);

    if (u == NULL) {
        size = offsetof(ngx_chat_ticket_user_t, data) + id->user.len;

        u = ngx_chat_tickets_alloc_locked(t, shpool, size, now);
        if (u == NULL) {
            ngx_slab_free_locked(shpool, tn);
            return NGX_ERROR;
        }

        ngx_memcpy(u->data, id->user.data, id->user.len);

        u->sn.node.key = hash;
        u->sn.str.len = id->user.len;
        u->sn.str.data = u->data;
        ngx_queue_init(&u->tickets);
        u->count = 0;

        ngx_rbtree_insert(&t->users, &u->sn.node);
    }

    if (u->count >= NGX_CHAT_TICKETS_PER_USER) {

        /* the others of u remain, so u itself is not freed here */

        q = ngx_queue_head(&u->tickets);
        old = ngx_queue_data(q, ngx_chat_ticket_node_t, user_queue);

        ngx_chat_tickets_delete_locked(t, shpool, old);
    }

    if (t->count >= max) {

        /* the expiry above stopped at the head: it is still valid */

        q = ngx_queue_head(&t->expire);
        old = ngx_queue_data(q, ngx_chat_ticket_node_t, queue);

        *retry_after = (ngx_msec_t)
                       ((old->expire >= now) ? old->expire - now + 1 : 1)
                       * 1000;

        ngx_slab_free_locked(shpool, tn);

        if (u->count == 0) {
            ngx_rbtree_delete(&t->users, &u->sn.node);
            ngx_slab_free_locked(shpool, u);
        }

        return NGX_BUSY;
    }

    tn->sn.node.key = ngx_crc32_short(ticket->data, ticket->len);
    tn->sn.str.len = ticket->len;
    tn->sn.str.data = tn->data;
    tn->user = u;
    tn->expire = now + ttl;
    tn->exp = id->exp;
    tn->role = id->role;
    tn->user_len = (u_short) id->user.len;
    tn->name_len = (u_short) id->name.len;

    p = ngx_cpymem(tn->data, ticket->data, ticket->len);
    p = ngx_cpymem(p, id->user.data, id->user.len);
    ngx_memcpy(p, id->name.data, id->name.len);

    ngx_rbtree_insert(&t->rbtree, &tn->sn.node);
    ngx_queue_insert_tail(&t->expire, &tn->queue);
    ngx_queue_insert_tail(&u->tickets, &tn->user_queue);
    u->count++;
    t->count++;

    return NGX_OK;
}


ngx_int_t
ngx_chat_ticket_redeem(ngx_str_t *ticket, ngx_pool_t *pool,
    ngx_chat_identity_t *id)
{
    u_char                  *p;
    size_t                   ulen, nlen;
    time_t                   now, exp, expire;
    uint32_t                 hash;
    ngx_uint_t               role;
    ngx_str_node_t          *sn;
    ngx_slab_pool_t         *shpool;
    ngx_chat_tickets_sh_t   *t;
    ngx_chat_ticket_node_t  *tn;
    u_char                   buf[NGX_CHAT_MAX_ID_LEN
                                 + NGX_CHAT_NAME_MAX_LEN];

    if (ngx_chat_worker.sh == NULL || ngx_chat_worker.shpool == NULL) {
        return NGX_DECLINED;
    }

    if (ticket->len != NGX_CHAT_TICKET_LEN
        || ngx_chat_base64url_valid(ticket) != NGX_OK)
    {
        return NGX_DECLINED;
    }

    hash = ngx_crc32_short(ticket->data, ticket->len);
    now = ngx_time();

    t = &ngx_chat_worker.sh->tickets;
    shpool = ngx_chat_worker.shpool;

    ngx_shmtx_lock(&shpool->mutex);

    sn = ngx_str_rbtree_lookup(&t->rbtree, ticket, hash);

    if (sn == NULL) {
        ngx_shmtx_unlock(&shpool->mutex);
        return NGX_DECLINED;
    }

    tn = (ngx_chat_ticket_node_t *) sn;

    expire = tn->expire;
    exp = tn->exp;
    role = tn->role;
    ulen = tn->user_len;
    nlen = tn->name_len;

    ngx_memcpy(buf, tn->data + NGX_CHAT_TICKET_LEN, ulen + nlen);

    /* single use: gone whether it is still valid or not */
    ngx_chat_tickets_delete_locked(t, shpool, tn);

    ngx_shmtx_unlock(&shpool->mutex);

    if (now > expire) {
        return NGX_DECLINED;
    }

    p = ngx_pnalloc(pool, ulen + nlen);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(p, buf, ulen + nlen);

    id->user.data = p;
    id->user.len = ulen;

    if (nlen) {
        id->name.data = p + ulen;
        id->name.len = nlen;

    } else {
        ngx_str_null(&id->name);
    }

    id->role = role;
    id->exp = exp;

    return NGX_OK;
}


/* expired tickets only: a valid one is freed by its owner or redeemed */

static void *
ngx_chat_tickets_alloc_locked(ngx_chat_tickets_sh_t *t,
    ngx_slab_pool_t *shpool, size_t size, time_t now)
{
    void  *p;

    p = ngx_slab_alloc_locked(shpool, size);

    if (p != NULL) {
        return p;
    }

    ngx_chat_tickets_expire_locked(t, shpool, now, NGX_CHAT_TICKETS_EVICT);

    return ngx_slab_alloc_locked(shpool, size);
}


static void
ngx_chat_tickets_expire_locked(ngx_chat_tickets_sh_t *t,
    ngx_slab_pool_t *shpool, time_t now, ngx_uint_t n)
{
    ngx_queue_t             *q;
    ngx_chat_ticket_node_t  *tn;

    while (n-- && !ngx_queue_empty(&t->expire)) {

        q = ngx_queue_head(&t->expire);
        tn = ngx_queue_data(q, ngx_chat_ticket_node_t, queue);

        if (now <= tn->expire) {
            return;
        }

        ngx_chat_tickets_delete_locked(t, shpool, tn);
    }
}


static void
ngx_chat_tickets_delete_locked(ngx_chat_tickets_sh_t *t,
    ngx_slab_pool_t *shpool, ngx_chat_ticket_node_t *tn)
{
    ngx_chat_ticket_user_t  *u;

    u = tn->user;

    ngx_queue_remove(&tn->queue);
    ngx_queue_remove(&tn->user_queue);
    ngx_rbtree_delete(&t->rbtree, &tn->sn.node);
    ngx_slab_free_locked(shpool, tn);

    t->count--;

    if (--u->count == 0) {
        ngx_rbtree_delete(&t->users, &u->sn.node);
        ngx_slab_free_locked(shpool, u);
    }
}


/* tickets must not crowd the event ring out of a small zone */

static ngx_uint_t
ngx_chat_tickets_max(ngx_chat_main_conf_t *cmcf)
{
    ngx_uint_t  max;

    if (cmcf->shm_size == 0) {
        return NGX_CHAT_TICKETS_MAX;
    }

    max = cmcf->shm_size / NGX_CHAT_TICKETS_ZONE_SHARE;

    if (max < NGX_CHAT_TICKETS_MIN) {
        return NGX_CHAT_TICKETS_MIN;
    }

    if (max > NGX_CHAT_TICKETS_MAX) {
        return NGX_CHAT_TICKETS_MAX;
    }

    return max;
}
