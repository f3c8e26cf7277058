/* libFuzzer harness for the core's byte scanners (lbatch/core/scan.c):
 * they read untrusted bytes (users' files, servers' answers). The first
 * byte picks the scanner; each result is checked against a property or an
 * independent reference (a UTF-8 decoder; a strict JSON parser), and
 * AddressSanitizer catches any read past the input. The result line
 * scanner (rec.c) is held against the custom_id scanner: two walks written
 * apart must agree on every line both read. Built and run by spec/fuzz/run
 * (make fuzz; a short run in make test); fuzz_enc.c fuzzes the encoder. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../../lbatch/core/scan.h"

/* a second, independent UTF-8 check: decode code points, then judge them */
static long ref_utf8(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned c = s[i], cp, k, len;
    if (c < 0x80) { i++; continue; }
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else return (long)i;
    if (i + len > n) return (long)i;
    for (k = 1; k < len; k++) {
      if ((s[i + k] & 0xC0) != 0x80) return (long)i;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000)) return (long)i;
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return (long)i;
    i += len;
  }
  return -1;
}

/* A second, independent reading of a JSON line for lb_json_string: a
 * strict recursive parser (RFC 8259) that decodes every string. For a
 * well-formed object it gives the decoded value of the last `key`, and
 * whether the scanner could have answered cheaply (no key escaped, that
 * value a string without escapes). */
typedef struct { const unsigned char *s; size_t n, i; int depth; } ref_p;

static void ref_ws(ref_p *p) {
  while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\r' || p->s[p->i] == '\n')) p->i++;
}

