/* A duprep wire-protocol client written from docs/protocol.md alone (and, for checks 15-21, the
 * docstring of duprep/apps/conformance.py, which protocol.md 1.14 repeats).  C11, libc only.
 * tests/test_conformance.py builds it and runs it against gateways it starts.  Usage:
 *
 *   client HOST PORT MAX_FRAME HANDSHAKE_S checks [SKIP...]
 *        run every check against a gateway started with --app duprep.apps.conformance:handle;
 *        MAX_FRAME is the gateway's (from duprep status), HANDSHAKE_S its --handshake-timeout.
 *        A check whose name starts with one of the SKIP words (e.g. "16c") still runs but is
 *        reported as KNOWN and not counted.  Exit 0 iff every other check passes.
 *   client HOST PORT 0 0 refusal
 *        against a gateway with --max-clients 2 --max-per-ip 1 (uses source addresses
 *        127.0.0.1-3)
 *   client HOST PORT MAX_FRAME 0 watch
 *        connect as "spec-watcher", print "READY <sid> <generation>" on stdout, then wait (45 s)
 *        for ERROR SHUTTING_DOWN (msgid 0) and EOF while the caller stops the gateway.
 *
 * Every result is one line "PASS|FAIL|KNOWN <check name><TAB><details>"; notes go to stderr.
 * Every read has a deadline; the only sleeps are back-offs between retries and the pacing of a
 * REQUEST written byte by byte (11g).
 */
#define _GNU_SOURCE      /* POLLRDHUP */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- protocol constants (1.4, 1.8) */
enum { T_HELLO = 1, T_REQUEST = 2, T_SEND = 3, T_RELAY = 4, T_CALLME = 5,
       T_WELCOME = 16, T_REPLY = 17, T_DEFERRED = 18, T_PUSH = 19, T_ERROR = 20 };
enum { E_BAD_FRAME = 1, E_FRAME_TOO_LARGE = 2, E_BAD_HELLO = 3, E_BAD_VERSION = 4, E_NAME_TAKEN = 5,
       E_SERVER_FULL = 6, E_TOO_MANY_FROM_IP = 7, E_UNKNOWN_TARGET = 8, E_HANDSHAKE_TIMEOUT = 9,
       E_SHUTTING_DOWN = 10, E_APP_ERROR = 11, E_SLOW_CONSUMER = 12, E_WORKER_LOST = 13 };
#define PROTOCOL_VERSION 1u
#define U64_MAX_WIRE 9223372036854775807ULL
#define MIN_MAX_FRAME 722u
#define RX_LIMIT (1u << 24) /* accept gateway frames up to 16 MiB (1.2) */

static const char *g_host;
static int g_port;
static uint32_t g_expect_mf;
static int g_handshake_s = 5;
static int g_fail, g_pass, g_known;
static char **g_skip; static int g_nskip; /* names of known doc/behaviour mismatches */
/* 1.2: no gateway frame body exceeds max_frame + 260; every frame read is measured (check 22) */
static size_t g_max_body_seen; static unsigned long g_frames_seen, g_oversize;

/* ---------------------------------------------------------------- time */
static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------- reporting */
__attribute__((format(printf, 3, 4))) static int sfmt(char *out, size_t n, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int r = vsnprintf(out, n, fmt, ap);
    va_end(ap);
    return r;
}
static char g_why[1024];
static void why(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_why, sizeof g_why, fmt, ap);
    va_end(ap);
}
static void report(const char *name, int ok) {
    int known = 0;
    for (int i = 0; i < g_nskip; i++) if (!strncmp(name, g_skip[i], strlen(g_skip[i]))) known = 1;
    printf("%s %-34s\t%s\n", known ? "KNOWN" : ok ? "PASS" : "FAIL", name, g_why); /* the tab ends the name */
    fflush(stdout);
    if (known) g_known++; else if (ok) g_pass++; else g_fail++;
    g_why[0] = 0;
}

/* ---------------------------------------------------------------- msgpack encoder */
typedef struct { uint8_t *b; size_t n, cap; } wb;
static void wb_need(wb *w, size_t k) {
    if (w->n + k > w->cap) {
        size_t c = w->cap ? w->cap : 64;
        while (c < w->n + k) c *= 2;
        w->b = realloc(w->b, c);
        if (!w->b) { perror("realloc"); exit(2); }
        w->cap = c;
    }
}
static void wb_u8(wb *w, uint8_t v) { wb_need(w, 1); w->b[w->n++] = v; }
static void wb_be(wb *w, uint64_t v, int bytes) {
    wb_need(w, (size_t)bytes);
    for (int i = bytes - 1; i >= 0; i--) w->b[w->n++] = (uint8_t)(v >> (8 * i));
}
static void wb_raw(wb *w, const void *p, size_t k) { wb_need(w, k); memcpy(w->b + w->n, p, k); w->n += k; }
static void mp_uint(wb *w, uint64_t v) { /* shortest form */
    if (v < 128) wb_u8(w, (uint8_t)v);
    else if (v <= 0xff) { wb_u8(w, 0xcc); wb_be(w, v, 1); }
    else if (v <= 0xffff) { wb_u8(w, 0xcd); wb_be(w, v, 2); }
    else if (v <= 0xffffffffu) { wb_u8(w, 0xce); wb_be(w, v, 4); }
    else { wb_u8(w, 0xcf); wb_be(w, v, 8); }
}
__attribute__((unused)) static void mp_nint(wb *w, int64_t v) { /* v < 0 */
    if (v >= -32) wb_u8(w, (uint8_t)(int8_t)v);
    else { wb_u8(w, 0xd3); wb_be(w, (uint64_t)v, 8); }
}
static void mp_arr(wb *w, uint32_t n) {
    if (n < 16) wb_u8(w, (uint8_t)(0x90 | n));
    else if (n <= 0xffff) { wb_u8(w, 0xdc); wb_be(w, n, 2); }
    else { wb_u8(w, 0xdd); wb_be(w, n, 4); }
}
static void mp_str(wb *w, const char *s, size_t k) {
    if (k < 32) wb_u8(w, (uint8_t)(0xa0 | k));
    else if (k <= 0xff) { wb_u8(w, 0xd9); wb_be(w, k, 1); }
    else if (k <= 0xffff) { wb_u8(w, 0xda); wb_be(w, k, 2); }
    else { wb_u8(w, 0xdb); wb_be(w, k, 4); }
    wb_raw(w, s, k);
}
static void mp_cstr(wb *w, const char *s) { mp_str(w, s, strlen(s)); }
static void mp_bin(wb *w, const void *p, size_t k) {
    if (k <= 0xff) { wb_u8(w, 0xc4); wb_be(w, k, 1); }
    else if (k <= 0xffff) { wb_u8(w, 0xc5); wb_be(w, k, 2); }
    else { wb_u8(w, 0xc6); wb_be(w, k, 4); }
    wb_raw(w, p, k);
}
/* frame = u32 BE length + body (1.2) */
static void fr_begin(wb *w) { w->n = 0; wb_be(w, 0, 4); }
static void fr_end(wb *w) {
    uint32_t L = (uint32_t)(w->n - 4);
    w->b[0] = (uint8_t)(L >> 24); w->b[1] = (uint8_t)(L >> 16); w->b[2] = (uint8_t)(L >> 8); w->b[3] = (uint8_t)L;
}
static void enc_hello(wb *w, uint32_t version, const char *name /* NULL: omit */) {
    fr_begin(w); mp_arr(w, name ? 3 : 2); mp_uint(w, T_HELLO); mp_uint(w, version);
    if (name) mp_cstr(w, name);
    fr_end(w);
}
static void enc_request(wb *w, uint64_t msgid, uint64_t cpid, uint32_t tmo, const void *d, size_t k) {
    fr_begin(w); mp_arr(w, 5); mp_uint(w, T_REQUEST); mp_uint(w, msgid); mp_uint(w, cpid); mp_uint(w, tmo);
    mp_bin(w, d, k); fr_end(w);
}
static void enc_send(wb *w, uint64_t msgid, uint64_t cpid, const void *d, size_t k) {
    fr_begin(w); mp_arr(w, 4); mp_uint(w, T_SEND); mp_uint(w, msgid); mp_uint(w, cpid); mp_bin(w, d, k); fr_end(w);
}
static void enc_relay(wb *w, uint64_t msgid, uint64_t cpid, const char *target, const void *d, size_t k) {
    fr_begin(w); mp_arr(w, 5); mp_uint(w, T_RELAY); mp_uint(w, msgid); mp_uint(w, cpid); mp_cstr(w, target);
    mp_bin(w, d, k); fr_end(w);
}
static void enc_rawbody(wb *w, const uint8_t *body, size_t k) { fr_begin(w); wb_raw(w, body, k); fr_end(w); }

/* ---------------------------------------------------------------- msgpack decoder (generic, any header width) */
enum { MP_NIL, MP_BOOL, MP_UINT, MP_NINT, MP_FLOAT, MP_STR, MP_BIN, MP_ARR, MP_MAP, MP_EXT };
typedef struct mpv {
    int type;
    uint64_t u;   /* MP_UINT, MP_BOOL */
    int64_t i;    /* MP_NINT */
    double f;
    const uint8_t *p; uint32_t len; /* STR, BIN, EXT */
    struct mpv *items; uint32_t n;  /* ARR (n), MAP (2n items) */
} mpv;
static void mpv_free(mpv *v) {
    if (v->type == MP_ARR || v->type == MP_MAP) {
        uint32_t k = v->type == MP_MAP ? 2 * v->n : v->n;
        for (uint32_t j = 0; j < k; j++) mpv_free(&v->items[j]);
        free(v->items);
    }
    v->items = NULL;
}
static uint64_t be(const uint8_t *p, int k) { uint64_t v = 0; for (int j = 0; j < k; j++) v = v << 8 | p[j]; return v; }
/* returns bytes consumed, 0 on error */
static size_t mp_dec(const uint8_t *b, size_t n, mpv *v, int depth) {
    memset(v, 0, sizeof *v);
    if (n < 1 || depth > 32) return 0;
    uint8_t c = b[0];
    size_t h = 1; uint64_t len = 0; int kind = -1; /* for str/bin/arr/map with length */
#define NEED(k) do { if (n < (size_t)(k)) return 0; } while (0)
    if (c <= 0x7f) { v->type = MP_UINT; v->u = c; return 1; }
    if (c >= 0xe0) { v->type = MP_NINT; v->i = (int8_t)c; return 1; }
    if ((c & 0xe0) == 0xa0) { kind = MP_STR; len = c & 0x1f; }
    else if ((c & 0xf0) == 0x90) { kind = MP_ARR; len = c & 0x0f; }
    else if ((c & 0xf0) == 0x80) { kind = MP_MAP; len = c & 0x0f; }
    else switch (c) {
        case 0xc0: v->type = MP_NIL; return 1;
        case 0xc2: case 0xc3: v->type = MP_BOOL; v->u = c & 1; return 1;
        case 0xcc: NEED(2); v->type = MP_UINT; v->u = be(b + 1, 1); return 2;
        case 0xcd: NEED(3); v->type = MP_UINT; v->u = be(b + 1, 2); return 3;
        case 0xce: NEED(5); v->type = MP_UINT; v->u = be(b + 1, 4); return 5;
        case 0xcf: NEED(9); v->type = MP_UINT; v->u = be(b + 1, 8); return 9;
        case 0xd0: NEED(2); v->i = (int8_t)b[1]; goto sint;
        case 0xd1: NEED(3); v->i = (int16_t)be(b + 1, 2); goto sint;
        case 0xd2: NEED(5); v->i = (int32_t)be(b + 1, 4); goto sint;
        case 0xd3: NEED(9); v->i = (int64_t)be(b + 1, 8); goto sint;
        case 0xca: { NEED(5); uint32_t x = (uint32_t)be(b + 1, 4); float f; memcpy(&f, &x, 4); v->type = MP_FLOAT; v->f = f; return 5; }
        case 0xcb: { NEED(9); uint64_t x = be(b + 1, 8); double d; memcpy(&d, &x, 8); v->type = MP_FLOAT; v->f = d; return 9; }
        case 0xd9: NEED(2); kind = MP_STR; len = be(b + 1, 1); h = 2; break;
        case 0xda: NEED(3); kind = MP_STR; len = be(b + 1, 2); h = 3; break;
        case 0xdb: NEED(5); kind = MP_STR; len = be(b + 1, 4); h = 5; break;
        case 0xc4: NEED(2); kind = MP_BIN; len = be(b + 1, 1); h = 2; break;
        case 0xc5: NEED(3); kind = MP_BIN; len = be(b + 1, 2); h = 3; break;
        case 0xc6: NEED(5); kind = MP_BIN; len = be(b + 1, 4); h = 5; break;
        case 0xdc: NEED(3); kind = MP_ARR; len = be(b + 1, 2); h = 3; break;
        case 0xdd: NEED(5); kind = MP_ARR; len = be(b + 1, 4); h = 5; break;
        case 0xde: NEED(3); kind = MP_MAP; len = be(b + 1, 2); h = 3; break;
        case 0xdf: NEED(5); kind = MP_MAP; len = be(b + 1, 4); h = 5; break;
        case 0xd4: NEED(3); v->type = MP_EXT; v->p = b + 2; v->len = 1; return 3;
        case 0xd5: NEED(4); v->type = MP_EXT; v->p = b + 2; v->len = 2; return 4;
        case 0xd6: NEED(6); v->type = MP_EXT; v->p = b + 2; v->len = 4; return 6;
        case 0xd7: NEED(10); v->type = MP_EXT; v->p = b + 2; v->len = 8; return 10;
        case 0xd8: NEED(18); v->type = MP_EXT; v->p = b + 2; v->len = 16; return 18;
        case 0xc7: NEED(3); len = be(b + 1, 1); NEED(3 + len); v->type = MP_EXT; v->p = b + 3; v->len = (uint32_t)len; return 3 + len;
        case 0xc8: NEED(4); len = be(b + 1, 2); NEED(4 + len); v->type = MP_EXT; v->p = b + 4; v->len = (uint32_t)len; return 4 + len;
        case 0xc9: NEED(6); len = be(b + 1, 4); NEED(6 + len); v->type = MP_EXT; v->p = b + 6; v->len = (uint32_t)len; return 6 + len;
        default: return 0; /* 0xc1 never used */
    }
    if (kind == MP_STR || kind == MP_BIN) {
        NEED(h + len);
        v->type = kind; v->p = b + h; v->len = (uint32_t)len;
        return h + len;
    }
    /* array / map */
    {
        uint64_t k = kind == MP_MAP ? 2 * len : len;
        if (k > n) return 0; /* each element needs >= 1 byte */
        v->type = kind; v->n = (uint32_t)len;
        v->items = k ? calloc(k, sizeof(mpv)) : NULL;
        size_t off = h;
        for (uint64_t j = 0; j < k; j++) {
            size_t m = mp_dec(b + off, n - off, &v->items[j], depth + 1);
            if (!m) { mpv_free(v); return 0; }
            off += m;
        }
        return off;
    }
sint:
    if (v->i >= 0) { v->type = MP_UINT; v->u = (uint64_t)v->i; }
    else v->type = MP_NINT;
    return c == 0xd0 ? 2 : c == 0xd1 ? 3 : c == 0xd2 ? 5 : 9;
#undef NEED
}

