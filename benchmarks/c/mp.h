/* mp.h - the msgpack subset that duprep's wire frames use, for the C peers.
 *
 * What: encoders that always pick the smallest encoding (as msgspec does) and
 * a bounds-checked cursor decoder for positive ints, bin, str and array
 * headers; plus the 4-byte big-endian length prefix of every wire frame.
 * Why: loadgen.c and cecho.c must speak exactly duprep/frame.py's framing
 * without linking a msgpack library, and both need the same code.
 * Everything is static inline; a decode failure returns 0 and leaves the
 * cursor unspecified (callers then treat the frame as bad).
 */
#ifndef BENCH_MP_H
#define BENCH_MP_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Frame tags (duprep/frame.py). */
enum { TAG_HELLO = 1, TAG_REQUEST = 2, TAG_WELCOME = 16, TAG_REPLY = 17, TAG_ERROR = 20 };

static inline void mp_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline uint32_t mp_rd32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* ---- encoding: the caller guarantees room (at most 9 bytes per header) ---- */

static inline uint8_t *mp_put_array(uint8_t *p, unsigned n) {
    *p++ = (uint8_t)(0x90 | n);         /* fixarray: our frames have < 16 fields */
    return p;
}

static inline uint8_t *mp_put_uint(uint8_t *p, uint64_t v) {
    if (v < 128) { *p++ = (uint8_t)v; }
    else if (v <= 0xff) { *p++ = 0xcc; *p++ = (uint8_t)v; }
    else if (v <= 0xffff) { *p++ = 0xcd; *p++ = (uint8_t)(v >> 8); *p++ = (uint8_t)v; }
    else if (v <= 0xffffffffu) { *p++ = 0xce; mp_be32(p, (uint32_t)v); p += 4; }
    else { *p++ = 0xcf; mp_be32(p, (uint32_t)(v >> 32)); mp_be32(p + 4, (uint32_t)v); p += 8; }
    return p;
}

static inline uint8_t *mp_put_bin_header(uint8_t *p, uint32_t n) {
    if (n <= 0xff) { *p++ = 0xc4; *p++ = (uint8_t)n; }
    else if (n <= 0xffff) { *p++ = 0xc5; *p++ = (uint8_t)(n >> 8); *p++ = (uint8_t)n; }
    else { *p++ = 0xc6; mp_be32(p, n); p += 4; }
    return p;
}

static inline uint8_t *mp_put_str(uint8_t *p, const char *s, uint32_t n) {
    if (n < 32) { *p++ = (uint8_t)(0xa0 | n); }
    else if (n <= 0xff) { *p++ = 0xd9; *p++ = (uint8_t)n; }
    else { *p++ = 0xda; *p++ = (uint8_t)(n >> 8); *p++ = (uint8_t)n; }
    memcpy(p, s, n);
    return p + n;
}

/* ---- decoding ---- */

typedef struct { const uint8_t *p, *end; } mp_cur;

static inline int mp_get_array(mp_cur *c, uint32_t *n) {
    if (c->p >= c->end) return 0;
    uint8_t b = *c->p++;
    if ((b & 0xf0) == 0x90) { *n = b & 0x0f; return 1; }
    if (b == 0xdc && c->end - c->p >= 2) { *n = ((uint32_t)c->p[0] << 8) | c->p[1]; c->p += 2; return 1; }
    return 0;
}

static inline int mp_get_uint(mp_cur *c, uint64_t *v) {
    if (c->p >= c->end) return 0;
    uint8_t b = *c->p++;
    ptrdiff_t left = c->end - c->p;
    if (b < 0x80) { *v = b; return 1; }
    if (b == 0xcc && left >= 1) { *v = c->p[0]; c->p += 1; return 1; }
    if (b == 0xcd && left >= 2) { *v = ((uint64_t)c->p[0] << 8) | c->p[1]; c->p += 2; return 1; }
    if (b == 0xce && left >= 4) { *v = mp_rd32(c->p); c->p += 4; return 1; }
    if (b == 0xcf && left >= 8) { *v = ((uint64_t)mp_rd32(c->p) << 32) | mp_rd32(c->p + 4); c->p += 8; return 1; }
    return 0;
}

/* bin or str: both are "some bytes" for our purposes. */
static inline int mp_get_bytes(mp_cur *c, const uint8_t **data, uint32_t *n) {
    if (c->p >= c->end) return 0;
    uint8_t b = *c->p++;
    ptrdiff_t left = c->end - c->p;
    uint32_t len;
    if ((b & 0xe0) == 0xa0) { len = b & 0x1f; }
    else if ((b == 0xc4 || b == 0xd9) && left >= 1) { len = c->p[0]; c->p += 1; }
    else if ((b == 0xc5 || b == 0xda) && left >= 2) { len = ((uint32_t)c->p[0] << 8) | c->p[1]; c->p += 2; }
    else if ((b == 0xc6 || b == 0xdb) && left >= 4) { len = mp_rd32(c->p); c->p += 4; }
    else return 0;
    if ((uint64_t)(c->end - c->p) < len) return 0;
    *data = c->p; *n = len; c->p += len;
    return 1;
}

#endif /* BENCH_MP_H */
