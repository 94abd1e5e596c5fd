/*
 * chatbench: an open-loop epoll WebSocket load generator for the chat.v1
 * protocol of ngx_chat_module, Nchan and Socket.IO (Engine.IO v4).
 */

#ifndef CB_H
#define CB_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>


#define CB_VERSION          "1"

#define CB_MAX_WORKERS      64
#define CB_MAX_SRC          64
#define CB_MAX_PIDS         64
#define CB_MAX_CONNS_PER_W  19000       /* 20,000 open files per process */
#define CB_ID_LEN           64          /* conversation id / channel / room */

/* log-linear histogram: 1024 linear sub-buckets per power of two, ns */
#define CB_HIST_SUB_BITS    10
#define CB_HIST_SUB         (1 << CB_HIST_SUB_BITS)
#define CB_HIST_MAX_EXP     41          /* values up to 2^41 ns (~36 min) */
#define CB_HIST_BUCKETS     ((CB_HIST_MAX_EXP - CB_HIST_SUB_BITS + 1)       \
                             * CB_HIST_SUB)

#define CB_NS               1000000000ULL
#define CB_MS               1000000ULL


typedef enum {
    CB_MODE_CHAT = 0,
    CB_MODE_NCHAN,
    CB_MODE_SIO
} cb_mode_e;

typedef enum {
    CB_SC_IDLE = 0,
    CB_SC_DM,
    CB_SC_GROUP,
    CB_SC_STORM,
    CB_SC_MIXED
} cb_scenario_e;

typedef enum {
    CB_AUTH_HEADER = 0,
    CB_AUTH_HELLO
} cb_auth_e;


typedef struct {
    uint64_t    n;
    uint64_t    min;
    uint64_t    max;
    double      sum;
    uint64_t    b[CB_HIST_BUCKETS];
} cb_hist_t;


typedef struct {
    cb_mode_e       mode;
    cb_scenario_e   scenario;
    cb_auth_e       auth;

    char            host[64];
    int             port;
    char            path[128];          /* WebSocket path (or prefix) */
    char            api[128];           /* REST prefix, chat mode */

    uint32_t        conns;              /* total connections = users */
    int             workers;
    uint32_t        src[CB_MAX_SRC];    /* source addresses, network order */
    int             nsrc;
    int             pin[CB_MAX_WORKERS];
    int             npin;

    double          rate;               /* messages per second, total */
    double          duration;           /* measured seconds */
    double          warmup;             /* seconds sent before measuring */
    double          drain;              /* max seconds to wait after sends */
    double          hold;               /* idle: seconds to hold */
    double          connect_rate;       /* connects per second, total */
    double          connect_timeout;
    uint32_t        max_pending;        /* handshakes in flight per worker */
    uint32_t        size;               /* message body bytes */
    uint32_t        group_size;
    double          mixed_group_frac;   /* mixed: share of users in groups */
    double          mixed_group_msgs;   /* mixed: share of group messages */
    double          typing_prob;        /* mixed: typing before a message */
    uint32_t        read_every;         /* mixed: read receipt per N msgs */
    int             live;               /* chat: typing, reads, acks in
                                           dm and group too */
    uint32_t        ack_ms;             /* live: an ack at most this often */
    uint32_t        retries;            /* chat: retries of unavailable */
    uint32_t        rest_parallel;      /* chat: REST connections/worker */
    int             rest_keepalive;     /* chat: reuse REST connections */

    char            secret_file[256];
    unsigned char   secret[1024];
    size_t          secret_len;
    int             have_secret;
    uint32_t        token_ttl;
    char            user_prefix[48];
    char            run_id[32];

    pid_t           server_pids[CB_MAX_PIDS];
    int             nserver_pids;
    pid_t           server_ppid;
    char            server_match[128];

    char            out_dir[256];
    char            tag[128];
    int             check;
    int             verbose;
    int             self_echo;          /* sender receives own message */
    int             quickack;           /* diagnostic: TCP_QUICKACK */
    double          cpu_limit;          /* % of a core: above is INVALID */
} cb_opt_t;