static int utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        int k; uint32_t cp;
        if (c < 0x80) { i++; continue; }
        else if ((c & 0xe0) == 0xc0) { k = 1; cp = c & 0x1f; }
        else if ((c & 0xf0) == 0xe0) { k = 2; cp = c & 0x0f; }
        else if ((c & 0xf8) == 0xf0) { k = 3; cp = c & 0x07; }
        else return 0;
        for (int j = 1; j <= k; j++) { if (i + j >= n || (s[i + j] & 0xc0) != 0x80) return 0; cp = cp << 6 | (s[i + j] & 0x3f); }
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        i += (size_t)k + 1;
    }
    return 1;
}

/* ---------------------------------------------------------------- gateway frames */
typedef struct {
    int tag;
    uint64_t msgid, cpid;
    uint32_t version, sid, gen, max_frame, code;
    char *str; size_t slen;   /* WELCOME name, PUSH source, ERROR message (NUL-terminated copy) */
    uint8_t *data; size_t dlen; /* REPLY/PUSH data (copy) */
    size_t body_len;
    int nfields;              /* elements in the array, tag included */
} gwf;
static void gwf_free(gwf *f) { free(f->str); free(f->data); memset(f, 0, sizeof *f); }
static const char *tagname(int t) {
    switch (t) { case T_WELCOME: return "WELCOME"; case T_REPLY: return "REPLY"; case T_DEFERRED: return "DEFERRED";
    case T_PUSH: return "PUSH"; case T_ERROR: return "ERROR"; default: return "?"; }
}
static int get_uint(const mpv *v, uint64_t max, uint64_t *out) {
    if (v->type != MP_UINT || v->u > max) return 0;
    *out = v->u; return 1;
}
static int get_str(const mpv *v, char **out, size_t *len) {
    if (v->type != MP_STR || !utf8_valid(v->p, v->len)) return 0;
    *out = malloc(v->len + 1); memcpy(*out, v->p, v->len); (*out)[v->len] = 0; *len = v->len; return 1;
}
static int get_bin(const mpv *v, uint8_t **out, size_t *len) {
    if (v->type != MP_BIN) return 0;
    *out = malloc(v->len ? v->len : 1); memcpy(*out, v->p, v->len); *len = v->len; return 1;
}
/* decode one gateway frame body; returns 1 ok, 0 malformed (err set) */
static int gw_decode(const uint8_t *b, size_t n, gwf *f, char *err, size_t errn) {
    memset(f, 0, sizeof *f);
    f->body_len = n;
    mpv v; size_t m = mp_dec(b, n, &v, 0);
    if (!m) { sfmt(err, errn, "body is not msgpack"); return 0; }
    if (m != n) { sfmt(err, errn, "%zu trailing bytes after msgpack value", n - m); mpv_free(&v); return 0; }
    int ok = 0; uint64_t t;
    if (v.type != MP_ARR || v.n < 1 || !get_uint(&v.items[0], 0xffffffffu, &t)) { sfmt(err, errn, "not an array with an integer tag"); goto out; }
    f->tag = (int)t; f->nfields = (int)v.n;
    mpv *it = v.items;
    uint64_t x;
#define NF(k) do { if (v.n < (k)) { sfmt(err, errn, "%s has %u elements, need %d", tagname(f->tag), v.n, (k)); goto out; } } while (0)
#define U(i, max, dst) do { if (!get_uint(&it[i], max, &x)) { sfmt(err, errn, "%s field %d not an int in range", tagname(f->tag), i); goto out; } dst = x; } while (0)
    switch (f->tag) {
    case T_WELCOME:
        NF(6); U(1, 0xffffffffu, f->version); U(2, 0xffffffffu, f->sid); U(3, 0xffffffffu, f->gen);
        if (!get_str(&it[4], &f->str, &f->slen)) { sfmt(err, errn, "WELCOME name not a valid str"); goto out; }
        U(5, 0xffffffffu, f->max_frame); break;
    case T_REPLY:
        NF(4); U(1, U64_MAX_WIRE, f->msgid); U(2, U64_MAX_WIRE, f->cpid);
        if (!get_bin(&it[3], &f->data, &f->dlen)) { sfmt(err, errn, "REPLY data not bin"); goto out; }
        break;
    case T_DEFERRED:
        NF(3); U(1, U64_MAX_WIRE, f->msgid); U(2, U64_MAX_WIRE, f->cpid); break;
    case T_PUSH:
        NF(4); U(1, U64_MAX_WIRE, f->cpid);
        if (!get_str(&it[2], &f->str, &f->slen)) { sfmt(err, errn, "PUSH source not a valid str"); goto out; }
        if (!get_bin(&it[3], &f->data, &f->dlen)) { sfmt(err, errn, "PUSH data not bin"); goto out; }
        break;
    case T_ERROR:
        NF(5); U(1, U64_MAX_WIRE, f->msgid); U(2, U64_MAX_WIRE, f->cpid); U(3, 0xffffffffu, f->code);
        if (!get_str(&it[4], &f->str, &f->slen)) { sfmt(err, errn, "ERROR message not a valid str"); goto out; }
        break;
    default:
        sfmt(err, errn, "unknown gateway tag %d", f->tag); goto out;
    }
#undef NF
#undef U
    ok = 1;
out:
    mpv_free(&v);
    if (!ok) gwf_free(f);
    return ok;
}

/* ---------------------------------------------------------------- connection */
typedef struct { int fd; uint8_t *buf; size_t len, cap; } conn;
enum { RD_FRAME = 1, RD_TIMEOUT = 0, RD_EOF = -1, RD_EOF_PARTIAL = -2, RD_ERR = -3, RD_BAD = -4, RD_TOOBIG = -5 };
static const char *rdname(int r) {
    switch (r) { case RD_FRAME: return "frame"; case RD_TIMEOUT: return "timeout (no frame)"; case RD_EOF: return "EOF";
    case RD_EOF_PARTIAL: return "EOF inside a frame"; case RD_ERR: return "read error/reset"; case RD_BAD: return "undecodable frame";
    case RD_TOOBIG: return "frame above 16 MiB"; default: return "?"; }
}
static char g_rderr[256];
static int g_rcvbuf; /* if set, SO_RCVBUF for the next conn_open */

static int conn_open(conn *c) {
    memset(c, 0, sizeof *c);
    c->fd = -1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    if (g_rcvbuf) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &g_rcvbuf, sizeof g_rcvbuf);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)g_port) };
    inet_pton(AF_INET, g_host, &a.sin_addr);
    /* non-blocking connect with a deadline */
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
    int r = connect(fd, (struct sockaddr *)&a, sizeof a);
    if (r < 0 && errno != EINPROGRESS) { close(fd); return -1; }
    if (r < 0) {
        struct pollfd p = { fd, POLLOUT, 0 };
        if (poll(&p, 1, 5000) != 1) { close(fd); return -1; }
        int e = 0; socklen_t el = sizeof e;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &el);
        if (e) { close(fd); errno = e; return -1; }
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->cap = 65536; c->buf = malloc(c->cap);
    return 0;
}
static void conn_close(conn *c) {
    if (c->fd >= 0) { shutdown(c->fd, SHUT_RDWR); close(c->fd); }
    free(c->buf); memset(c, 0, sizeof *c); c->fd = -1;
}
/* write everything within timeout_ms; 0 ok, -1 error */
static int conn_write(conn *c, const void *p, size_t n, int timeout_ms) {
    const uint8_t *b = p; int64_t dl = now_ms() + timeout_ms;
    while (n) {
        ssize_t k = send(c->fd, b, n, MSG_NOSIGNAL);
        if (k > 0) { b += k; n -= (size_t)k; continue; }
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
        int left = (int)(dl - now_ms());
        if (left <= 0) return -1;
        struct pollfd pf = { c->fd, POLLOUT, 0 };
        poll(&pf, 1, left);
    }
    return 0;
}
static int conn_send(conn *c, const wb *w) { return conn_write(c, w->b, w->n, 5000); }
/* read one frame with deadline; on RD_FRAME fills f */
static int conn_read(conn *c, gwf *f, int timeout_ms) {
    int64_t dl = now_ms() + timeout_ms;
    g_rderr[0] = 0;
    for (;;) {
        if (c->len >= 4) {
            uint32_t L = (uint32_t)be(c->buf, 4);
            if (L > RX_LIMIT) return RD_TOOBIG;
            if (c->len >= 4 + (size_t)L) {
                g_frames_seen++;
                if (L > g_max_body_seen) g_max_body_seen = L;
                if (g_expect_mf && L > (size_t)g_expect_mf + 260) g_oversize++;
                int ok = gw_decode(c->buf + 4, L, f, g_rderr, sizeof g_rderr);
                memmove(c->buf, c->buf + 4 + L, c->len - 4 - L);
                c->len -= 4 + L;
                return ok ? RD_FRAME : RD_BAD;
            }
            if (4 + (size_t)L > c->cap) { c->cap = 4 + (size_t)L; c->buf = realloc(c->buf, c->cap); }
        }
        if (c->len == c->cap) { c->cap *= 2; c->buf = realloc(c->buf, c->cap); }
        int left = (int)(dl - now_ms());
        if (left < 0) left = 0;
        struct pollfd pf = { c->fd, POLLIN, 0 };
        int pr = poll(&pf, 1, left);
        if (pr == 0) return RD_TIMEOUT;
        if (pr < 0) { if (errno == EINTR) continue; return RD_ERR; }
        ssize_t k = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
        if (k == 0) return c->len ? RD_EOF_PARTIAL : RD_EOF;
        if (k < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            sfmt(g_rderr, sizeof g_rderr, "%s", strerror(errno));
            return RD_ERR;
        }
        c->len += (size_t)k;
    }
}
static void describe(const gwf *f, char *out, size_t n) {
    switch (f->tag) {
    case T_WELCOME: sfmt(out, n, "WELCOME(v=%u sid=%u gen=%u name='%s' max_frame=%u)", f->version, f->sid, f->gen, f->str, f->max_frame); break;
    case T_REPLY: sfmt(out, n, "REPLY(msgid=%llu cpid=%llu %zu bytes)", (unsigned long long)f->msgid, (unsigned long long)f->cpid, f->dlen); break;
    case T_DEFERRED: sfmt(out, n, "DEFERRED(msgid=%llu cpid=%llu)", (unsigned long long)f->msgid, (unsigned long long)f->cpid); break;
    case T_PUSH: sfmt(out, n, "PUSH(cpid=%llu source='%s' %zu bytes)", (unsigned long long)f->cpid, f->str, f->dlen); break;
    case T_ERROR: sfmt(out, n, "ERROR(msgid=%llu cpid=%llu code=%u '%s')", (unsigned long long)f->msgid, (unsigned long long)f->cpid, f->code, f->str); break;
    default: sfmt(out, n, "tag %d", f->tag);
    }
}

/* ---------------------------------------------------------------- helpers for checks */
static uint64_t g_msgid = 1; /* never 0 (1.4) */
static const uint64_t CPID = 4242;

