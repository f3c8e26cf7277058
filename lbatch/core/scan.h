/* Byte scanners (scan.c), also built alone by the fuzz harness. */
#ifndef LBATCH_SCAN_H
#define LBATCH_SCAN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#pragma GCC visibility push(hidden)   /* core.h says why */

enum { LB_FOUND = 0, LB_ABSENT = -1, LB_COMPLEX = -2 };

/* The length of the valid UTF-8 sequence (RFC 3629: no overlong forms, no
 * surrogates, nothing past U+10FFFF) that starts with the byte s[i] >= 0x80,
 * or 0. Inline: the encoder (enc.c) runs it on every non-ASCII character. */
static inline size_t lb_utf8_seq(const unsigned char *s, size_t n, size_t i) {
  unsigned char c = s[i], lo = 0x80, hi = 0xBF;
  size_t need;
  if (c >= 0xC2 && c <= 0xDF) need = 1;
  else if (c == 0xE0) { need = 2; lo = 0xA0; }
  else if (c >= 0xE1 && c <= 0xEC) need = 2;
  else if (c == 0xED) { need = 2; hi = 0x9F; }
  else if (c >= 0xEE && c <= 0xEF) need = 2;
  else if (c == 0xF0) { need = 3; lo = 0x90; }
  else if (c >= 0xF1 && c <= 0xF3) need = 3;
  else if (c == 0xF4) { need = 3; hi = 0x8F; }
  else return 0;
  if (i + need >= n || s[i + 1] < lo || s[i + 1] > hi) return 0;   /* cut short, or out of range */
  if (need >= 2 && (s[i + 2] < 0x80 || s[i + 2] > 0xBF)) return 0;
  if (need == 3 && (s[i + 3] < 0x80 || s[i + 3] > 0xBF)) return 0;
  return need + 1;
}
/* The first '"' or '\\' in s[i..n), or n: what ends or escapes a JSON
 * string. Most strings in a result line are short (keys, ids), where one
 * memchr call each for the quote and the backslash costs more than the
 * search: sixteen bytes at a time (SSE2, on every x86-64; eight
 * elsewhere) for the first 64, then memchr. Inline: the
 * scanners (scan.c, rec.c) run it on every string of every line. */
static inline size_t lb_str_stop(const char *s, size_t n, size_t i) {
#ifdef __SSE2__
  const __m128i quote = _mm_set1_epi8('"'), bs = _mm_set1_epi8('\\');
  size_t lim = i + 64;
  while (i + 16 <= n && i < lim) {
    __m128i x = _mm_loadu_si128((const __m128i *)(const void *)(s + i));
    unsigned m = (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, bs)));
    if (m) return i + (size_t)__builtin_ctz(m);
    i += 16;
  }
#else
  const uint64_t ones = 0x0101010101010101u, highs = 0x8080808080808080u;
  size_t lim = i + 64;
  while (i + 8 <= n && i < lim) {
    uint64_t x, q, b;
    memcpy(&x, s + i, 8);
    q = x ^ (ones * '"');
    b = x ^ (ones * '\\');
    if ((((q - ones) & ~q) | ((b - ones) & ~b)) & highs) break;   /* a byte of them in these eight */
    i += 8;
  }
#endif
  if (i < n && i >= lim) {                    /* a long string: memchr */
    const char *q = memchr(s + i, '"', n - i), *b = memchr(s + i, '\\', (size_t)((q ? q : s + n) - (s + i)));
    return (size_t)((b ? b : q ? q : s + n) - s);
  }
  while (i < n && s[i] != '"' && s[i] != '\\') i++;
  return i;
}
long lb_utf8_invalid(const unsigned char *s, size_t n);
int lb_json_string(const char *s, size_t n, const char *key, size_t klen, size_t *off, size_t *len);
int lb_header_value(const char *p, size_t n, const char *name, const char **v, size_t *vlen);

/* rec.c: a result line's fields, found in one pass */
enum { LB_J_ABSENT = 0, LB_J_NULL, LB_J_FALSE, LB_J_TRUE, LB_J_NUM, LB_J_STR, LB_J_OBJ, LB_J_ARR };
typedef struct lb_span {
  size_t off, len;  /* a string's content (inside the quotes), else the whole value */
  int kind, esc;    /* esc: the string holds a backslash */
} lb_span;
typedef struct lb_result {
  lb_span custom_id, id, error, response, status_code, request_id, body, model, created, body_error,
          usage, choices, choice0, message, content, reasoning, data, datum0, embedding;
  size_t body_keys;  /* the body's keys whose value is not null */
} lb_result;
/* 1 when s is one JSON object (strict JSON, nesting up to 256), its fields in r */
int lb_result_scan(const char *s, size_t n, lb_result *r);
/* a string's content unescaped into out (room for n bytes): its length,
 * or -1 when lua-cjson would refuse it (a lone surrogate, a bad escape) */
long lb_json_unescape(const char *s, size_t n, char *out);

#pragma GCC visibility pop

#endif
