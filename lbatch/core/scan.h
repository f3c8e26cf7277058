/* Byte scanners (scan.c), also built alone by the fuzz harness. */
#ifndef LBATCH_SCAN_H
#define LBATCH_SCAN_H

#include <stddef.h>

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
