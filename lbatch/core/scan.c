/* Byte scanners for request and result lines, without decoding them:
 *   core.utf8_check(s)          -> nil when s is valid UTF-8, else the
 *                                  1-based offset of the first bad byte
 *   core.json_string(s, key)    -> the string value of a top-level key of
 *                                  the JSON object s: the string; nil when
 *                                  the key is absent; false when it cannot
 *                                  tell cheaply (an escape, a value that
 *                                  is not a string, a line that is not a
 *                                  well-formed object): decode it then.
 * Both run over untrusted bytes (files from users, lines from servers):
 * they never read past n, and spec/fuzz fuzzes them. */
#include <string.h>
#include "scan.h"

/* UTF-8 as RFC 3629 has it (lb_utf8_seq, scan.h). Returns the offset of
 * the first bad byte, or -1. */
long lb_utf8_invalid(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    size_t k = s[i] < 0x80 ? 1 : lb_utf8_seq(s, n, i);
    if (k == 0) return (long)i;
    i += k;
  }
  return -1;
}

static size_t ws(const char *s, size_t n, size_t i) {
  while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n')) i++;
  return i;
}

/* past a string starting at the quote s[i]; *esc set when it holds a
 * backslash; n + 1 when it never ends */
static size_t skip_string(const char *s, size_t n, size_t i, int *esc) {
  for (i++;; i += 2) {                          /* past a backslash and the byte it escapes */
    i = lb_str_stop(s, n, i);
    if (i >= n) return n + 1;
    if (s[i] == '"') return i + 1;
    *esc = 1;
  }
}

/* past the container (object or array) at s[i]: its brackets counted
 * outside strings, strings skipped with their escapes; n + 1 when it never
 * closes. Sixteen bytes at a time (SSE2): one bit each for the bytes that
 * matter (quotes, backslashes, brackets), taken in order, the rest never
 * looked at. */
static size_t skip_container(const char *s, size_t n, size_t i) {
  int depth = 0, in_str = 0, skip = 0;     /* skip: the byte after a backslash that ended the last block */
#ifdef __SSE2__
  const __m128i quote = _mm_set1_epi8('"'), bs = _mm_set1_epi8('\\'), open = _mm_set1_epi8('{'),
                close = _mm_set1_epi8('}'), lower = _mm_set1_epi8(0x20);
  for (; i + 16 <= n; i += 16) {
    __m128i x = _mm_loadu_si128((const __m128i *)(const void *)(s + i)), y = _mm_or_si128(x, lower);
    unsigned m = (unsigned)_mm_movemask_epi8(_mm_or_si128(                   /* [ and ] are { and } with 0x20 */
      _mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, bs)),
      _mm_or_si128(_mm_cmpeq_epi8(y, open), _mm_cmpeq_epi8(y, close))));
    if (skip) { m &= ~1u; skip = 0; }
    while (m) {
      unsigned p = (unsigned)__builtin_ctz(m);
      char c = s[i + p];
      m &= m - 1;
      if (in_str) {
        if (c == '"') in_str = 0;
        else if (c == '\\') {               /* the escaped byte is not looked at */
          if (p == 15) skip = 1;
          else m &= ~(1u << (p + 1));
        }
      } else if (c == '"') in_str = 1;
      else if (c == '{' || c == '[') depth++;
      else if (c == '}' || c == ']') { if (--depth == 0) return i + p + 1; }
    }
  }
#endif
  for (i += (size_t)skip; i < n; i++) {
    char c = s[i];
    if (in_str) {
      if (c == '"') in_str = 0;
      else if (c == '\\') i++;
    } else if (c == '"') in_str = 1;
    else if (c == '{' || c == '[') depth++;
    else if (c == '}' || c == ']') { if (--depth == 0) return i + 1; }
  }
  return n + 1;
}