/* connect + HELLO(+name) + WELCOME; returns 0 ok; fills welcome */
static int handshake(conn *c, const char *name, gwf *welcome) {
    gwf tmp; if (!welcome) welcome = &tmp;
    if (conn_open(c) < 0) { why("connect: %s", strerror(errno)); return -1; }
    wb w = {0}; enc_hello(&w, PROTOCOL_VERSION, name ? name : "");
    int r = conn_send(c, &w); free(w.b);
    if (r < 0) { why("write HELLO failed"); conn_close(c); return -1; }
    r = conn_read(c, welcome, 5000);
    if (r != RD_FRAME) { why("no WELCOME: %s %s", rdname(r), g_rderr); conn_close(c); return -1; }
    if (welcome->tag != T_WELCOME) { char d[512]; describe(welcome, d, sizeof d); why("expected WELCOME, got %s", d); gwf_free(welcome); conn_close(c); return -1; }
    if (welcome == &tmp) gwf_free(&tmp);
    return 0;
}
/* wait for an answer (REPLY/ERROR/DEFERRED) with this msgid, skipping pushes; 1 found */
static int wait_answer(conn *c, uint64_t msgid, gwf *f, int timeout_ms) {
    int64_t dl = now_ms() + timeout_ms;
    for (;;) {
        int left = (int)(dl - now_ms());
        if (left < 0) left = 0;
        int r = conn_read(c, f, left);
        if (r != RD_FRAME) { why("no answer for msgid %llu: %s %s", (unsigned long long)msgid, rdname(r), g_rderr); return 0; }
        if (f->tag == T_DEFERRED && f->msgid == msgid) {
            /* 1.6: the final REPLY/ERROR follows later with the same msgid; keep waiting */
            fprintf(stderr, "  (note: DEFERRED for msgid %llu, waiting for the final answer)\n", (unsigned long long)msgid);
            gwf_free(f); continue;
        }
        if ((f->tag == T_REPLY || f->tag == T_ERROR) && f->msgid == msgid) return 1;
        char d[512]; describe(f, d, sizeof d);
        if (f->tag == T_ERROR && f->msgid == 0) { why("connection-level %s while waiting for msgid %llu", d, (unsigned long long)msgid); gwf_free(f); return 0; }
        fprintf(stderr, "  (note: skipped %s while waiting for msgid %llu)\n", d, (unsigned long long)msgid);
        gwf_free(f);
    }
}
/* expect ERROR(msgid 0, cpid 0, code) then EOF; returns 1 ok */
static int expect_conn_error(conn *c, uint32_t code, int timeout_ms, char *msgout, size_t mn) {
    gwf f; int r = conn_read(c, &f, timeout_ms);
    if (r != RD_FRAME) { why("expected ERROR code %u, got %s %s", code, rdname(r), g_rderr); return 0; }
    char d[512]; describe(&f, d, sizeof d);
    if (f.tag != T_ERROR || f.code != code || f.msgid != 0 || f.cpid != 0) { why("expected ERROR(0,0,%u), got %s", code, d); gwf_free(&f); return 0; }
    if (msgout) sfmt(msgout, mn, "%s", f.str);
    gwf_free(&f);
    /* 1.8: not necessarily the last frame; answers (msgid != 0) and pushes may still come before EOF */
    int answers = 0;
    for (;;) {
        r = conn_read(c, &f, 3000);
        if (r != RD_FRAME) break;
        char d2[512]; describe(&f, d2, sizeof d2);
        int answer = (f.tag == T_REPLY || f.tag == T_DEFERRED || f.tag == T_ERROR) && f.msgid != 0;
        if (!answer && f.tag != T_PUSH) { why("got %s, then %s (neither an answer nor EOF)", d, d2); gwf_free(&f); return 0; }
        fprintf(stderr, "  (note: %s after the connection-level ERROR)\n", d2);
        answers++;
        gwf_free(&f);
    }
    if (r != RD_EOF) { why("got %s but then %s instead of EOF", d, rdname(r)); return 0; }
    if (answers) why("%s, %d answer(s), then EOF", d, answers); else why("%s then EOF", d);
    return 1;
}
/* one REQUEST round trip; returns 1 if an identical echo came back */
static int roundtrip(conn *c, const char *payload, char *res, size_t rn) {
    uint64_t id = g_msgid++;
    wb w = {0}; enc_request(&w, id, CPID, 5000, payload, strlen(payload));
    int r = conn_send(c, &w); free(w.b);
    if (r < 0) { sfmt(res, rn, "write failed"); return 0; }
    gwf f;
    if (!wait_answer(c, id, &f, 5000)) { sfmt(res, rn, "%s", g_why); return 0; }
    char d[512]; describe(&f, d, sizeof d);
    int ok = f.tag == T_REPLY && f.cpid == CPID && f.dlen == strlen(payload) && !memcmp(f.data, payload, f.dlen);
    sfmt(res, rn, "%s%s", d, ok ? "" : " (not the echo)");
    gwf_free(&f);
    return ok;
}
/* no frame at all for ms; 1 = silent */
static int expect_silence(conn *c, int ms, char *res, size_t rn) {
    gwf f; int r = conn_read(c, &f, ms);
    if (r == RD_TIMEOUT) return 1;
    if (r == RD_FRAME) { describe(&f, res, rn); gwf_free(&f); }
    else sfmt(res, rn, "%s", rdname(r));
    return 0;
}
/* send a raw first frame (no HELLO) or after handshake, expect conn error */
static int raw_then_error(int do_hello, const uint8_t *body, size_t n, uint32_t code, const char *what) {
    conn c; int ok = 0;
    if (do_hello) { if (handshake(&c, NULL, NULL) < 0) return 0; }
    else if (conn_open(&c) < 0) { why("connect failed"); return 0; }
    wb w = {0}; enc_rawbody(&w, body, n);
    if (conn_send(&c, &w) < 0) why("write failed");
    else { ok = expect_conn_error(&c, code, 5000, NULL, 0); if (ok) { char t[1100]; sfmt(t, sizeof t, "%s: %s", what, g_why); why("%s", t); } }
    free(w.b); conn_close(&c);
    return ok;
}

/* ---------------------------------------------------------------- checks */
static void check1_welcome(void) {
    conn c; gwf f;
    if (conn_open(&c) < 0) { why("connect: %s", strerror(errno)); report("1 hello/welcome", 0); return; }
    /* anonymous HELLO exactly as 1.12 shows it: 00000004 93 01 01 a0 */
    wb w = {0}; enc_hello(&w, 1, "");
    static const uint8_t expect_hex[] = { 0, 0, 0, 4, 0x93, 1, 1, 0xa0 };
    int enc_ok = w.n == sizeof expect_hex && !memcmp(w.b, expect_hex, w.n);
    conn_send(&c, &w); free(w.b);
    int r = conn_read(&c, &f, 5000);
    if (r != RD_FRAME) { why("no WELCOME: %s %s", rdname(r), g_rderr); report("1 hello/welcome", 0); conn_close(&c); return; }
    char d[512]; describe(&f, d, sizeof d);
    int ok = enc_ok && f.tag == T_WELCOME && f.nfields == 6 && f.version == PROTOCOL_VERSION && f.gen != 0 &&
             f.slen == 0 && f.max_frame >= MIN_MAX_FRAME && (g_expect_mf == 0 || f.max_frame == g_expect_mf);
    why("%s; encoder matches 1.12: %s; version==1 %s, gen!=0 %s, name=='' %s, max_frame>=722 %s, ==status max_frame(%u) %s",
        d, enc_ok ? "yes" : "NO", f.version == 1 ? "ok" : "BAD", f.gen ? "ok" : "BAD", f.slen == 0 ? "ok" : "BAD",
        f.max_frame >= MIN_MAX_FRAME ? "ok" : "BAD", g_expect_mf, (g_expect_mf == 0 || f.max_frame == g_expect_mf) ? "ok" : "BAD");
    /* nothing else is sent after WELCOME */
    char res[512];
    if (ok && !expect_silence(&c, 300, res, sizeof res)) { ok = 0; char t[1100]; sfmt(t, sizeof t, "%s; unexpected frame after WELCOME: %s", g_why, res); why("%s", t); }
    gwf_free(&f); conn_close(&c);
    report("1 hello/welcome", ok);

    /* 1b: named HELLO: WELCOME echoes the name; a second connection gets a different (sid,gen) */
    conn a, b; gwf wa, wbb;
    if (handshake(&a, "spec-named", &wa) < 0) { report("1b welcome name/sid/gen", 0); return; }
    if (handshake(&b, NULL, &wbb) < 0) { report("1b welcome name/sid/gen", 0); gwf_free(&wa); conn_close(&a); return; }
    ok = strcmp(wa.str, "spec-named") == 0 && (wa.sid != wbb.sid || wa.gen != wbb.gen) && wa.gen && wbb.gen;
    why("named: sid=%u gen=%u name='%s'; anon: sid=%u gen=%u", wa.sid, wa.gen, wa.str, wbb.sid, wbb.gen);
    report("1b welcome name/sid/gen", ok);
    gwf_free(&wa); gwf_free(&wbb); conn_close(&a); conn_close(&b);
}

static void check2_request(void) {
    conn c;
    if (handshake(&c, NULL, NULL) < 0) { report("2 request/reply", 0); return; }
    /* big msgid/cpid, encoded as uint64 (cf), to check the U64 round trip */
    uint64_t id = U64_MAX_WIRE, cpid = 0x7fffffff12345678ULL;
    const char *payload = "hello \x00\x01\xff binary";
    size_t pl = 20;
    wb w = {0}; enc_request(&w, id, cpid, 20000, payload, pl);
    conn_send(&c, &w); free(w.b);
    gwf f; int ok = 0;
    if (wait_answer(&c, id, &f, 5000)) {
        char d[512]; describe(&f, d, sizeof d);
        ok = f.tag == T_REPLY && f.msgid == id && f.cpid == cpid && f.dlen == pl && !memcmp(f.data, payload, pl);
        why("%s, payload %s", d, ok ? "echoed" : "WRONG");
        gwf_free(&f);
    }
    report("2 request/reply", ok);
    /* the exact example of 1.12 */
    wb e = {0}; enc_request(&e, 1, 42, 20000, "hi", 2);
    static const uint8_t ex[] = { 0,0,0,0x0b, 0x95,0x02,0x01,0x2a,0xcd,0x4e,0x20,0xc4,0x02,0x68,0x69 };
    int encok = e.n == sizeof ex && !memcmp(e.b, ex, e.n);
    conn_send(&c, &e); free(e.b);
    ok = 0;
    if (wait_answer(&c, 1, &f, 5000)) {
        ok = encok && f.tag == T_REPLY && f.cpid == 42 && f.dlen == 2 && !memcmp(f.data, "hi", 2) && f.body_len == 8;
        why("encoder==1.12 example: %s; reply body %zu bytes (1.12 says 8)", encok ? "yes" : "NO", f.body_len);
        gwf_free(&f);
    }
    report("2b 1.12 example bytes", ok);
    conn_close(&c);
}