static int ref_hex(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* a string at the quote p->i: its decoded bytes into out (up to cap; *len
 * the full length), *esc when it held an escape; 0 when malformed */
static int ref_string(ref_p *p, unsigned char *out, size_t cap, size_t *len, int *esc) {
  size_t k = 0;
  *esc = 0;
  p->i++;
  while (p->i < p->n) {
    unsigned c = p->s[p->i++];
    if (c == '"') { *len = k; return 1; }
    if (c < 0x20) return 0;
    if (c == '\\') {
      unsigned e, cp = 0;
      int j;
      *esc = 1;
      if (p->i >= p->n) return 0;
      e = p->s[p->i++];
      switch (e) {
      case '"': case '\\': case '/': c = e; break;
      case 'b': c = '\b'; break;
      case 'f': c = '\f'; break;
      case 'n': c = '\n'; break;
      case 'r': c = '\r'; break;
      case 't': c = '\t'; break;
      case 'u':
        if (p->i + 4 > p->n) return 0;
        for (j = 0; j < 4; j++) {
          int h = ref_hex(p->s[p->i++]);
          if (h < 0) return 0;
          cp = cp * 16 + (unsigned)h;
        }
        c = cp < 0x80 ? cp : '?';   /* the key compared is ASCII: the rest need not decode exactly */
        break;
      default: return 0;
      }
    }
    if (k < cap) out[k] = (unsigned char)c;
    k++;
  }
  return 0;
}

static int ref_value(ref_p *p);

static int ref_literal(ref_p *p, const char *w) {
  size_t l = strlen(w);
  if (p->i + l > p->n || memcmp(p->s + p->i, w, l) != 0) return 0;
  p->i += l;
  return 1;
}

static int ref_number(ref_p *p) {
  size_t i = p->i, d;
  if (i < p->n && p->s[i] == '-') i++;
  if (i < p->n && p->s[i] == '0') i++;
  else if (i < p->n && p->s[i] >= '1' && p->s[i] <= '9') { while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') i++; }
  else return 0;
  if (i < p->n && p->s[i] == '.') {
    d = ++i;
    while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') i++;
    if (i == d) return 0;
  }
  if (i < p->n && (p->s[i] == 'e' || p->s[i] == 'E')) {
    i++;
    if (i < p->n && (p->s[i] == '+' || p->s[i] == '-')) i++;
    d = i;
    while (i < p->n && p->s[i] >= '0' && p->s[i] <= '9') i++;
    if (i == d) return 0;
  }
  p->i = i;
  return 1;
}

static int ref_value(ref_p *p) {
  unsigned char c;
  ref_ws(p);
  if (p->i >= p->n) return 0;
  c = p->s[p->i];
  if (c == '"') { size_t l; int e; return ref_string(p, NULL, 0, &l, &e); }
  if (c == '{' || c == '[') {
    unsigned char close = c == '{' ? '}' : ']';
    if (++p->depth > 64) return 0;
    p->i++;
    ref_ws(p);
    if (p->i < p->n && p->s[p->i] == close) { p->i++; p->depth--; return 1; }
    for (;;) {
      ref_ws(p);
      if (c == '{') {
        size_t l; int e;
        if (p->i >= p->n || p->s[p->i] != '"' || !ref_string(p, NULL, 0, &l, &e)) return 0;
        ref_ws(p);
        if (p->i >= p->n || p->s[p->i++] != ':') return 0;
      }
      if (!ref_value(p)) return 0;
      ref_ws(p);
      if (p->i < p->n && p->s[p->i] == ',') { p->i++; continue; }
      if (p->i < p->n && p->s[p->i] == close) { p->i++; p->depth--; return 1; }
      return 0;
    }
  }
  if (c == 't') return ref_literal(p, "true");
  if (c == 'f') return ref_literal(p, "false");
  if (c == 'n') return ref_literal(p, "null");
  return ref_number(p);
}

enum { REF_MALFORMED, REF_ABSENT, REF_STRING, REF_OTHER };

/* the top-level object's last `key`: REF_STRING (its value's bytes at
 * *voff, *vlen in the input, *vesc when escaped), REF_OTHER (present, not a
 * string), REF_ABSENT, or REF_MALFORMED; *cheap when no key was escaped */
static int ref_json_string(const unsigned char *s, size_t n, const char *key, size_t *voff, size_t *vlen,
                           int *vesc, int *cheap) {
  ref_p p = { s, n, 0, 1 };
  int found = REF_ABSENT;
  *cheap = 1;
  ref_ws(&p);
  if (p.i >= n || s[p.i] != '{') return REF_MALFORMED;
  p.i++;
  ref_ws(&p);
  if (p.i < n && s[p.i] == '}') { p.i++; goto end; }
  for (;;) {
    unsigned char k[64];
    size_t kl;
    int kesc;
    ref_ws(&p);
    if (p.i >= n || s[p.i] != '"' || !ref_string(&p, k, sizeof k, &kl, &kesc)) return REF_MALFORMED;
    if (kesc) *cheap = 0;
    ref_ws(&p);
    if (p.i >= n || s[p.i++] != ':') return REF_MALFORMED;
    ref_ws(&p);
    if (kl == strlen(key) && memcmp(k, key, kl) == 0) {
      if (p.i < n && s[p.i] == '"') {
        size_t at = p.i + 1, l;
        if (!ref_string(&p, NULL, 0, &l, vesc)) return REF_MALFORMED;
        *voff = at;
        *vlen = p.i - 1 - at;
        found = REF_STRING;
      } else {
        if (!ref_value(&p)) return REF_MALFORMED;
        found = REF_OTHER;
      }
    } else if (!ref_value(&p)) return REF_MALFORMED;
    ref_ws(&p);
    if (p.i < n && s[p.i] == ',') { p.i++; continue; }
    if (p.i < n && s[p.i] == '}') { p.i++; break; }
    return REF_MALFORMED;
  }
end:
  ref_ws(&p);
  return p.i == n ? found : REF_MALFORMED;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *s;
  size_t n, off = 0, len = 0;
  if (size < 1) return 0;
  s = (const char *)data + 1;
  n = size - 1;
  switch (data[0] % 5) {
  case 3: {
    lb_result r;
    const lb_span *all[] = { &r.custom_id, &r.id, &r.error, &r.response, &r.status_code, &r.request_id,
      &r.body, &r.model, &r.created, &r.body_error, &r.usage, &r.choices, &r.choice0, &r.message,
      &r.content, &r.reasoning, &r.data, &r.datum0, &r.embedding };
    size_t k;
    if (!lb_result_scan(s, n, &r)) break;
    for (k = 0; k < sizeof all / sizeof all[0]; k++) {
      const lb_span *v = all[k];
      if (v->kind == LB_J_ABSENT) continue;
      if (v->off + v->len > n) abort();
      if (v->kind == LB_J_STR) {
        char *out;
        long m;
        if (v->off < 1 || s[v->off - 1] != '"' || v->off + v->len >= n || s[v->off + v->len] != '"') abort();
        if (!v->esc && memchr(s + v->off, '\\', v->len)) abort();
        out = malloc(v->len ? v->len : 1);
        m = lb_json_unescape(s + v->off, v->len, out);
        free(out);
        if (m > (long)v->len || (!v->esc && m != (long)v->len)) abort();
      }
    }
    if (r.custom_id.kind == LB_J_STR && !r.custom_id.esc) {   /* the two scanners agree */
      if (lb_json_string(s, n, "custom_id", 9, &off, &len) != LB_FOUND) abort();
      if (off != r.custom_id.off || len != r.custom_id.len) abort();
    }
    break;
  }
  case 4: {
    char *out = malloc(n ? n : 1);      /* exactly n: ASan sees a byte more */
    long m = lb_json_unescape(s, n, out);
    free(out);
    if (m > (long)n || m < -1) abort();
    break;
  }
  case 0:
    if (lb_utf8_invalid((const unsigned char *)s, n) != ref_utf8((const unsigned char *)s, n)) abort();
    break;
  case 1: {
    int r = lb_json_string(s, n, "custom_id", 9, &off, &len);
    if (r == LB_FOUND) {
      /* a plain string value: inside the input, quoted, no quote or backslash in it */
      if (off < 1 || off + len >= n || s[off - 1] != '"' || s[off + len] != '"') abort();
      if (memchr(s + off, '"', len) || memchr(s + off, '\\', len)) abort();
    } else if (r != LB_ABSENT && r != LB_COMPLEX) abort();
    {
      /* held against the reference: on a well-formed line the scanner's
       * answer is the decoding's, and it gives up (LB_COMPLEX) only where
       * it may: an escaped key, or the value not a plain string */
      size_t roff = 0, rlen = 0;
      int resc = 0, cheap = 1;
      int ref = ref_json_string((const unsigned char *)s, n, "custom_id", &roff, &rlen, &resc, &cheap);
      if (ref == REF_ABSENT && r != LB_ABSENT && !(r == LB_COMPLEX && !cheap)) abort();
      if (ref == REF_OTHER && r != LB_COMPLEX) abort();
      if (ref == REF_STRING) {
        if (r == LB_FOUND && (resc || off != roff || len != rlen)) abort();
        if (r == LB_ABSENT) abort();
        if (r == LB_COMPLEX && cheap && !resc) abort();
      }
    }
    break;
  }
  default: {
    const char *v;
    size_t vl;
    if (lb_header_value(s, n, "content-encoding", &v, &vl)) {
      if (v < s || v + vl > s + n || n < 17) abort();
    }
  }
  }
  return 0;
}