/* past any value at s[i]; n + 1 when malformed */
static size_t skip_value(const char *s, size_t n, size_t i) {
  int esc = 0;
  if (i >= n) return n + 1;
  if (s[i] == '"') return skip_string(s, n, i, &esc);
  if (s[i] != '{' && s[i] != '[') {   /* a number or a literal */
    size_t j = i;
    while (j < n && s[j] != ',' && s[j] != '}' && s[j] != ']' && s[j] != ' ' && s[j] != '\t'
           && s[j] != '\r' && s[j] != '\n' && s[j] != '"' && s[j] != '{' && s[j] != '[' && s[j] != ':') j++;
    return j > i ? j : n + 1;
  }
  return skip_container(s, n, i);
}

int lb_json_string(const char *s, size_t n, const char *key, size_t klen, size_t *off, size_t *len) {
  size_t i = ws(s, n, 0);
  int found = LB_ABSENT;
  if (i >= n || s[i] != '{') return LB_COMPLEX;
  i = ws(s, n, i + 1);
  if (i < n && s[i] == '}') return ws(s, n, i + 1) == n ? LB_ABSENT : LB_COMPLEX;
  for (;;) {
    size_t k0, k1;
    int esc = 0, match;
    if (i >= n || s[i] != '"') return LB_COMPLEX;
    k0 = i + 1;
    i = skip_string(s, n, i, &esc);
    if (i > n) return LB_COMPLEX;
    k1 = i - 1;
    if (esc) return LB_COMPLEX;            /* an escaped key might be the one */
    match = k1 - k0 == klen && memcmp(s + k0, key, klen) == 0;
    i = ws(s, n, i);
    if (i >= n || s[i] != ':') return LB_COMPLEX;
    i = ws(s, n, i + 1);
    if (match) {
      if (i < n && s[i] == '"') {
        size_t v0 = i + 1;
        esc = 0;
        i = skip_string(s, n, i, &esc);
        if (i > n) return LB_COMPLEX;
        if (esc) found = LB_COMPLEX;
        else { found = LB_FOUND; *off = v0; *len = i - 1 - v0; }   /* the last one counts */
      } else {
        i = skip_value(s, n, i);
        if (i > n) return LB_COMPLEX;
        found = LB_COMPLEX;                 /* present, not a plain string */
      }
    } else {
      i = skip_value(s, n, i);
      if (i > n) return LB_COMPLEX;
    }
    i = ws(s, n, i);
    if (i < n && s[i] == ',') { i = ws(s, n, i + 1); continue; }
    if (i < n && s[i] == '}') break;
    return LB_COMPLEX;
  }
  return ws(s, n, i + 1) == n ? found : LB_COMPLEX;
}

/* A header line "Name: value\r\n": when its name is `name` (any case),
 * the value without surrounding blanks. */
int lb_header_value(const char *p, size_t n, const char *name, const char **v, size_t *vlen) {
  size_t nl = strlen(name), i, e;
  if (n <= nl || p[nl] != ':') return 0;
  for (i = 0; i < nl; i++) {
    char a = p[i], b = name[i];
    if (a >= 'A' && a <= 'Z') a = (char)(a - 'A' + 'a');
    if (a != b) return 0;
  }
  i = nl + 1;
  e = n;
  while (i < e && (p[i] == ' ' || p[i] == '\t')) i++;
  while (e > i && (p[e - 1] == ' ' || p[e - 1] == '\t' || p[e - 1] == '\r' || p[e - 1] == '\n')) e--;
  *v = p + i;
  *vlen = e - i;
  return 1;
}

/* ------------------------------------------------------------ Lua */
#ifndef LBATCH_SCAN_ONLY       /* the fuzz harness builds the scanners alone */
#include "core.h"

int lb_utf8_check(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  long bad = lb_utf8_invalid((const unsigned char *)s, n);
  if (bad < 0) return 0;
  lua_pushinteger(L, (lua_Integer)bad + 1);
  return 1;
}

int lb_core_json_string(lua_State *L) {
  size_t n, klen, off = 0, len = 0;
  const char *s = luaL_checklstring(L, 1, &n);
  const char *key = luaL_checklstring(L, 2, &klen);
  int r = lb_json_string(s, n, key, klen, &off, &len);
  if (r == LB_FOUND) lua_pushlstring(L, s + off, len);
  else if (r == LB_ABSENT) lua_pushnil(L);
  else lua_pushboolean(L, 0);
  return 1;
}
#endif