static void check3_pipeline(void) {
    enum { N = 1000, DEPTH = 64 };
    conn c;
    if (handshake(&c, NULL, NULL) < 0) { report("3 pipeline 1000/64", 0); return; }
    static uint8_t seen[N];
    memset(seen, 0, sizeof seen);
    uint64_t base = 1000000;
    int sent = 0, got = 0, outstanding = 0, dup = 0, bad = 0, ooo = 0, maxout = 0;
    uint64_t last = 0;
    int64_t t0 = now_ms();
    wb w = {0};
    while (got < N) {
        while (sent < N && outstanding < DEPTH) {
            char p[64]; int pl = sfmt(p, sizeof p, "payload-%d-%s", sent, sent % 7 ? "x" : "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
            enc_request(&w, base + (uint64_t)sent, CPID + (uint64_t)sent, 10000, p, (size_t)pl);
            if (conn_send(&c, &w) < 0) { why("write failed at %d", sent); goto done; }
            sent++; outstanding++;
            if (outstanding > maxout) maxout = outstanding;
        }
        gwf f; int r = conn_read(&c, &f, 10000);
        if (r != RD_FRAME) { why("after %d answers: %s %s", got, rdname(r), g_rderr); goto done; }
        if (f.tag != T_REPLY || f.msgid < base || f.msgid >= base + N) { char d[512]; describe(&f, d, sizeof d); why("unexpected %s", d); gwf_free(&f); bad++; goto done; }
        int i = (int)(f.msgid - base);
        char p[64]; int pl = sfmt(p, sizeof p, "payload-%d-%s", i, i % 7 ? "x" : "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
        if (f.cpid != CPID + (uint64_t)i || f.dlen != (size_t)pl || memcmp(f.data, p, f.dlen)) bad++;
        if (seen[i]) dup++;
        seen[i] = 1;
        if (f.msgid < last) ooo++;
        last = f.msgid;
        got++; outstanding--;
        gwf_free(&f);
    }
    {
        char res[256];
        int silent = expect_silence(&c, 300, res, sizeof res);
        int ok = got == N && !dup && !bad && silent;
        why("%d/%d answered, %d duplicates, %d wrong payload/cpid, %d arrived out of order, max outstanding %d, %lld ms%s%s",
            got, N, dup, bad, ooo, maxout, (long long)(now_ms() - t0), silent ? "" : "; extra frame: ", silent ? "" : res);
        free(w.b); conn_close(&c);
        report("3 pipeline 1000/64", ok);
        return;
    }
done:
    free(w.b); conn_close(&c);
    report("3 pipeline 1000/64", 0);
}

static void check4_relay(void) {
    conn alice, anon, bob; gwf wa, wn, wbob;
    if (handshake(&alice, "alice", &wa) < 0) { report("4 relay named target", 0); return; }
    if (handshake(&anon, NULL, &wn) < 0) { report("4 relay named target", 0); conn_close(&alice); return; }
    /* anonymous relayer -> alice: alice gets PUSH(0, "#<sid>", data), relayer gets REPLY(msgid,cpid,b"") */
    uint64_t id = g_msgid++;
    wb w = {0}; enc_relay(&w, id, 777, "alice", "yo-anon", 7);
    conn_send(&anon, &w);
    gwf p, a; int ok = 0; char exp_src[32]; sfmt(exp_src, sizeof exp_src, "#%u", wn.sid);
    int rp = conn_read(&alice, &p, 5000);
    if (rp != RD_FRAME) why("alice got no PUSH: %s", rdname(rp));
    else if (wait_answer(&anon, id, &a, 5000)) {
        char d1[512], d2[512]; describe(&p, d1, sizeof d1); describe(&a, d2, sizeof d2);
        ok = p.tag == T_PUSH && p.cpid == 0 && strcmp(p.str, exp_src) == 0 && p.dlen == 7 && !memcmp(p.data, "yo-anon", 7) &&
             a.tag == T_REPLY && a.cpid == 777 && a.dlen == 0;
        why("target got %s (expected source '%s'), relayer got %s", d1, exp_src, d2);
        gwf_free(&a);
    }
    if (rp == RD_FRAME) gwf_free(&p);
    report("4 relay from anonymous", ok);

    /* named relayer bob -> alice: source "bob" */
    ok = 0;
    if (handshake(&bob, "bob", &wbob) == 0) {
        id = g_msgid++;
        enc_relay(&w, id, 888, "alice", "yo", 2);
        static const uint8_t push_ex[] = { 0,0,0,0x0b, 0x94,0x13,0x00,0xa3,'b','o','b',0xc4,0x02,'y','o' };
        conn_send(&bob, &w);
        rp = conn_read(&alice, &p, 5000);
        /* check raw bytes too: the PUSH the doc shows for source 'alice' has this shape */
        if (rp != RD_FRAME) why("alice got no PUSH: %s", rdname(rp));
        else if (wait_answer(&bob, id, &a, 5000)) {
            char d1[512], d2[512]; describe(&p, d1, sizeof d1); describe(&a, d2, sizeof d2);
            ok = p.tag == T_PUSH && p.cpid == 0 && strcmp(p.str, "bob") == 0 && p.dlen == 2 && !memcmp(p.data, "yo", 2) &&
                 p.body_len == sizeof push_ex - 4 && a.tag == T_REPLY && a.msgid == id && a.cpid == 888 && a.dlen == 0;
            why("target got %s, relayer got %s (empty bin ack)", d1, d2);
            gwf_free(&a);
        }
        if (rp == RD_FRAME) gwf_free(&p);
        gwf_free(&wbob);
        conn_close(&bob);
    }
    report("4 relay named target", ok);

    /* relay to self: PUSH first, then the REPLY (1.6) */
    ok = 0;
    id = g_msgid++;
    enc_relay(&w, id, 999, "alice", "self", 4);
    conn_send(&alice, &w);
    gwf f1, f2;
    int r1 = conn_read(&alice, &f1, 5000);
    int r2 = r1 == RD_FRAME ? conn_read(&alice, &f2, 5000) : RD_TIMEOUT;
    if (r1 == RD_FRAME && r2 == RD_FRAME) {
        char d1[512], d2[512]; describe(&f1, d1, sizeof d1); describe(&f2, d2, sizeof d2);
        ok = f1.tag == T_PUSH && strcmp(f1.str, "alice") == 0 && f2.tag == T_REPLY && f2.msgid == id && f2.dlen == 0;
        why("1st %s, 2nd %s", d1, d2);
        gwf_free(&f1); gwf_free(&f2);
    } else { why("frames: %s / %s", rdname(r1), rdname(r2)); if (r1 == RD_FRAME) gwf_free(&f1); }
    report("4b relay to self (PUSH first)", ok);

    /* "#<sid>" cannot be targeted */
    ok = 0; id = g_msgid++;
    char tgt[32]; sfmt(tgt, sizeof tgt, "#%u", wn.sid);
    enc_relay(&w, id, 5, tgt, "x", 1);
    conn_send(&alice, &w);
    if (wait_answer(&alice, id, &f1, 5000)) {
        char d[512]; describe(&f1, d, sizeof d);
        ok = f1.tag == T_ERROR && f1.code == E_UNKNOWN_TARGET;
        why("RELAY to '%s' (an anonymous client's source name): %s", tgt, d);
        gwf_free(&f1);
    }
    report("4c relay to #<sid> refused", ok);

    free(w.b);
    gwf_free(&wa); gwf_free(&wn);
    conn_close(&alice); conn_close(&anon);
}

static void check5_unknown_target(void) {
    conn c;
    if (handshake(&c, "spec-relayer5", NULL) < 0) { report("5 relay unknown target", 0); return; }
    uint64_t id = g_msgid++;
    wb w = {0}; enc_relay(&w, id, 42, "nobody-here", "yo", 2);
    conn_send(&c, &w); free(w.b);
    gwf f; int ok = 0;
    if (wait_answer(&c, id, &f, 5000)) {
        char d[512]; describe(&f, d, sizeof d);
        ok = f.tag == T_ERROR && f.msgid == id && f.cpid == 42 && f.code == E_UNKNOWN_TARGET;
        char res[512];
        int rt = ok && roundtrip(&c, "still-alive", res, sizeof res);
        why("%s; then REQUEST -> %s", d, ok ? res : "-");
        ok = ok && rt;
        gwf_free(&f);
    }
    report("5 relay unknown target", ok);
    /* the 1.12 example bytes: Relay(3,42,'bob',b'yo') -> Error(3,42,8,"no client named 'bob'") */
    conn d; ok = 0;
    if (handshake(&d, NULL, NULL) == 0) {
        static const uint8_t rq[] = { 0,0,0,0x0c,0x95,0x04,0x03,0x2a,0xa3,'b','o','b',0xc4,0x02,'y','o' };
        conn_write(&d, rq, sizeof rq, 5000);
        uint8_t want[] = { 0x95,0x14,0x03,0x2a,0x08,0xb5 };
        if (wait_answer(&d, 3, &f, 5000)) {
            ok = f.tag == T_ERROR && f.code == 8 && strcmp(f.str, "no client named 'bob'") == 0 && f.body_len == 0x1b;
            why("got code %u message '%s' body %zu bytes (1.12: 27)", f.code, f.str, f.body_len);
            gwf_free(&f);
        }
        (void)want;
        conn_close(&d);
    }
    report("5b 1.12 relay refusal example", ok);
}

/* 5c (1.6): the RELAY target matches code point by code point: no case folding, no Unicode normalisation */
static void check5c_exact_match(void) {
    conn t, s; int ok = 0;
    const char *nfc = "spec-\xc3\xa9";     /* "spec-" U+00E9 */
    const char *nfd = "spec-e\xcc\x81";    /* "spec-e" U+0301: the same text, decomposed */
    if (handshake(&t, nfc, NULL) == 0) {
        if (handshake(&s, NULL, NULL) == 0) {
            const char *targets[3] = { nfd, "SPEC-\xc3\xa9", nfc };
            int codes[3] = { -1, -1, -1 }; char all[700] = "";
            for (int i = 0; i < 3; i++) {
                uint64_t id = g_msgid++;
                wb w = {0}; enc_relay(&w, id, 55, targets[i], "n", 1); conn_send(&s, &w); free(w.b);
                gwf f;
                if (wait_answer(&s, id, &f, 5000)) { codes[i] = f.tag == T_ERROR ? (int)f.code : f.tag == T_REPLY ? 0 : -2; gwf_free(&f); }
                size_t L = strlen(all); sfmt(all + L, sizeof all - L, "target %d -> %s; ", i + 1, codes[i] == 0 ? "REPLY" : codes[i] == 8 ? "UNKNOWN_TARGET" : "?");
            }
            gwf p; int rp = conn_read(&t, &p, 5000), pushes = 0;
            if (rp == RD_FRAME) { pushes = p.tag == T_PUSH && p.dlen == 1; gwf_free(&p); }
            char r2[300]; int silent = expect_silence(&t, 200, r2, sizeof r2);
            ok = codes[0] == 8 && codes[1] == 8 && codes[2] == 0 && pushes == 1 && silent;
            why("client named 'spec-\\u00e9': %s(NFD, upper case, exact); the target got %s%s", all,
                pushes ? "exactly one PUSH" : "no PUSH", silent ? "" : " and more");
            conn_close(&s);
        }
        conn_close(&t);
    }
    report("5c relay target: exact match", ok);
}

static void check6_name_taken(void) {
    conn a, b; int ok = 0;
    if (handshake(&a, "carol", NULL) < 0) { report("6 name taken", 0); return; }
    if (conn_open(&b) == 0) {
        wb w = {0}; enc_hello(&w, 1, "carol"); conn_send(&b, &w); free(w.b);
        char msg[256];
        ok = expect_conn_error(&b, E_NAME_TAKEN, 5000, msg, sizeof msg);
        char res[512]; int still = roundtrip(&a, "first-still-ok", res, sizeof res);
        char t[1100]; sfmt(t, sizeof t, "%s; the original 'carol' still answers: %s", g_why, res); why("%s", t);
        ok = ok && still;
        conn_close(&b);
    }
    report("6 name taken (2nd connection)", ok);

    /* name is free again once its connection ends */
    conn_close(&a);
    ok = 0;
    int64_t t0 = now_ms(); int tries = 0; gwf wl;
    for (;;) {
        tries++;
        if (conn_open(&a) < 0) break;
        wb w = {0}; enc_hello(&w, 1, "carol"); conn_send(&a, &w); free(w.b);
        int r = conn_read(&a, &wl, 5000);
        if (r == RD_FRAME && wl.tag == T_WELCOME) { ok = 1; gwf_free(&wl); break; }
        if (r == RD_FRAME) gwf_free(&wl);
        conn_close(&a);
        if (now_ms() - t0 > 3000) break;
        struct timespec ts = { 0, 20 * 1000000 }; nanosleep(&ts, NULL);
    }
    /* 1.4: "a client that reconnects under its name should retry NAME_TAKEN a few times with a short
       back-off" (the first attempt normally succeeds) */
    why("reconnect with the same name right after close: WELCOME after %d attempt(s), %lld ms", tries, (long long)(now_ms() - t0));
    report("6b name free after close", ok);
    conn_close(&a);

    /* HELLO sent twice on one connection: BAD_HELLO + close */
    ok = 0;
    if (handshake(&a, NULL, NULL) == 0) {
        wb w = {0}; enc_hello(&w, 1, "dave"); conn_send(&a, &w); free(w.b);
        ok = expect_conn_error(&a, E_BAD_HELLO, 5000, NULL, 0);
        conn_close(&a);
    }
    report("6c second HELLO on same conn", ok);
}

static void check7_too_large(uint32_t mf) {
    conn c; int ok = 0;
    if (handshake(&c, NULL, NULL) == 0) {
        uint8_t pre[4] = { (uint8_t)((mf + 1) >> 24), (uint8_t)((mf + 1) >> 16), (uint8_t)((mf + 1) >> 8), (uint8_t)(mf + 1) };
        conn_write(&c, pre, 4, 5000); /* only the prefix: checked before the body */
        ok = expect_conn_error(&c, E_FRAME_TOO_LARGE, 5000, NULL, 0);
        conn_close(&c);
    }
    report("7 length prefix > max_frame", ok);

    /* before HELLO too (1.5) */
    ok = 0;
    if (conn_open(&c) == 0) {
        uint8_t pre[4] = { 0xff, 0xff, 0xff, 0xff };
        conn_write(&c, pre, 4, 5000);
        ok = expect_conn_error(&c, E_FRAME_TOO_LARGE, 5000, NULL, 0);
        conn_close(&c);
    }
    report("7b prefix 0xffffffff as 1st frame", ok);

    /* a body of exactly max_frame is allowed; the reply may exceed max_frame */
    ok = 0;
    if (handshake(&c, NULL, NULL) == 0) {
        /* 95 02 <msgid fixint> <cpid fixint> 00 c5 XXXX data  => 8 bytes of header */
        size_t dl = mf - 8;
        uint8_t *d = malloc(dl);
        for (size_t i = 0; i < dl; i++) d[i] = (uint8_t)(i * 7);
        uint64_t id = 5; /* fixint so the header is 8 bytes */
        wb w = {0}; enc_request(&w, id, 6, 0, d, dl);
        if (w.n - 4 != mf) why("internal: body %zu != %u", w.n - 4, mf);
        conn_send(&c, &w); free(w.b);
        gwf f;
        if (wait_answer(&c, id, &f, 5000)) {
            char ds[512]; describe(&f, ds, sizeof ds);
            ok = f.tag == T_REPLY && f.dlen == dl && !memcmp(f.data, d, dl);
            why("request body %u bytes (= max_frame) -> %s, reply body %zu bytes", mf, ds, f.body_len);
            gwf_free(&f);
        }
        free(d);
        conn_close(&c);
    }
    report("7c body of exactly max_frame ok", ok);
}

static void check8_garbage(void) {
    static const uint8_t g1[] = { 0xc1, 0xc1, 0xc1, 0xc1 };
    report("8 garbage first frame", raw_then_error(0, g1, sizeof g1, E_BAD_FRAME, "body c1c1c1c1 before HELLO"));
    static const uint8_t g2[] = { 0x93, 0x01, 0x01 }; /* truncated array */
    report("8b truncated msgpack 1st frame", raw_then_error(0, g2, sizeof g2, E_BAD_FRAME, "body 930101 (array of 3 with 2)"));
    report("8c empty body (length 0)", raw_then_error(0, NULL, 0, E_BAD_FRAME, "length prefix 0"));
    static const uint8_t g3[] = { 0x93, 0x01, 0x01, 0xa0, 0xc0 }; /* HELLO + trailing nil */
    report("8d HELLO + trailing byte", raw_then_error(0, g3, sizeof g3, E_BAD_FRAME, "HELLO followed by c0"));
    static const uint8_t g4[] = { 0x81, 0x01, 0x01 }; /* a map */
    report("8e map body", raw_then_error(0, g4, sizeof g4, E_BAD_FRAME, "map {1:1}"));
    static const uint8_t g5[] = { 0x96, 0x10, 1, 0, 1, 0xa0, 0x01 }; /* a gateway tag (WELCOME) from the client */
    report("8f gateway tag from client", raw_then_error(1, g5, sizeof g5, E_BAD_FRAME, "WELCOME-tagged frame after HELLO"));
    static const uint8_t g6[] = { 0x92, 0x07, 0x01 }; /* unknown tag */
    report("8g unknown tag 7", raw_then_error(1, g6, sizeof g6, E_BAD_FRAME, "tag 7 after HELLO"));
    static const uint8_t g7[] = { 0x92, 0x01, 0xff }; /* negative version */
    report("8h negative int in HELLO", raw_then_error(0, g7, sizeof g7, E_BAD_FRAME, "HELLO version -1"));
    static const uint8_t g8[] = { 0x95, 0x02, 0x01, 0x2a, 0x00, 0xa2, 'h', 'i' }; /* REQUEST data as str */
    report("8i REQUEST data as str", raw_then_error(1, g8, sizeof g8, E_BAD_FRAME, "REQUEST with str data (worker-side check)"));
    static const uint8_t g9[] = { 0x95, 0x02, 0xcf, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x2a, 0x00, 0xc4, 0x00 }; /* msgid 2^63 */
    report("8j msgid 2^63 out of range", raw_then_error(1, g9, sizeof g9, E_BAD_FRAME, "REQUEST msgid 2^63"));
    static const uint8_t g10[] = { 0x95, 0x02, 0x01, 0x2a, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0, 0xc4, 0x00 }; /* timeout_ms 2^32 */
    report("8k timeout_ms 2^32 out of range", raw_then_error(1, g10, sizeof g10, E_BAD_FRAME, "REQUEST timeout_ms 2^32"));
    static const uint8_t g11[] = { 0x95, 0x02, 0x01, 0x2a, 0x00, 0xc4, 0x01, 'a', 0xc0 }; /* REQUEST + trailing nil */
    report("8l REQUEST + trailing byte", raw_then_error(1, g11, sizeof g11, E_BAD_FRAME, "REQUEST followed by c0"));
    static const uint8_t g12[] = { 0x93, 0x01, 0x01, 0xa2, 0xc3, 0x28 }; /* invalid UTF-8 name */
    report("8m invalid UTF-8 name", raw_then_error(0, g12, sizeof g12, E_BAD_FRAME, "HELLO name c3 28"));
    static const uint8_t g13[] = { 0x93, 0x01, 0x01, 0xc4, 0x01, 'a' }; /* name as bin */
    report("8n HELLO name as bin", raw_then_error(0, g13, sizeof g13, E_BAD_FRAME, "HELLO name as bin"));
    static const uint8_t g14[] = { 0x94, 0x02, 0x01, 0x2a, 0x00 }; /* REQUEST missing data */
    report("8o REQUEST missing field", raw_then_error(1, g14, sizeof g14, E_BAD_FRAME, "REQUEST of 4 elements"));
}

static void check9_request_before_hello(void) {
    static const uint8_t rq[] = { 0x95, 0x02, 0x01, 0x2a, 0xcd, 0x4e, 0x20, 0xc4, 0x02, 'h', 'i' };
    report("9 REQUEST before HELLO", raw_then_error(0, rq, sizeof rq, E_BAD_HELLO, "REQUEST as 1st frame"));
    static const uint8_t rl[] = { 0x95, 0x04, 0x03, 0x2a, 0xa3, 'b', 'o', 'b', 0xc4, 0x02, 'y', 'o' };
    report("9b RELAY before HELLO", raw_then_error(0, rl, sizeof rl, E_BAD_HELLO, "RELAY as 1st frame"));
    static const uint8_t cm[] = { 0x95, 0x05, 0x01, 0xcd, 0x9c, 0x41, 0xcd, 0x9c, 0x42, 0xc4, 0x10,
                                  0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 };
    report("9c CALLME w/o --links callback", raw_then_error(0, cm, sizeof cm, E_BAD_HELLO, "CALLME as 1st frame"));
}

static void check10_send(void) {
    conn c; int ok = 0;
    if (handshake(&c, NULL, NULL) == 0) {
        uint64_t sid = g_msgid++;
        wb w = {0}; enc_send(&w, sid, CPID, "one-way", 7); conn_send(&c, &w);
        char res[512], res2[512];
        int silent = expect_silence(&c, 700, res, sizeof res);
        int rt = roundtrip(&c, "after-send", res2, sizeof res2);
        int silent2 = expect_silence(&c, 300, res, sizeof res);
        ok = silent && rt && silent2;
        why("SEND msgid %llu: %s; then REQUEST -> %s", (unsigned long long)sid, silent && silent2 ? "nothing came back" : res, res2);
        /* SEND example bytes of 1.12 */
        enc_send(&w, 2, 42, "x", 1);
        static const uint8_t ex[] = { 0,0,0,7,0x94,0x03,0x02,0x2a,0xc4,0x01,0x78 };
        if (w.n != sizeof ex || memcmp(w.b, ex, w.n)) { ok = 0; why("SEND encoder differs from 1.12 example"); }
        free(w.b);
        conn_close(&c);
    }
    report("10 SEND one-way", ok);
}

static void check11_extras(void) {
    char res[512];
    /* version mismatch */
    {
        conn c; int ok = 0;
        if (conn_open(&c) == 0) {
            wb w = {0}; enc_hello(&w, 2, "v2client"); conn_send(&c, &w); free(w.b);
            ok = expect_conn_error(&c, E_BAD_VERSION, 5000, NULL, 0);
            conn_close(&c);
        }
        report("11a HELLO version 2", ok);
    }
    /* name omitted: [1, 1] */
    {
        conn c; int ok = 0;
        if (conn_open(&c) == 0) {
            wb w = {0}; enc_hello(&w, 1, NULL); conn_send(&c, &w); free(w.b);
            gwf f; int r = conn_read(&c, &f, 5000);
            if (r == RD_FRAME) { describe(&f, res, sizeof res); ok = f.tag == T_WELCOME && f.slen == 0; why("HELLO [1,1] -> %s", res); gwf_free(&f); }
            else why("%s", rdname(r));
            conn_close(&c);
        }
        report("11b HELLO without name", ok);
    }
    /* HELLO + REQUEST in one write, before WELCOME */
    {
        conn c; int ok = 0;
        if (conn_open(&c) == 0) {
            wb w = {0}, r = {0};
            enc_hello(&w, 1, ""); enc_request(&r, 77, 1, 1000, "early", 5);
            wb_raw(&w, r.b, r.n); free(r.b);
            conn_send(&c, &w); free(w.b);
            gwf f1, f2;
            int r1 = conn_read(&c, &f1, 5000), r2 = r1 == RD_FRAME ? conn_read(&c, &f2, 5000) : RD_TIMEOUT;
            if (r1 == RD_FRAME && r2 == RD_FRAME) {
                char d1[512], d2[512]; describe(&f1, d1, sizeof d1); describe(&f2, d2, sizeof d2);
                ok = f1.tag == T_WELCOME && f2.tag == T_REPLY && f2.msgid == 77 && f2.dlen == 5;
                why("1st %s, 2nd %s", d1, d2);
                gwf_free(&f1); gwf_free(&f2);
            } else { why("%s/%s", rdname(r1), rdname(r2)); if (r1 == RD_FRAME) gwf_free(&f1); }
            conn_close(&c);
        }
        report("11c HELLO+REQUEST before WELCOME", ok);
    }
    /* timeout_ms is not enforced: 1 ms still gets the REPLY; max U32 and 0 work */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            uint32_t tmos[3] = { 1, 0, 0xffffffffu }; int good = 0; char all[600] = "";
            for (int i = 0; i < 3; i++) {
                uint64_t id = g_msgid++; wb w = {0}; enc_request(&w, id, 9, tmos[i], "t", 1); conn_send(&c, &w); free(w.b);
                gwf f; if (wait_answer(&c, id, &f, 5000)) { if (f.tag == T_REPLY) good++; describe(&f, res, sizeof res); gwf_free(&f); }
                else sfmt(res, sizeof res, "none");
                size_t L = strlen(all); sfmt(all + L, sizeof all - L, "tmo=%u->%.60s; ", tmos[i], res);
            }
            ok = good == 3; why("%s", all);
            conn_close(&c);
        }
        report("11d timeout_ms 1/0/2^32-1", ok);
    }
    /* msgid 0 is answered like any other (but don't use it) */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            wb w = {0}; enc_request(&w, 0, 3, 1000, "zero", 4); conn_send(&c, &w); free(w.b);
            gwf f; if (wait_answer(&c, 0, &f, 5000)) { describe(&f, res, sizeof res); ok = f.tag == T_REPLY; why("%s", res); gwf_free(&f); }
            conn_close(&c);
        }
        report("11e REQUEST msgid 0 answered", ok);
    }
    /* extra elements are ignored; array16 header accepted */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            static const uint8_t x1[] = { 0,0,0,10, 0x96, 0x02, 0x0b, 0x01, 0x00, 0xc4, 0x01, 'e', 0xa1, 'z' };
            static const uint8_t x2[] = { 0,0,0,10, 0xdc, 0x00, 0x05, 0x02, 0x0c, 0x01, 0x00, 0xc4, 0x01, 'f' };
            conn_write(&c, x1, sizeof x1, 5000);
            gwf f1, f2; int a = wait_answer(&c, 11, &f1, 5000); int b = 0;
            char d1[512] = "none", d2[512] = "none";
            if (a) { describe(&f1, d1, sizeof d1); }
            conn_close(&c);
            if (handshake(&c, NULL, NULL) == 0) {
                conn_write(&c, x2, sizeof x2, 5000);
                b = wait_answer(&c, 12, &f2, 5000);
                if (b) describe(&f2, d2, sizeof d2);
                conn_close(&c);
            }
            ok = a && b && f1.tag == T_REPLY && f1.dlen == 1 && f1.data[0] == 'e' && f2.tag == T_REPLY && f2.data[0] == 'f';
            why("6-element REQUEST -> %s; array16 REQUEST -> %s", d1, d2);
            if (a) gwf_free(&f1);
            if (b) gwf_free(&f2);
        }
        report("11f extra elems / array16 hdr", ok);
    }
    /* a frame split into single bytes with pauses */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            wb w = {0}; enc_request(&w, 31, 1, 1000, "split", 5);
            for (size_t i = 0; i < w.n; i++) { conn_write(&c, w.b + i, 1, 1000); struct timespec ts = { 0, 5000000 }; nanosleep(&ts, NULL); }
            free(w.b);
            gwf f; if (wait_answer(&c, 31, &f, 5000)) { describe(&f, res, sizeof res); ok = f.tag == T_REPLY && f.dlen == 5; why("byte-by-byte REQUEST -> %s", res); gwf_free(&f); }
            conn_close(&c);
        }
        report("11g frame split across writes", ok);
    }
    /* name rules */
    {
        struct { const char *name; uint32_t code; const char *what; } cases[] = {
            { "#x", E_BAD_HELLO, "name starting with #" },
            { "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", E_BAD_FRAME, "65 ASCII chars" },
            { "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
              "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9",
              E_BAD_HELLO, "33 x U+00E9 (66 bytes)" },
            { "no\xc2\xa0" "break", E_BAD_HELLO, "U+00A0 inside" },
            { "tab\there", E_BAD_HELLO, "TAB inside" },
            { "zw\xe2\x80\x8dj", E_BAD_HELLO, "U+200D inside" },
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            conn c; int ok = 0;
            if (conn_open(&c) == 0) {
                wb w = {0}; enc_hello(&w, 1, cases[i].name); conn_send(&c, &w); free(w.b);
                ok = expect_conn_error(&c, cases[i].code, 5000, NULL, 0);
                char t[1100]; sfmt(t, sizeof t, "%s: %s", cases[i].what, g_why); why("%s", t);
                conn_close(&c);
            }
            char nm[64]; sfmt(nm, sizeof nm, "11h name rule %zu", i + 1);
            report(nm, ok);
        }
        /* allowed: space, 64 x 1-byte, exactly 64 bytes of UTF-8 */
        const char *good[] = { "with space", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
                               "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
                               "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9" };
        int ok = 1; char all[600] = "";
        for (size_t i = 0; i < 3; i++) {
            conn c; gwf f;
            if (handshake(&c, good[i], &f) == 0) {
                int same = strcmp(f.str, good[i]) == 0; ok &= same;
                size_t L = strlen(all); sfmt(all + L, sizeof all - L, "'%.12s..' (%zu bytes) -> WELCOME%s; ", good[i], strlen(good[i]), same ? "" : " with other name");
                gwf_free(&f); conn_close(&c);
            } else { ok = 0; size_t L = strlen(all); sfmt(all + L, sizeof all - L, "'%.12s..' refused (%s); ", good[i], g_why); }
        }
        why("%s", all);
        report("11i allowed names", ok);
    }
    /* RELAY target > 64 chars: BAD_FRAME; > 64 bytes but <= 64 chars: UNKNOWN_TARGET */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            wb w = {0}; enc_relay(&w, 40, 1, "ccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc", "x", 1);
            conn_send(&c, &w); free(w.b);
            ok = expect_conn_error(&c, E_BAD_FRAME, 5000, NULL, 0);
            conn_close(&c);
        }
        report("11j RELAY target 65 chars", ok);
        ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            wb w = {0}; enc_relay(&w, 41, 1, "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
                                              "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9", "x", 1);
            conn_send(&c, &w); free(w.b);
            gwf f; if (wait_answer(&c, 41, &f, 5000)) { describe(&f, res, sizeof res); ok = f.tag == T_ERROR && f.code == E_UNKNOWN_TARGET; why("33 x U+00E9 target -> %s", res); gwf_free(&f);
                char r2[512]; int rt = roundtrip(&c, "alive", r2, sizeof r2); ok = ok && rt; }
            conn_close(&c);
        }
        report("11k RELAY target 66 bytes", ok);
    }
    /* handshake timeout (1.5): one connection says nothing; another sends only part of a HELLO ("the whole
       HELLO frame must have arrived within handshake_timeout").  Both run at once. */
    {
        conn c, h; int ok = 0, okh = 0; int64_t lo = (int64_t)g_handshake_s * 1000 - 100;
        if (conn_open(&c) == 0) {
            int64_t t0 = now_ms();
            if (conn_open(&h) == 0) {
                static const uint8_t part[] = { 0, 0, 0, 9, 0x93, 0x01, 0x01, 0xa5, 'a', 'l' }; /* HELLO(1,'alice') cut */
                conn_write(&h, part, sizeof part, 5000);
            }
            char msg[256] = "";
            ok = expect_conn_error(&c, E_HANDSHAKE_TIMEOUT, g_handshake_s * 1000 + 3000, msg, sizeof msg);
            int64_t dt = now_ms() - t0;
            char t[1100]; sfmt(t, sizeof t, "%s after %lld ms (handshake_timeout %d s)", g_why, (long long)dt, g_handshake_s); why("%s", t);
            ok = ok && dt >= lo;
            report("11l handshake timeout", ok);
            if (h.fd >= 0) {
                okh = expect_conn_error(&h, E_HANDSHAKE_TIMEOUT, 3000, msg, sizeof msg);
                dt = now_ms() - t0;
                sfmt(t, sizeof t, "10 of 13 HELLO bytes sent: %s after %lld ms", g_why, (long long)dt); why("%s", t);
                okh = okh && dt >= lo;
                conn_close(&h);
            }
            conn_close(&c);
        } else report("11l handshake timeout", 0);
        report("11l2 partial HELLO times out", okh);
    }
    /* client FIN right after a REQUEST: doc says the answer may or may not come; just record it */
    {
        conn c;
        if (handshake(&c, NULL, NULL) == 0) {
            wb w = {0}; enc_request(&w, 50, 1, 1000, "fin", 3); conn_send(&c, &w); free(w.b);
            shutdown(c.fd, SHUT_WR);
            gwf f; int r = conn_read(&c, &f, 3000);
            if (r == RD_FRAME) { describe(&f, res, sizeof res); gwf_free(&f); } else sfmt(res, sizeof res, "%s", rdname(r));
            int r2 = r == RD_FRAME ? conn_read(&c, &f, 3000) : r;
            if (r2 == RD_FRAME) gwf_free(&f);
            why("after SHUT_WR: first %s, then %s (doc: reply may or may not come; then EOF)", res, rdname(r2));
            report("11m half-close (informational)", r2 == RD_EOF);
            conn_close(&c);
        }
    }
}