/* per worker results, in shared memory, merged by the parent */
typedef struct {
    uint64_t    users;
    uint64_t    conn_ok;
    uint64_t    conn_fail;              /* TCP connect failed */
    uint64_t    hs_fail;                /* upgrade / handshake refused */
    uint64_t    auth_fail;              /* hello / namespace refused */
    uint64_t    conn_timeout;
    uint64_t    disconnects;            /* closed after ready */
    uint64_t    setup_fail;             /* REST conversation create */
    uint64_t    convs;

    uint64_t    sched;                  /* messages scheduled */
    uint64_t    sent;                   /* first transmissions */
    uint64_t    sent_measured;          /* intended inside the window */
    uint64_t    retries;
    uint64_t    acked;
    uint64_t    send_fail;              /* final ok:false */
    uint64_t    unacked;                /* no reply by the end */
    uint64_t    err_unavailable;
    uint64_t    err_rate_limited;
    uint64_t    err_other;
    uint64_t    skipped;                /* sender not connected */

    uint64_t    expected;               /* deliveries expected */
    uint64_t    received;               /* deliveries received (all) */
    uint64_t    unique;
    uint64_t    dup;
    uint64_t    ooo;
    uint64_t    ooo_retry;              /* a retried send after later ones */
    uint64_t    stray;                  /* not a member / unparsable */
    uint64_t    self_recv;
    uint64_t    recv_measured;
    uint64_t    seq_gap;                /* chat: conversation seq gaps */
    uint64_t    seq_back;               /* chat: seq repeated / backwards */

    uint64_t    typing_sent;
    uint64_t    read_sent;
    uint64_t    acks_sent;
    uint64_t    other_events;
    uint64_t    pings;
    uint64_t    bytes_out;
    uint64_t    bytes_in;
    uint64_t    late_sends;             /* sent > 1 ms after intended */

    uint64_t    t_conn_first;           /* CLOCK_MONOTONIC ns */
    uint64_t    t_conn_last;
    uint64_t    t_run_start;
    uint64_t    t_run_end;              /* end of sends */
    uint64_t    t_done;

    double      cpu_connect;            /* CPU seconds, connect phase */
    double      wall_connect;
    double      cpu_run;                /* CPU seconds, run phase */
    double      wall_run;
    long        maxrss_kb;
    int         done;
    char        error[160];

    cb_hist_t   h_e2e;                  /* intended send -> recipient */
    cb_hist_t   h_ack;                  /* intended send -> reply/ack */
    cb_hist_t   h_conn;                 /* connect start -> ready */
    cb_hist_t   h_lag;                  /* intended -> actual write */
} cb_res_t;


/* control messages between parent and workers (pipes) */
typedef struct {
    char        cmd;
    int32_t     worker;
    uint64_t    t;
    uint64_t    a;
    uint64_t    b;
} cb_ctl_t;

#define CB_CTL_SETUP_DONE   'S'
#define CB_CTL_CONNECT      'C'
#define CB_CTL_READY        'R'
#define CB_CTL_RUN          'G'
#define CB_CTL_FINISHED     'F'
#define CB_CTL_ABORT        'X'


/* util.c */
uint64_t cb_now(void);
uint64_t cb_wall_ms(void);
double cb_cpu_seconds(void);
size_t cb_b64url(const unsigned char *in, size_t len, char *out);
size_t cb_b64(const unsigned char *in, size_t len, char *out);
size_t cb_jwt_hs256(const cb_opt_t *o, const char *sub, char *out,
    size_t cap);
void cb_ws_accept(const char *key, char *out);
uint64_t cb_rand(uint64_t *s);
long cb_rss_kb(pid_t pid);
int cb_children(pid_t ppid, pid_t *out, int max);
int cb_match_procs(const char *pattern, pid_t *out, int max);

/* minimal JSON: find the value at a dotted path of object keys */
typedef struct {
    const char *p;
    size_t      len;                    /* raw span; strings w/o quotes */
    int         type;                   /* '"', '{', '[', 'n', 't', 'f', '0' */
} cb_jv_t;

int cb_json_get(const char *p, size_t len, const char *path, cb_jv_t *v);
int cb_jv_eq(const cb_jv_t *v, const char *s);
int64_t cb_jv_int(const cb_jv_t *v);

/* hist.c */
void cb_hist_init(cb_hist_t *h);
void cb_hist_add(cb_hist_t *h, uint64_t v);
void cb_hist_merge(cb_hist_t *d, const cb_hist_t *s);
uint64_t cb_hist_pct(const cb_hist_t *h, double pct);
uint64_t cb_hist_value(uint32_t idx);
uint32_t cb_hist_index(uint64_t v);

/* worker.c */
int cb_worker(const cb_opt_t *o, int w, int ctl_in, int ctl_out,
    cb_res_t *res);

/* helpers shared by main.c and worker.c: topology */
uint32_t cb_unit(const cb_opt_t *o);
void cb_worker_range(const cb_opt_t *o, int w, uint32_t *lo, uint32_t *hi);

#endif /* CB_H */
