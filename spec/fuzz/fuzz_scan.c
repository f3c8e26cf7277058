/* libFuzzer harness for the core's byte scanners (lbatch/core/scan.c):
 * they read untrusted bytes (users' files, servers' answers). The first
 * byte picks the scanner; each result is checked against a property or an
 * independent reference, and AddressSanitizer catches any read past the
 * input. The result line scanner (rec.c) is held against the custom_id
 * scanner: two walks written apart must agree on every line both read.
 * Built and run by spec/fuzz/run (make fuzz; a short run in make test);
 * fuzz_enc.c fuzzes the encoder. */
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