/* ---------------------------------------------------------------- more checks (11n..) */
static void check11_more(uint32_t mf) {
    char res[512];
    /* 11n: good REQUEST then malformed REQUEST in one write: BAD_FRAME (msgid 0); the good one's REPLY may
       come before or after the ERROR or not at all (1.7/1.9); keep dispatching until EOF */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            static const uint8_t two[] = { 0,0,0,9, 0x95,0x02,0x01,0x2a,0x00,0xc4,0x02,'h','i',
                                           0,0,0,8, 0x95,0x02,0x02,0x2a,0x00,0xa2,'h','i' };
            conn_write(&c, two, sizeof two, 5000);
            char seq[600] = ""; int got_err = 0, eof = 0, reply_pos = -1, n = 0;
            for (;;) {
                gwf f; int r = conn_read(&c, &f, 5000);
                if (r != RD_FRAME) { eof = r == RD_EOF; size_t L = strlen(seq); sfmt(seq + L, sizeof seq - L, "%s", rdname(r)); break; }
                char d[256]; describe(&f, d, sizeof d);
                size_t L = strlen(seq); sfmt(seq + L, sizeof seq - L, "%.120s; ", d);
                if (f.tag == T_ERROR && f.msgid == 0 && f.code == E_BAD_FRAME) got_err = 1;
                if (f.tag == T_REPLY && f.msgid == 1) reply_pos = got_err ? 1 : 0;
                n++;
                gwf_free(&f);
            }
            ok = got_err && eof;
            why("%s (good request's REPLY: %s)", seq, reply_pos < 0 ? "absent" : reply_pos ? "AFTER the msgid-0 ERROR" : "before the ERROR");
            conn_close(&c);
        }
        report("11n bad REQUEST after good one", ok);
    }
    /* 11o: a HELLO in the widest legal encodings (array32, uint64 ints, str32 64-byte name): 92 bytes */
    {
        wb w = {0}; fr_begin(&w);
        wb_u8(&w, 0xdd); wb_be(&w, 3, 4); wb_u8(&w, 0xcf); wb_be(&w, 1, 8); wb_u8(&w, 0xcf); wb_be(&w, 1, 8);
        wb_u8(&w, 0xdb); wb_be(&w, 64, 4); for (int i = 0; i < 64; i++) wb_u8(&w, 'W');
        fr_end(&w);
        size_t body = w.n - 4;
        conn c; int ok = 0;
        if (conn_open(&c) == 0) {
            conn_send(&c, &w);
            gwf f; int r = conn_read(&c, &f, 5000);
            if (r == RD_FRAME) { describe(&f, res, sizeof res); ok = f.tag == T_WELCOME && f.slen == 64; gwf_free(&f); } else sfmt(res, sizeof res, "%s", rdname(r));
            why("HELLO body %zu bytes (1.2: wider headers are accepted, only longer) -> %.100s", body, res);
            conn_close(&c);
        }
        free(w.b);
        report("11o widest-encoded HELLO", ok);
    }
    /* 11p: non-shortest integer encodings from the client: tag as uint8 (cc 02), msgid int8, cpid int64, timeout uint64 */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            static const uint8_t q[] = { 0,0,0,26, 0x95, 0xcc,0x02, 0xd0,0x33, 0xd3,0,0,0,0,0,0,0,0x2a, 0xcf,0,0,0,0,0,0,0x03,0xe8, 0xc4,0x01,'n' };
            conn_write(&c, q, sizeof q, 5000);
            gwf f; if (wait_answer(&c, 0x33, &f, 5000)) { describe(&f, res, sizeof res); ok = f.tag == T_REPLY && f.cpid == 42; why("%s", res); gwf_free(&f); }
            conn_close(&c);
        }
        report("11p non-shortest int encodings", ok);
    }
    /* 11q: malformed REQUEST-shaped first frame: BAD_FRAME (not BAD_HELLO) */
    {
        static const uint8_t b[] = { 0x95, 0x02, 0x01, 0x2a, 0x00, 0xa2, 'h', 'i' };
        report("11q malformed REQUEST 1st frame", raw_then_error(0, b, sizeof b, E_BAD_FRAME, "REQUEST with str data before HELLO"));
    }
    /* 11r: a relayed PUSH larger than max_frame: 64-byte source name, RELAY body exactly max_frame */
    {
        conn t, s; int ok = 0; char sname[65]; memset(sname, 'S', 64); sname[64] = 0;
        if (handshake(&t, "t", NULL) == 0) {
            if (handshake(&s, sname, NULL) == 0) {
                size_t dl = mf - 9; uint8_t *d = malloc(dl); memset(d, 'D', dl);
                wb w = {0}; enc_relay(&w, 1, 1, "t", d, dl);
                size_t rb = w.n - 4;
                conn_send(&s, &w); free(w.b);
                gwf p, a; int rp = conn_read(&t, &p, 5000);
                if (rp == RD_FRAME) {
                    ok = p.tag == T_PUSH && p.dlen == dl && !memcmp(p.data, d, dl) && strcmp(p.str, sname) == 0 && p.body_len > mf &&
                         p.body_len <= (size_t)mf + 260;
                    why("RELAY body %zu -> PUSH body %zu bytes (max_frame %u; 1.2: never above max_frame+260)", rb, p.body_len, mf);
                    gwf_free(&p);
                } else why("no PUSH: %s", rdname(rp));
                if (wait_answer(&s, 1, &a, 5000)) { ok = ok && a.tag == T_REPLY; gwf_free(&a); } else ok = 0;
                free(d); conn_close(&s);
            }
            conn_close(&t);
        }
        report("11r PUSH larger than max_frame", ok);
    }
    /* 11w: a client that does not read is cut as a slow consumer: EOF (maybe inside a frame), no ERROR (1.10) */
    {
        conn c; int ok = 0;
        g_rcvbuf = 4096;
        int hs = handshake(&c, NULL, NULL);
        g_rcvbuf = 0;
        if (hs == 0) {
            size_t dl = mf - 16; uint8_t *d = malloc(dl); memset(d, 'S', dl);
            int sent = 0; wb w = {0};
            for (int i = 1; i <= 400; i++) { enc_request(&w, (uint64_t)i, 1, 0, d, dl); if (conn_write(&c, w.b, w.n, 2000) < 0) break; sent++; }
            free(w.b); free(d);
            /* Now be a slow reader: 4 KiB per 10 ms, far below what the gateway produces, so its buffer
             * for us passes max_outbuf and it cuts us (1.10).  A cut is invisible until the bytes queued
             * before it are read, so read on (at that pace: the behaviour under test, not a wait) until
             * the stream ends, with a deadline; then look at what came. */
            int64_t until = now_ms() + 30000;
            while (now_ms() < until) {
                if (c.len + 4096 > c.cap) { c.cap = c.len + 65536; c.buf = realloc(c.buf, c.cap); }
                struct pollfd pf = { c.fd, POLLIN, 0 };
                if (poll(&pf, 1, 1000) <= 0) continue;
                ssize_t k = recv(c.fd, c.buf + c.len, 4096, 0);
                if (k <= 0) break;                      /* EOF or reset: the cut has reached us */
                c.len += (size_t)k;
                struct timespec ts = { 0, 10 * 1000000 }; nanosleep(&ts, NULL);
            }
            int replies = 0, errors = 0, r;
            for (;;) { gwf f; r = conn_read(&c, &f, 5000); if (r != RD_FRAME) break; if (f.tag == T_REPLY) replies++; if (f.tag == T_ERROR) errors++; gwf_free(&f); }
            ok = (r == RD_EOF || r == RD_EOF_PARTIAL || r == RD_ERR) && errors == 0 && replies < sent;
            why("sent %d requests of %u bytes without reading; then read %d replies, %d ERRORs, then %s", sent, mf, replies, errors, rdname(r));
            conn_close(&c);
        }
        report("11w slow consumer cut silently", ok);
    }
}

/* ---------------------------------------------------------------- conformance app (protocol.md 1.14) */
/* The main gateway runs duprep.apps.conformance:handle, which answers a REQUEST by its payload:
 *   fail:TEXT -> ERROR APP_ERROR (11), message "RuntimeError: TEXT", the connection stays;
 *   defer:MS  -> DEFERRED, then about MS ms later a REPLY with the whole payload;
 *   push:DATA -> PUSH(cpid 0, source "", DATA) to the sender and a REPLY with the payload, either order;
 *   sleep:MS  -> a REPLY with the payload after MS ms;
 *   size:N    -> a REPLY of N bytes 'x', or ERROR APP_ERROR if the frame would exceed what the queues
 *                carry (1.13: a body above max_frame + 260);
 *   none      -> nothing, ever;   anything else -> echo.  SEND frames get no answer, as always. */
static void send_req(conn *c, uint64_t id, uint64_t cpid, uint32_t tmo, const void *d, size_t k) {
    wb w = {0}; enc_request(&w, id, cpid, tmo, d, k); conn_send(c, &w); free(w.b);
}
static void send_str(conn *c, uint64_t id, uint64_t cpid, uint32_t tmo, const char *d) { send_req(c, id, cpid, tmo, d, strlen(d)); }
static void send_oneway(conn *c, uint64_t id, const char *d) {
    wb w = {0}; enc_send(&w, id, CPID, d, strlen(d)); conn_send(c, &w); free(w.b);
}
static int is_data(const gwf *f, const char *s) { return f->dlen == strlen(s) && !memcmp(f->data, s, f->dlen); }
static void append(char *buf, size_t n, const gwf *f, int64_t t0) {
    char d[300]; describe(f, d, sizeof d);
    size_t L = strlen(buf); sfmt(buf + L, n - L, "%.110s@%lldms; ", d, (long long)(now_ms() - t0));
}

static void check15_app_error(uint32_t mf) {
    char res[512], r2[512];
    /* 15: fail:TEXT -> ERROR(msgid, cpid, APP_ERROR, "RuntimeError: TEXT"); the connection stays (1.6, 1.8) */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            uint64_t id = g_msgid++;
            send_str(&c, id, 1515, 5000, "fail:spec boom");
            gwf f;
            if (wait_answer(&c, id, &f, 5000)) {
                describe(&f, res, sizeof res);
                ok = f.tag == T_ERROR && f.msgid == id && f.cpid == 1515 && f.code == E_APP_ERROR && strcmp(f.str, "RuntimeError: spec boom") == 0;
                gwf_free(&f);
                int rt = roundtrip(&c, "after-fail", r2, sizeof r2);
                why("fail:spec boom -> %s; then REQUEST on the same connection -> %s", res, r2);
                ok = ok && rt;
            }
            conn_close(&c);
        }
        report("15 fail: -> APP_ERROR, conn stays", ok);
    }
    /* 15b: a long TEXT: workers' messages are cut at 1000 characters (1.4 ERROR message) */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            size_t n = mf - 40 < 3000 ? mf - 40 : 3000;
            char *p = malloc(n + 1); memcpy(p, "fail:", 5); memset(p + 5, 'L', n - 5); p[n] = 0;
            uint64_t id = g_msgid++;
            send_req(&c, id, 1516, 5000, p, n);
            gwf f;
            if (wait_answer(&c, id, &f, 5000)) {
                ok = f.tag == T_ERROR && f.msgid == id && f.code == E_APP_ERROR && f.slen <= 1000 && f.slen > 100 &&
                     !strncmp(f.str, "RuntimeError: LLLL", 18);
                why("fail: + %zu chars -> ERROR code %u, message of %zu characters (1.4: cut at 1000)", n - 5, f.code, f.slen);
                gwf_free(&f);
                int rt = roundtrip(&c, "after-long-fail", r2, sizeof r2);
                ok = ok && rt;
            }
            free(p);
            conn_close(&c);
        }
        report("15b APP_ERROR message <= 1000", ok);
    }
    /* 15c: a number that does not parse is an APP_ERROR (1.14) */
    {
        conn c; int ok = 0; char all[800] = "";
        if (handshake(&c, NULL, NULL) == 0) {
            const char *bad[3] = { "defer:soon", "sleep:", "size:many" };
            int good = 0;
            for (int i = 0; i < 3; i++) {
                uint64_t id = g_msgid++; gwf f;
                send_str(&c, id, 1517, 5000, bad[i]);
                if (wait_answer(&c, id, &f, 5000)) {
                    if (f.tag == T_ERROR && f.code == E_APP_ERROR && f.msgid == id) good++;
                    describe(&f, res, sizeof res); gwf_free(&f);
                } else sfmt(res, sizeof res, "%s", g_why);
                size_t L = strlen(all); sfmt(all + L, sizeof all - L, "%s -> %.150s; ", bad[i], res);
            }
            int rt = roundtrip(&c, "after-bad-numbers", r2, sizeof r2);
            ok = good == 3 && rt;
            why("%sthen echo: %s", all, rt ? "ok" : r2);
            conn_close(&c);
        }
        report("15c unparsable number -> APP_ERROR", ok);
    }
    /* 15d: SEND gets nothing back, not even on a handler error (1.6) or for size:/none */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            char big[40]; sfmt(big, sizeof big, "size:%u", mf + 300);
            send_oneway(&c, g_msgid++, "fail:one-way");
            send_oneway(&c, g_msgid++, "size:100");
            send_oneway(&c, g_msgid++, big);
            send_oneway(&c, g_msgid++, "none");
            send_oneway(&c, g_msgid++, "defer:soon");
            int silent = expect_silence(&c, 400, res, sizeof res);
            int rt = roundtrip(&c, "after-sends", r2, sizeof r2);
            ok = silent && rt;
            why("SEND fail:/size:100/size:%u/none/defer:soon: %s; then REQUEST -> %s", mf + 300, silent ? "nothing came back" : res, r2);
            conn_close(&c);
        }
        report("15d SEND: no answer, even on error", ok);
    }
}

static void check16_deferred(void) {
    /* 16: defer:MS -> DEFERRED(msgid, cpid), then ~MS later REPLY(msgid, cpid, payload); while it is
       pending the connection serves other requests (1.6); nothing else follows */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            const int MS = 400;
            uint64_t id = g_msgid++, eid = g_msgid++;
            char pl[32]; sfmt(pl, sizeof pl, "defer:%d", MS);
            int64_t t0 = now_ms(), t_rep = -1, t_echo = -1;
            send_str(&c, id, 1616, 5000, pl);
            int got_def = 0, got_rep = 0, got_echo = 0, sent_echo = 0, good = 1; char seq[900] = "";
            int64_t dl = now_ms() + 5000;
            while (!(got_def && got_rep && got_echo)) {
                int left = (int)(dl - now_ms()); if (left < 0) left = 0;
                gwf f; int r = conn_read(&c, &f, left);
                if (r != RD_FRAME) { size_t L = strlen(seq); sfmt(seq + L, sizeof seq - L, "%s", rdname(r)); good = 0; break; }
                append(seq, sizeof seq, &f, t0);
                if (f.tag == T_DEFERRED && f.msgid == id) { if (got_def || f.cpid != 1616) good = 0; got_def = 1; }
                else if (f.tag == T_REPLY && f.msgid == id) { if (got_rep || f.cpid != 1616 || !is_data(&f, pl)) good = 0; got_rep = 1; t_rep = now_ms() - t0; }
                else if (f.tag == T_REPLY && f.msgid == eid) { if (got_echo || !is_data(&f, "meanwhile")) good = 0; got_echo = 1; t_echo = now_ms() - t0; }
                else good = 0;
                if (got_def && !sent_echo) { send_str(&c, eid, 1617, 5000, "meanwhile"); sent_echo = 1; }
                gwf_free(&f);
            }
            char res[300]; int silent = good && expect_silence(&c, 200, res, sizeof res);
            ok = good && got_def && got_rep && got_echo && silent && t_rep >= MS / 2 && t_echo < t_rep;
            why("%s%s (REPLY after %lld ms for %s; echo sent after the DEFERRED answered %s)", seq, silent ? "then nothing" : "",
                (long long)t_rep, pl, t_echo >= 0 && t_echo < t_rep ? "before it" : "NOT before it");
            conn_close(&c);
        }
        report("16 defer: -> DEFERRED then REPLY", ok);
    }
    /* 16b: two deferred requests in one write; the shorter one is answered first: match by msgid (1.7) */
    {
        conn c; int ok = 0;
        if (handshake(&c, NULL, NULL) == 0) {
            uint64_t a = g_msgid++, b = g_msgid++;
            wb w = {0}, w2 = {0};
            enc_request(&w, a, 1, 5000, "defer:700", 9); enc_request(&w2, b, 2, 5000, "defer:50", 8);
            wb_raw(&w, w2.b, w2.n); free(w2.b);
            int64_t t0 = now_ms();
            conn_send(&c, &w); free(w.b);
            int da = 0, db = 0, ra = 0, rb = 0, good = 1, order = 0, n = 0; char seq[900] = "";
            int64_t dl = now_ms() + 5000;
            while (!(da && db && ra && rb)) {
                int left = (int)(dl - now_ms()); if (left < 0) left = 0;
                gwf f; int r = conn_read(&c, &f, left);
                if (r != RD_FRAME) { size_t L = strlen(seq); sfmt(seq + L, sizeof seq - L, "%s", rdname(r)); good = 0; break; }
                append(seq, sizeof seq, &f, t0);
                n++;
                if (f.tag == T_DEFERRED && f.msgid == a && f.cpid == 1 && !da) da = 1;
                else if (f.tag == T_DEFERRED && f.msgid == b && f.cpid == 2 && !db) db = 1;
                else if (f.tag == T_REPLY && f.msgid == a && f.cpid == 1 && is_data(&f, "defer:700") && !ra) { ra = 1; if (rb) order = 1; }
                else if (f.tag == T_REPLY && f.msgid == b && f.cpid == 2 && is_data(&f, "defer:50") && !rb) rb = 1;
                else good = 0;
                gwf_free(&f);
            }
            ok = good && da && db && ra && rb && order;
            why("%s(final answers %s)", seq, order ? "shorter delay first" : "NOT in completion order");
            conn_close(&c);
        }
        report("16b two deferred, matched by msgid", ok);
    }
}

/* 16c: SEND defer:MS -> nothing comes back (1.6 "nothing comes back"; 1.14 "SEND frames get no answer") */
static void check16c_send_defer(void) {
    {
        conn c; int ok = 0; char res[300], r2[512];
        if (handshake(&c, NULL, NULL) == 0) {
            send_oneway(&c, g_msgid++, "defer:50");
            int silent = expect_silence(&c, 500, res, sizeof res);
            int rt = roundtrip(&c, "after-send-defer", r2, sizeof r2);
            int silent2 = silent && expect_silence(&c, 100, res, sizeof res);
            ok = silent && rt && silent2;
            why("SEND defer:50: %s; then REQUEST -> %s", silent && silent2 ? "nothing came back within 600 ms" : res, r2);
            conn_close(&c);
        }
        report("16c SEND defer: gets no answer", ok);
    }
}

static void check17_push(void) {
    /* 17: push:DATA -> PUSH(cpid 0, source "", DATA) to the sender + REPLY(msgid, cpid, payload), either
       order; for a named and an anonymous sender; another connected client gets nothing */
    conn other; int have_other = handshake(&other, "spec-bystander", NULL) == 0;
    for (int named = 1; named >= 0; named--) {
        conn c; int ok = 0;
        if (handshake(&c, named ? "spec-pushee" : NULL, NULL) == 0) {
            static const char pl[] = "push:\x00\x01 bin\xff"; size_t pn = sizeof pl - 1;
            uint64_t id = g_msgid++;
            int64_t t0 = now_ms();
            send_req(&c, id, 1717, 5000, pl, pn);
            int got_push = 0, got_rep = 0, good = 1; char seq[700] = "";
            int64_t dl = now_ms() + 5000;
            while (!(got_push && got_rep)) {
                int left = (int)(dl - now_ms()); if (left < 0) left = 0;
                gwf f; int r = conn_read(&c, &f, left);
                if (r != RD_FRAME) { size_t L = strlen(seq); sfmt(seq + L, sizeof seq - L, "%s", rdname(r)); good = 0; break; }
                append(seq, sizeof seq, &f, t0);
                if (f.tag == T_PUSH) {
                    if (got_push || f.cpid != 0 || f.slen != 0 || f.dlen != pn - 5 || memcmp(f.data, pl + 5, pn - 5)) good = 0;
                    got_push = 1;
                } else if (f.tag == T_REPLY && f.msgid == id) {
                    if (got_rep || f.cpid != 1717 || f.dlen != pn || memcmp(f.data, pl, pn)) good = 0;
                    got_rep = 1;
                } else good = 0;
                gwf_free(&f);
            }
            char res[300] = "", res2[300] = "";
            int silent = good && expect_silence(&c, 200, res, sizeof res);
            int others = !have_other || expect_silence(&other, 1, res2, sizeof res2);
            ok = good && got_push && got_rep && silent && others && have_other;
            why("%s sender: %s%s; bystander: %s", named ? "named" : "anonymous", seq, silent ? "then nothing" : res,
                !have_other ? "could not connect" : others ? "nothing" : res2);
            conn_close(&c);
        }
        report(named ? "17 push: -> worker PUSH + REPLY" : "17b push: to an anonymous client", ok);
    }
    if (have_other) conn_close(&other);
}

static void check18_late(void) {
    /* 18: REQUEST timeout_ms 50 with sleep:400: the gateway does not enforce timeout_ms (1.4), so the
       (late) REPLY still comes with its msgid; an echo sent meanwhile is answered too */
    conn c; int ok = 0;
    if (handshake(&c, NULL, NULL) == 0) {
        const int MS = 400;
        uint64_t a = g_msgid++, b = g_msgid++;
        char pl[32]; sfmt(pl, sizeof pl, "sleep:%d", MS);
        int64_t t0 = now_ms(), ta = -1;
        send_str(&c, a, 1818, 50, pl);
        send_str(&c, b, 1819, 5000, "not-sleeping");
        int ra = 0, rb = 0, good = 1; char seq[600] = "";
        int64_t dl = now_ms() + 5000;
        while (!(ra && rb)) {
            int left = (int)(dl - now_ms()); if (left < 0) left = 0;
            gwf f; int r = conn_read(&c, &f, left);
            if (r != RD_FRAME) { size_t L = strlen(seq); sfmt(seq + L, sizeof seq - L, "%s", rdname(r)); good = 0; break; }
            append(seq, sizeof seq, &f, t0);
            if (f.tag == T_REPLY && f.msgid == a && f.cpid == 1818 && is_data(&f, pl) && !ra) { ra = 1; ta = now_ms() - t0; }
            else if (f.tag == T_REPLY && f.msgid == b && f.cpid == 1819 && is_data(&f, "not-sleeping") && !rb) rb = 1;
            else good = 0;
            gwf_free(&f);
        }
        char res[300]; int silent = good && expect_silence(&c, 200, res, sizeof res);
        ok = good && ra && rb && silent && ta >= MS * 3 / 4;
        why("timeout_ms 50 + %s, then an echo: %s%s (the sleep's REPLY %lld ms after sending)", pl, seq, silent ? "then nothing" : res, (long long)ta);
        conn_close(&c);
    }
    report("18 late REPLY past timeout_ms", ok);
}

static void check19_size(uint32_t mf) {
    /* 19: size:N -> REPLY of N bytes 'x'.  1.2/1.13: a gateway frame body is at most max_frame + 260; with
       msgid and cpid below 128 a REPLY body is 7 + N (fixarray, tag, msgid, cpid, bin16 header) for
       256 <= N <= 65535, so the largest reply that fits is N = max_frame + 253; one byte more is APP_ERROR */
    conn c;
    if (handshake(&c, NULL, NULL) < 0) { report("19 size: replies", 0); return; }
    uint32_t nmax = mf + 260 - 7;
    struct { uint32_t n; int fits; const char *name; } cases[] = {
        { 0, 1, "19a size:0 -> empty REPLY" },
        { mf, 1, "19b size:max_frame -> REPLY" },
        { nmax, 1, "19c largest REPLY (max_frame+253)" },
        { nmax + 1, 0, "19d one byte more -> APP_ERROR" },
        { 1u << 24, 0, "19e size:16 MiB -> APP_ERROR" },
    };
    uint64_t id = 1; /* own connection: small msgids (fixint) keep the REPLY header at 7 bytes */
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++, id++) {
        char pl[32]; sfmt(pl, sizeof pl, "size:%u", cases[i].n);
        send_str(&c, id, 19, 5000, pl);
        gwf f; int ok = 0;
        if (wait_answer(&c, id, &f, 5000)) {
            char d[300]; describe(&f, d, sizeof d);
            if (cases[i].fits) {
                int intact = f.tag == T_REPLY && f.cpid == 19 && f.dlen == cases[i].n;
                for (size_t k = 0; intact && k < f.dlen; k++) intact = f.data[k] == 'x';
                ok = intact && (cases[i].n < 256 || f.body_len == cases[i].n + 7);
                why("%s -> %s, body %zu bytes (max_frame %u, limit max_frame+260 = %u)%s", pl, d, f.body_len, mf, mf + 260,
                    intact ? "" : " NOT intact");
            } else {
                ok = f.tag == T_ERROR && f.code == E_APP_ERROR && f.cpid == 19;
                why("%s -> %.300s", pl, d);
            }
            gwf_free(&f);
        }
        report(cases[i].name, ok);
    }
    char r2[512]; int rt = roundtrip(&c, "after-sizes", r2, sizeof r2);
    why("echo after the size: requests -> %s", r2);
    report("19f connection fine after sizes", rt);
    conn_close(&c);
}

static void check20_none(void) {
    /* 20: none -> nothing, ever; the connection keeps working and no late answer turns up */
    conn c; int ok = 0;
    if (handshake(&c, NULL, NULL) == 0) {
        uint64_t id = g_msgid++;
        send_str(&c, id, 2020, 5000, "none");
        char res[300] = "", r2[512] = "", res3[300] = "";
        int silent = expect_silence(&c, 500, res, sizeof res);
        int rt = roundtrip(&c, "after-none", r2, sizeof r2);
        int silent2 = expect_silence(&c, 200, res3, sizeof res3);
        ok = silent && rt && silent2;
        why("none (msgid %llu): %s for 500 ms; then REQUEST -> %s; then %s", (unsigned long long)id,
            silent ? "nothing" : res, r2, silent2 ? "nothing" : res3);
        conn_close(&c);
    }
    report("20 none -> no answer, conn works", ok);
}

static void check21_mixed(void) {
    /* 21: every kind of answer at once, in one write: dispatch by msgid until each expected answer is in,
       then nothing more (none stays silent, no duplicates) */
    conn c; int ok = 0;
    if (handshake(&c, "spec-mixed", NULL) < 0) { report("21 mixed pipeline by msgid", 0); return; }
    enum { ECHO1, FAIL, DEFER, PUSH, SLEEP, NONE, SIZE, ECHO2, NK };
    const char *pl[NK] = { "mix-echo", "fail:mixed", "defer:150", "push:mixed-push", "sleep:100", "none", "size:1000", "mix-echo-2" };
    uint64_t base = 2100000; wb w = {0}, one = {0};
    for (int k = 0; k < NK; k++) { enc_request(&one, base + (uint64_t)k, 2100 + (uint64_t)k, 5000, pl[k], strlen(pl[k])); wb_raw(&w, one.b, one.n); }
    free(one.b);
    int64_t t0 = now_ms();
    conn_send(&c, &w); free(w.b);
    int ans[NK] = {0}, deferred = 0, pushed = 0, bad = 0; char seq[1400] = "";
    int64_t dl = now_ms() + 5000;
    for (;;) {
        int done = pushed == 1 && deferred == 1;
        for (int k = 0; k < NK; k++) if (k != NONE && ans[k] != 1) done = 0;
        if (done) break;
        int left = (int)(dl - now_ms()); if (left < 0) left = 0;
        gwf f; int r = conn_read(&c, &f, left);
        if (r != RD_FRAME) { size_t L = strlen(seq); sfmt(seq + L, sizeof seq - L, "%s", rdname(r)); bad++; break; }
        append(seq, sizeof seq, &f, t0);
        if (f.tag == T_PUSH) { if (f.slen || f.cpid || !is_data(&f, "mixed-push")) bad++; pushed++; }
        else if (f.msgid < base || f.msgid >= base + NK || f.cpid != 2100 + (f.msgid - base)) bad++;
        else {
            int k = (int)(f.msgid - base);
            if (f.tag == T_DEFERRED) { if (k != DEFER) bad++; deferred++; }
            else if (f.tag == T_ERROR) { if (k != FAIL || f.code != E_APP_ERROR) bad++; ans[k]++; }
            else if (f.tag == T_REPLY) {
                int good = k == SIZE ? f.dlen == 1000 : is_data(&f, pl[k]);
                if (!good || k == FAIL || k == NONE) bad++;
                ans[k]++;
            } else bad++;
        }
        gwf_free(&f);
    }
    char res[300] = "";
    int silent = !bad && expect_silence(&c, 300, res, sizeof res);
    ok = !bad && silent;
    why("8 requests (echo, fail, defer, push, sleep, none, size, echo): %s%s", seq, silent ? "then nothing" : res);
    conn_close(&c);
    report("21 mixed pipeline by msgid", ok);
}

static void check22_frame_bound(uint32_t mf) {
    why("%lu gateway frames read in this run, largest body %zu bytes, %lu above max_frame+260 = %u (1.2)",
        g_frames_seen, g_max_body_seen, g_oversize, mf + 260);
    report("22 no body above max_frame+260", g_oversize == 0 && g_frames_seen > 0);
}

/* ---------------------------------------------------------------- doc examples (1.12) decode as documented */
static int hexbytes(const char *h, uint8_t *out) { size_t n = 0; while (h[0] && h[1]) { unsigned x; sscanf(h, "%2x", &x); out[n++] = (uint8_t)x; h += 2; } return (int)n; }
static void check0_examples(void) {
    struct { const char *hex; int tag; uint64_t msgid, cpid; uint32_t code; const char *str; const char *data; } ex[] = {
        { "0000000e9610010001a5616c696365cd1ed2", T_WELCOME, 0, 0, 0, "alice", NULL },
        { "000000089411012ac4026869", T_REPLY, 1, 42, 0, NULL, "hi" },
        { "0000001b9514032a08b56e6f20636c69656e74206e616d65642027626f6227", T_ERROR, 3, 42, 8, "no client named 'bob'", NULL },
        { "000000069411032ac400", T_REPLY, 3, 42, 0, NULL, "" },
        { "0000000d941300a5616c696365c402796f", T_PUSH, 0, 0, 0, "alice", "yo" },
        { "0000000a941300a22330c402796f", T_PUSH, 0, 0, 0, "#0", "yo" },
        { "000000049312012a", T_DEFERRED, 1, 42, 0, NULL, NULL },
        { "000000199514000009b36e6f2048454c4c4f2077697468696e20352073", T_ERROR, 0, 0, 9, "no HELLO within 5 s", NULL },
    };
    int ok = 1; char bad[400] = "";
    for (size_t i = 0; i < sizeof ex / sizeof ex[0]; i++) {
        uint8_t b[128]; int n = hexbytes(ex[i].hex, b);
        uint32_t L = (uint32_t)be(b, 4);
        gwf f; char err[128];
        int good = (int)L == n - 4 && gw_decode(b + 4, L, &f, err, sizeof err);
        if (good) {
            good = f.tag == ex[i].tag && f.msgid == ex[i].msgid && f.cpid == ex[i].cpid && f.code == ex[i].code &&
                   (!ex[i].str || strcmp(f.str, ex[i].str) == 0) &&
                   (!ex[i].data || (f.dlen == strlen(ex[i].data) && !memcmp(f.data, ex[i].data, f.dlen)));
            gwf_free(&f);
        }
        if (!good) { ok = 0; size_t l = strlen(bad); sfmt(bad + l, sizeof bad - l, "example %zu; ", i); }
    }
    /* client-direction examples: our encoder produces them byte for byte */
    wb w = {0}; uint8_t b[128]; int n;
    enc_hello(&w, 1, "alice"); n = hexbytes("00000009930101a5616c696365", b); if ((int)w.n != n || memcmp(w.b, b, (size_t)n)) { ok = 0; strcat(bad, "HELLO; "); }
    enc_relay(&w, 3, 42, "bob", "yo", 2); n = hexbytes("0000000c9504032aa3626f62c402796f", b); if ((int)w.n != n || memcmp(w.b, b, (size_t)n)) { ok = 0; strcat(bad, "RELAY; "); }
    free(w.b);
    why("%s", ok ? "all 8 gateway-direction examples of 1.12 decode to the documented fields; HELLO/REQUEST/SEND/RELAY examples re-encode byte for byte" : bad);
    report("0 doc examples (1.12)", ok);
}

/* ---------------------------------------------------------------- refusal mode (gateway with --max-clients 2 --max-per-ip 1) */
static int conn_open_from(conn *c, const char *src) {
    memset(c, 0, sizeof *c); c->fd = -1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in s = { .sin_family = AF_INET }; inet_pton(AF_INET, src, &s.sin_addr);
    if (bind(fd, (struct sockaddr *)&s, sizeof s) < 0) { close(fd); return -1; }
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)g_port) }; inet_pton(AF_INET, g_host, &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { close(fd); return -1; }
    c->fd = fd; c->cap = 65536; c->buf = malloc(c->cap);
    return 0;
}
static int hello_welcome(conn *c, const char *src, int *refused_code) {
    if (conn_open_from(c, src) < 0) return -1;
    wb w = {0}; enc_hello(&w, 1, ""); conn_send(c, &w); free(w.b);
    gwf f; int r = conn_read(c, &f, 5000);
    if (r != RD_FRAME) return -1;
    int ok = f.tag == T_WELCOME;
    if (!ok && f.tag == T_ERROR && refused_code) *refused_code = (int)f.code;
    gwf_free(&f);
    return ok ? 0 : 1;
}
static int refusal(void) {
    conn a, b, d, e; int ok;
    ok = hello_welcome(&a, "127.0.0.1", NULL) == 0;
    why("first client from 127.0.0.1 %s", ok ? "welcomed" : "NOT welcomed");
    if (!ok) { report("11s refusals: setup", 0); return 1; }
    /* second from the same IP: TOO_MANY_FROM_IP before any frame (we send nothing) */
    ok = conn_open_from(&b, "127.0.0.1") == 0 && expect_conn_error(&b, E_TOO_MANY_FROM_IP, 5000, NULL, 0);
    conn_close(&b);
    report("11s TOO_MANY_FROM_IP", ok);
    int ok2 = hello_welcome(&d, "127.0.0.2", NULL) == 0;
    ok = ok2 && conn_open_from(&e, "127.0.0.3") == 0 && expect_conn_error(&e, E_SERVER_FULL, 5000, NULL, 0);
    conn_close(&e);
    report("11t SERVER_FULL", ok);
    /* both limits at once (127.0.0.2 again while full): 1.5 "If both limits apply, the answer is SERVER_FULL" */
    int code = 0;
    if (conn_open_from(&e, "127.0.0.2") == 0) { gwf f; int r = conn_read(&e, &f, 5000); if (r == RD_FRAME) { code = f.tag == T_ERROR ? (int)f.code : -1; gwf_free(&f); } }
    why("full AND per-IP limit reached: ERROR code %d (%s)", code, code == 6 ? "SERVER_FULL" : code == 7 ? "TOO_MANY_FROM_IP" : "?");
    conn_close(&e);
    report("11u both limits: SERVER_FULL", code == 6);
    /* free a place, reconnect with short back-off (1.5: may be refused once more) */
    conn_close(&a);
    int64_t t0 = now_ms(); int tries = 0; ok = 0;
    while (now_ms() - t0 < 5000) {
        tries++; int rc = 0;
        int r = hello_welcome(&a, "127.0.0.1", &rc);
        conn_close(&a);
        if (r == 0) { ok = 1; break; }
        struct timespec ts = { 0, 20 * 1000000 }; nanosleep(&ts, NULL);
    }
    why("after close, welcomed again after %d attempt(s), %lld ms", tries, (long long)(now_ms() - t0));
    report("11v place freed after close", ok);
    conn_close(&d);
    return g_fail ? 1 : 0;
}
/* ---------------------------------------------------------------- watch mode: SHUTTING_DOWN at a graceful stop */
static int watch(void) {
    conn c; gwf w;
    if (handshake(&c, "spec-watcher", &w) < 0) { report("12 SHUTTING_DOWN at stop", 0); return 1; }
    /* tell the caller we are connected, and our (sid, generation) so that it can find them in duprep status */
    printf("READY %u %u\n", w.sid, w.gen);
    fflush(stdout);
    gwf_free(&w);
    int64_t t0 = now_ms();
    gwf f; int r = conn_read(&c, &f, 45000);
    int ok = 0;
    if (r == RD_FRAME) {
        char d[512]; describe(&f, d, sizeof d);
        ok = f.tag == T_ERROR && f.msgid == 0 && f.cpid == 0 && f.code == E_SHUTTING_DOWN;
        gwf_free(&f);
        int r2 = conn_read(&c, &f, 10000);
        if (r2 == RD_FRAME) gwf_free(&f);
        ok = ok && r2 == RD_EOF;
        why("%s %lld ms after READY, then %s", d, (long long)(now_ms() - t0), rdname(r2));
    } else why("%s after %lld ms", rdname(r), (long long)(now_ms() - t0));
    report("12 SHUTTING_DOWN at stop", ok);
    conn_close(&c);
    return ok ? 0 : 1;
}

static const struct { const char *name; void (*fn)(void); void (*fn_mf)(uint32_t); } groups[] = {
    { "0", check0_examples, NULL }, { "1", check1_welcome, NULL }, { "2", check2_request, NULL },
    { "3", check3_pipeline, NULL }, { "4", check4_relay, NULL }, { "5", check5_unknown_target, NULL },
    { "5c", check5c_exact_match, NULL }, { "6", check6_name_taken, NULL }, { "7", NULL, check7_too_large },
    { "8", check8_garbage, NULL }, { "9", check9_request_before_hello, NULL }, { "10", check10_send, NULL },
    { "11", check11_extras, NULL }, { "11n", NULL, check11_more },
    /* the conformance app (1.14) */
    { "15", NULL, check15_app_error }, { "16", check16_deferred, NULL }, { "16c", check16c_send_defer, NULL },
    { "17", check17_push, NULL }, { "18", check18_late, NULL }, { "19", NULL, check19_size },
    { "20", check20_none, NULL }, { "21", check21_mixed, NULL },
    { "22", NULL, check22_frame_bound }, /* last: covers every frame read before it */
};

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s HOST PORT MAX_FRAME HANDSHAKE_S checks [SKIP...] | only GROUP... | refusal | watch\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    g_host = argv[1]; g_port = atoi(argv[2]); g_expect_mf = (uint32_t)strtoul(argv[3], NULL, 10);
    g_handshake_s = atoi(argv[4]);
    const char *mode = argv[5];
    if (!strcmp(mode, "watch")) return watch();
    if (!strcmp(mode, "refusal")) return refusal();
    if ((strcmp(mode, "checks") && strcmp(mode, "only")) || g_expect_mf < MIN_MAX_FRAME || g_handshake_s < 1) {
        fprintf(stderr, "checks need MAX_FRAME >= %u and HANDSHAKE_S >= 1\n", MIN_MAX_FRAME);
        return 2;
    }
    /* "checks [SKIP...]": all groups, SKIP names reported as KNOWN; "only GROUP...": just those groups */
    int only = !strcmp(mode, "only");
    if (!only) { g_skip = argv + 6; g_nskip = argc - 6; }
    uint32_t mf = g_expect_mf;
    int64_t t0 = now_ms();
    for (size_t i = 0; i < sizeof groups / sizeof groups[0]; i++) {
        int run = !only;
        for (int k = 6; only && k < argc; k++) if (!strcmp(argv[k], groups[i].name)) run = 1;
        if (!run) continue;
        if (groups[i].fn) groups[i].fn(); else groups[i].fn_mf(mf);
    }
    printf("checks: %d passed, %d failed, %d known mismatches, %lld ms\n", g_pass, g_fail, g_known, (long long)(now_ms() - t0));
    return g_fail ? 1 : 0;
}
