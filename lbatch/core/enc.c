/* The request writer's encoder: one walk over a request's table that
 * writes its JSONL line the way lua-cjson 2.1.0 would write it and checks
 * it on the way (every string valid UTF-8, the custom_id a non-empty
 * string, the line within its limit). lbatch/jsonl.lua calls it for each
 * request and falls back to lua-cjson and its own checks whenever this
 * returns nothing: what it cannot decide (a metatable, a sparse array, a
 * key that is not a string, a function, NaN, deep nesting) or a line
 * that breaks a rule (the Lua path words the error).
 *
 *   local e = core.encoder(marker)     -- marker: json.empty_array's string (or nil)
 *   e:encode(id, url, body, max_line)  -> the line's size with its newline, or nothing
 *   e:write(fh, seen, id, value)       -> true; false when seen (an idmap)
 *                                         has id already; nil when the write fails
 *   e:put(id, url, body, max_line, fh, seen, value, room)
 *                                      -> encode, then write when the line fits in
 *                                         room bytes: one call for the common line
 *   e:arm{model, url, thinking, nil_ok, default_url, field, nonempty, fh, seen,
 *         tag, lines, bytes, max_lines, max_bytes, max_line}
 *                                      -> the gate: the route the Lua rules decided
 *   e:sync()                           -> its file's lines, bytes; the gate closed
 *   e:adder(slow)                      -> the writer's add: a request on the armed
 *                                         route written here, any other to slow
 *   lbatch.core.encode(v)              -> v as cjson.encode writes it, or nothing
 *
 * What lua-cjson writes, checked on the Debian package (spec/unit/core/jsonl_encoder_spec.lua
 * compares the two over a corpus; spec/fuzz over random tables):
 * strings escape '"', '\\', '/' (as "\/"), \b \f \n \r \t, the other
 * bytes below 0x20 and 0x7f as \u00xx, and pass every other byte as it is;
 * numbers are "%.14g" of the value as a double (so 2^53 is 9.007199254741e+15,
 * -0.0 is -0); a table whose keys are exactly 1..n is an array, the empty
 * table is {}; object keys come in lua_next's order. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core.h"
#include "scan.h"

#ifndef LUA_FILEHANDLE                   /* 5.1 and LuaJIT keep it in lualib.h */
#define LUA_FILEHANDLE "FILE*"
#endif

#define ENC_MAX_DEPTH 1000   /* lua-cjson's encode_max_depth */

/* The last route the writer wrote a line on, armed by jsonl.lua with what
 * rules.lua decided for it (e:arm), and the counters of its file: e:add
 * writes a request that is on that route and has the shape the route's
 * rules passed (the same model, url and thinking mode, the endpoint's
 * field present) without any Lua; anything else goes to the Lua path. */
typedef struct gate {
  int armed;
  char *model, *url, *field;         /* field: NULL when the endpoint has none */
  size_t model_len, url_len;
  int thinking, nil_ok, default_url, nonempty;
  void *fh_ud;                       /* the file's userdata, kept by fh_ref */
  idmap *seen;                       /* kept by seen_ref */
  int fh_ref, seen_ref;
  lua_Number tag, lines, bytes, max_lines, max_bytes, max_line;
} gate;

typedef struct encoder {
  buf line;                  /* the last encoded line, newline included */
  char *marker;              /* json.empty_array's string: written [] */
  size_t mlen;
  gate g;
} encoder;

static const char hex[] = "0123456789abcdef";

/* 0: the byte as it is; else the character after the backslash ('u': \u00xx) */
static const unsigned char esc[256] = {
  [0] = 'u', [1] = 'u', [2] = 'u', [3] = 'u', [4] = 'u', [5] = 'u', [6] = 'u', [7] = 'u', [11] = 'u',
  [14] = 'u', [15] = 'u', [16] = 'u', [17] = 'u', [18] = 'u', [19] = 'u', [20] = 'u', [21] = 'u', [22] = 'u',
  [23] = 'u', [24] = 'u', [25] = 'u', [26] = 'u', [27] = 'u', [28] = 'u', [29] = 'u', [30] = 'u', [31] = 'u',
  ['\b'] = 'b', ['\t'] = 't', ['\n'] = 'n', ['\f'] = 'f', ['\r'] = 'r', [0x7f] = 'u',
  ['"'] = '"', ['\\'] = '\\', ['/'] = '/',
};

/* append n bytes (no NUL kept: the line is handed out by length) */
static inline int put(buf *b, const char *s, size_t n) {
  if (b->len + n + 1 > b->cap && !lb_buf_reserve(b, n)) return 0;
  memcpy(b->p + b->len, s, n);
  b->len += n;
  return 1;
}

#define PUT(b, s, n) do { if (!put((b), (s), (n))) return LB_ENC_NOMEM; } while (0)

/* a string, quoted and escaped, checked as UTF-8 in the same pass;
 * LB_ENC_NO when it is not valid UTF-8 */
static int put_string(buf *b, const char *str, size_t n) {
  const unsigned char *s = (const unsigned char *)str;
  size_t i = 0, worst = n * 6 + 2;
  char *o;
  if (n > 65536) {                 /* a large string (an image): room for what it needs */
    size_t extra = 0;
    for (i = 0; i < n; i++) if (esc[s[i]]) extra += esc[s[i]] == 'u' ? 5 : 1;
    worst = n + extra + 2;
    i = 0;
  }
  if (!lb_buf_reserve(b, worst)) return LB_ENC_NOMEM;
  o = b->p + b->len;
  *o++ = '"';
  while (i < n) {
    unsigned char c, e;
    if (i + 8 <= n) {          /* eight plain ASCII bytes at once (none below 0x20, " \ / or 0x7f+) */
      uint64_t x;
      memcpy(&x, s + i, 8);
#define ONES 0x0101010101010101ULL
#define HIGH 0x8080808080808080ULL
#define HAS(v) (((x ^ (ONES * (v))) - ONES) & ~(x ^ (ONES * (v))) & HIGH)
      if (!(((x - ONES * 0x20) | x | (x + ONES * 0x01)) & HIGH) && !HAS('"') && !HAS('\\') && !HAS('/')) {
        memcpy(o, s + i, 8);
        o += 8;
        i += 8;
        continue;
      }
#undef HAS
#undef HIGH
#undef ONES
    }
    c = s[i];
    if (c >= 0x80) {
      size_t k = lb_utf8_seq(s, n, i);
      if (!k) return LB_ENC_NO;
      memcpy(o, s + i, k);
      o += k;
      i += k;
      continue;
    }
    e = esc[c];
    i++;
    if (!e) { *o++ = (char)c; continue; }
    *o++ = '\\';
    *o++ = (char)e;
    if (e == 'u') { *o++ = '0'; *o++ = '0'; *o++ = hex[c >> 4]; *o++ = hex[c & 15]; }
  }
  *o++ = '"';
  b->len = (size_t)(o - b->p);
  return LB_ENC_OK;
}

static int put_digits(buf *b, unsigned long long u, int neg, int point) {
  char tmp[48], *p = tmp + sizeof tmp;
  int k = 0;
  if (point) {                     /* the fraction's digits, trailing zeros dropped */
    while (k < point && u % 10 == 0) { u /= 10; k++; }
    for (; k < point; k++) { *--p = (char)('0' + u % 10); u /= 10; }
    *--p = '.';
  }
  do { *--p = (char)('0' + u % 10); u /= 10; } while (u);
  if (neg) *--p = '-';
  PUT(b, p, (size_t)(tmp + sizeof tmp - p));
  return LB_ENC_OK;
}

static const double pow10s[] = { 1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13,
                                  1e14, 1e15, 1e16, 1e17, 1e18 };

/* "%.14g" of d, as lua-cjson writes numbers. Without printf when d has
 * at most 14 significant digits in fixed notation: d * 10^k that comes out
 * whole, m, has d within two ulps of m / 10^k, far nearer than half a
 * unit of the 14th digit, so %.14g prints m / 10^k. */
static int put_number(buf *b, double d) {
  char tmp[32];
  int n, k;
  double a = fabs(d);
  if (isnan(d) || isinf(d)) return LB_ENC_NO;
  if (a < 1e14 && !(d == 0 && signbit(d))) {
    if (d == floor(d)) return put_digits(b, (unsigned long long)a, d < 0, 0);
    if (a >= 1e-4)
      for (k = 1; k <= 18; k++) {
        double v = a * pow10s[k];
        if (v >= 1e14) break;
        if (v == floor(v)) return put_digits(b, (unsigned long long)v, d < 0, k);
      }
  }
  n = snprintf(tmp, sizeof tmp, "%.14g", d);
  if (n <= 0 || n >= (int)sizeof tmp) return LB_ENC_NO;
  for (k = 0; k < n; k++) if (tmp[k] == ',') tmp[k] = '.';   /* a locale's decimal comma */
  PUT(b, tmp, (size_t)n);
  return LB_ENC_OK;
}

/* the length of the array at idx when its keys are exactly 1..n (n > 0);
 * 0 when it is not an array */
static size_t dense_length(lua_State *L, int idx) {
  size_t n = lua_rawlen(L, idx), count = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_Number k;
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TNUMBER) { lua_pop(L, 1); return 0; }
    k = lua_tonumber(L, -1);
    if (k != floor(k) || k < 1 || k > (lua_Number)n) { lua_pop(L, 1); return 0; }
    count++;
  }
  return count == n ? n : 0;
}

int lb_enc_value(lua_State *L, buf *b, int idx, int depth, const char *marker, size_t mlen) {
  switch (lua_type(L, idx)) {
  case LUA_TSTRING: {
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    if (marker && n == mlen && memcmp(s, marker, n) == 0) { PUT(b, "[]", 2); return LB_ENC_OK; }
    return put_string(b, s, n);
  }
  case LUA_TNUMBER: return put_number(b, (double)lua_tonumber(L, idx));
  case LUA_TBOOLEAN:
    if (lua_toboolean(L, idx)) PUT(b, "true", 4); else PUT(b, "false", 5);
    return LB_ENC_OK;
  case LUA_TLIGHTUSERDATA:               /* cjson.null; anything else is not ours */
    if (lua_touserdata(L, idx) != NULL) return LB_ENC_NO;
    PUT(b, "null", 4);
    return LB_ENC_OK;
  case LUA_TTABLE: break;
  default: return LB_ENC_NO;
  }
  if (depth >= ENC_MAX_DEPTH || lua_getmetatable(L, idx)) {
    if (depth < ENC_MAX_DEPTH) lua_pop(L, 1);
    return LB_ENC_NO;
  }
  if (!lua_checkstack(L, 4)) return LB_ENC_NO;
  if (idx < 0) idx = lua_gettop(L) + idx + 1;
  lua_pushnil(L);
  if (!lua_next(L, idx)) { PUT(b, "{}", 2); return LB_ENC_OK; }
  if (lua_type(L, -2) == LUA_TSTRING) {          /* an object, written in the one walk */
    char sep = '{';
    do {
      size_t kl;
      const char *k;
      int r;
      if (lua_type(L, -2) != LUA_TSTRING) { lua_pop(L, 2); return LB_ENC_NO; }
      k = lua_tolstring(L, -2, &kl);
      if (marker && kl == mlen && memcmp(k, marker, kl) == 0) { lua_pop(L, 2); return LB_ENC_NO; }
      PUT(b, &sep, 1);
      sep = ',';
      if ((r = put_string(b, k, kl)) != LB_ENC_OK) { lua_pop(L, 2); return r; }
      PUT(b, ":", 1);
      if ((r = lb_enc_value(L, b, -1, depth + 1, marker, mlen)) != LB_ENC_OK) { lua_pop(L, 2); return r; }
      lua_pop(L, 1);
    } while (lua_next(L, idx));
    PUT(b, "}", 1);
    return LB_ENC_OK;
  }
  lua_pop(L, 2);
  {                                              /* an array: 1..n, nothing else */
    size_t n = dense_length(L, idx), i;
    if (!n) return LB_ENC_NO;
    for (i = 1; i <= n; i++) {
      int r;
      PUT(b, i == 1 ? "[" : ",", 1);
      lua_rawgeti(L, idx, (lua_Integer)i);
      r = lb_enc_value(L, b, -1, depth + 1, marker, mlen);
      lua_pop(L, 1);
      if (r != LB_ENC_OK) return r;
    }
    PUT(b, "]", 1);
  }
  return LB_ENC_OK;
}

/* ------------------------------------------------------------ Lua */

#define ENCODER "lbatch.core.encoder"
#define L1 "{\"custom_id\":"
#define L2 ",\"method\":\"POST\",\"url\":\""
#define L3 "\",\"body\":"
#define L4 "}\n"

/* the userdata at idx when its metatable is upvalue k (the encoder's,
 * the idmap's, the io library's: compared, not looked up by name) */
static void *udata(lua_State *L, int idx, int k, const char *what) {
  void *p = lua_touserdata(L, idx);
  int same = p && lua_getmetatable(L, idx);
  if (same) {
    same = lua_rawequal(L, -1, lua_upvalueindex(k));
    lua_pop(L, 1);
  }
  if (!same) luaL_argerror(L, idx, what);
  return p;
}

static encoder *check(lua_State *L) { return udata(L, 1, 1, "an encoder expected"); }

static int nomem(lua_State *L) { return luaL_error(L, "encoder: out of memory"); }

/* encode the line of id, url, body, max_line at base..base+3 (popped);
 * 0 when it is left to the Lua path */
static int encode_at(lua_State *L, encoder *e, int base) {
  size_t il, ul;
  const char *id, *url;
  lua_Number max_line = luaL_checknumber(L, base + 3);
  buf *b = &e->line;
  int r;
  luaL_checktype(L, base + 2, LUA_TTABLE);
  b->len = 0;
  if (lua_type(L, base) != LUA_TSTRING || lua_type(L, base + 1) != LUA_TSTRING) return 0;
  id = lua_tolstring(L, base, &il);
  url = lua_tolstring(L, base + 1, &ul);
  if (il == 0 || lb_utf8_invalid((const unsigned char *)url, ul) >= 0) return 0;
  if (!lb_buf_reserve(b, il + ul + 256)) return nomem(L);
  if (!put(b, L1, sizeof L1 - 1)) return nomem(L);
  if ((r = put_string(b, id, il)) != LB_ENC_OK) return r == LB_ENC_NOMEM ? nomem(L) : 0;
  if (!put(b, L2, sizeof L2 - 1) || !put(b, url, ul) || !put(b, L3, sizeof L3 - 1)) return nomem(L);
  lua_settop(L, base + 2);
  r = lb_enc_value(L, b, base + 2, 0, e->marker, e->mlen);
  lua_settop(L, base - 1);
  if (r != LB_ENC_OK) {
    b->len = 0;
    return r == LB_ENC_NOMEM ? nomem(L) : 0;
  }
  if (!put(b, L4, sizeof L4 - 1)) return nomem(L);
  if ((lua_Number)(b->len - 1) > max_line) { b->len = 0; return 0; }
  return 1;
}

/* The FILE of an open Lua file handle: the first field of its userdata
 * on every Lua (5.1's FILE **, 5.2+'s luaL_Stream, LuaJIT's IOFileUD). */
static FILE *file_of(lua_State *L, int idx) {
  void *ud = udata(L, idx, 3, "a file expected");
#if LUA_VERSION_NUM >= 502 && !defined(LUAJIT_VERSION)
  if (((luaL_Stream *)ud)->closef == NULL) return NULL;
#endif
  return *(FILE **)ud;
}

/* put the id (at idx id) in seen and write the line: true; false when
 * seen has the id already; nothing when the write fails */
static int write_line(lua_State *L, encoder *e, int fh, int seen_at, int id_at, int value_at) {
  FILE *f = file_of(L, fh);
  idmap *seen = udata(L, seen_at, 2, "an idmap expected");
  size_t il;
  const char *id = luaL_checklstring(L, id_at, &il);
  lua_Number v = luaL_checknumber(L, value_at);
  int r;
  if (!e->line.len) return luaL_error(L, "encoder: nothing encoded");
  if (!f) return luaL_error(L, "encoder: the file is closed");
  r = lb_idmap_put(seen, id, il, lb_idmap_hash(seen, id, il), v);
  if (r < 0) return nomem(L);
  if (r == 0) { lua_pushboolean(L, 0); return 1; }
  if (fwrite(e->line.p, 1, e->line.len, f) != e->line.len) return 0;
  e->line.len = 0;
  lua_pushboolean(L, 1);
  return 1;
}

/* e:encode(id, url, body, max_line): the line's size with its newline, or nothing */
static int e_encode(lua_State *L) {
  encoder *e = check(L);
  if (!encode_at(L, e, 2)) return 0;
  lua_pushinteger(L, (lua_Integer)e->line.len);
  return 1;
}

/* e:write(fh, seen, id, value): the line encode or put kept */
static int e_write(lua_State *L) { return write_line(L, check(L), 2, 3, 4, 5); }

/* e:put(id, url, body, max_line, fh, seen, value, room): encode, and when
 * the line fits in room bytes, write it as e:write would: size, true;
 * size, false (a duplicate); size, nil (no room: write it after a new
 * file, or not); size, nil, true (the write failed); nothing as encode */
static int e_put(lua_State *L) {
  encoder *e = check(L);
  lua_Number room = luaL_checknumber(L, 9);
  int r;
  lua_settop(L, 9);
  if (room >= 0 && lua_type(L, 2) == LUA_TSTRING) {   /* the id's slot on its way while the body is walked */
    size_t il;
    const char *id = lua_tolstring(L, 2, &il);
    idmap *seen = udata(L, 7, 2, "an idmap expected");
    lb_idmap_prefetch(seen, lb_idmap_hash(seen, id, il));
  }
  lua_pushvalue(L, 2); lua_pushvalue(L, 3); lua_pushvalue(L, 4); lua_pushvalue(L, 5);
  if (!encode_at(L, e, 10)) return 0;
  lua_pushinteger(L, (lua_Integer)e->line.len);
  if ((lua_Number)e->line.len > room) return 1;
  r = write_line(L, e, 6, 7, 2, 8);
  if (r == 0) { lua_pushnil(L); lua_pushboolean(L, 1); return 3; }
  return 2;
}

/* ------------------------------------------------------------ the gate */

static void disarm(lua_State *L, gate *g) {
  if (!g->armed) return;
  luaL_unref(L, LUA_REGISTRYINDEX, g->fh_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, g->seen_ref);
  free(g->model); free(g->url); free(g->field);
  g->model = g->url = g->field = NULL;
  g->armed = 0;
}

static char *copy(lua_State *L, int idx, size_t *len) {
  size_t n;
  const char *s = luaL_checklstring(L, idx, &n);
  char *p = malloc(n + 1);
  if (!p) return NULL;
  memcpy(p, s, n + 1);
  if (len) *len = n;
  return p;
}

/* field k of the arm table (at 2): a number (raises when it is not one) */
static lua_Number arm_number(lua_State *L, const char *k) {
  lua_Number v;
  lua_getfield(L, 2, k);
  if (!lua_isnumber(L, -1)) return luaL_error(L, "encoder: arm's %s must be a number", k);
  v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return v;
}

/* field k of the arm table (at 2), as a boolean */
static int arm_flag(lua_State *L, const char *k) {
  int v;
  lua_getfield(L, 2, k);
  v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/* e:arm{model, url, thinking, nil_ok, default_url, field, nonempty, fh, seen,
 *       tag, lines, bytes, max_lines, max_bytes, max_line}
 * nil_ok: a body without a boolean enable_thinking runs with `thinking`;
 * default_url: add's url left out resolves to `url`; field: the
 * endpoint's own field (or nil), nonempty: it must be a non-empty table */
static int e_arm(lua_State *L) {
  encoder *e = check(L);
  gate *g = &e->g;
  luaL_checktype(L, 2, LUA_TTABLE);
  disarm(L, g);
  lua_settop(L, 2);
  lua_getfield(L, 2, "fh");          /* 3 */
  lua_getfield(L, 2, "seen");        /* 4 */
  lua_getfield(L, 2, "model");       /* 5 */
  lua_getfield(L, 2, "url");         /* 6 */
  lua_getfield(L, 2, "field");       /* 7 */
  g->fh_ud = udata(L, 3, 3, "arm: fh, a file expected");
  g->seen = udata(L, 4, 2, "arm: seen, an idmap expected");
  g->thinking = arm_flag(L, "thinking");
  g->nil_ok = arm_flag(L, "nil_ok");
  g->default_url = arm_flag(L, "default_url");
  g->nonempty = arm_flag(L, "nonempty");
  g->tag = arm_number(L, "tag");
  g->lines = arm_number(L, "lines");
  g->bytes = arm_number(L, "bytes");
  g->max_lines = arm_number(L, "max_lines");
  g->max_bytes = arm_number(L, "max_bytes");
  g->max_line = arm_number(L, "max_line");
  if (!(g->model = copy(L, 5, &g->model_len)) || !(g->url = copy(L, 6, &g->url_len))
      || (!lua_isnil(L, 7) && !(g->field = copy(L, 7, NULL)))) {
    free(g->model); free(g->url);
    g->model = g->url = NULL;
    return nomem(L);
  }
  lua_pushvalue(L, 3);
  g->fh_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 4);
  g->seen_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  g->armed = 1;
  return 0;
}

/* e:sync(): the armed file's lines and bytes, and the gate closed; nothing
 * when it was not armed */
static int e_sync(lua_State *L) {
  encoder *e = check(L);
  gate *g = &e->g;
  if (!g->armed) return 0;
  lua_pushinteger(L, (lua_Integer)g->lines);
  lua_pushinteger(L, (lua_Integer)g->bytes);
  disarm(L, g);
  return 2;
}

static int same(lua_State *L, int idx, const char *s, size_t n) {
  size_t l;
  const char *v;
  if (lua_type(L, idx) != LUA_TSTRING) return 0;
  v = lua_tolstring(L, idx, &l);
  return l == n && memcmp(v, s, n) == 0;
}

/* Write the request id, body, url (at 2, 3, 4; the stack's top is 5) on
 * the armed route: 1; 0 when the write failed; -1 (and nothing changed)
 * when the request is not the armed route's common case. */
static int gate_put(lua_State *L, encoder *e) {
  gate *g = &e->g;
  size_t il;
  const char *id;
  FILE *f;
  uint64_t h;
  int t, r;
  if (!g->armed || lua_type(L, 2) != LUA_TSTRING || lua_type(L, 3) != LUA_TTABLE) return -1;
  if (lua_getmetatable(L, 3)) return -1;
  t = lua_type(L, 4);
  if (t == LUA_TNIL || (t == LUA_TBOOLEAN && !lua_toboolean(L, 4))) {
    if (!g->default_url) return -1;
  } else if (!same(L, 4, g->url, g->url_len)) return -1;
  if (g->lines >= g->max_lines) return -1;
  lua_getfield(L, 3, "model");
  if (!same(L, 6, g->model, g->model_len)) return -1;
  lua_getfield(L, 3, "enable_thinking");
  if (lua_type(L, 7) == LUA_TBOOLEAN ? lua_toboolean(L, 7) != g->thinking : !g->nil_ok) return -1;
  if (g->field) {
    lua_getfield(L, 3, g->field);
    t = lua_type(L, 8);
    if (t == LUA_TNIL || t == LUA_TLIGHTUSERDATA) return -1;
    if (g->nonempty) {
      if (t != LUA_TTABLE) return -1;
      lua_pushnil(L);
      if (!lua_next(L, 8)) return -1;
    }
  }
  id = lua_tolstring(L, 2, &il);
  h = lb_idmap_hash(g->seen, id, il);
  lb_idmap_prefetch(g->seen, h);
  lua_settop(L, 5);
  lua_pushvalue(L, 2);
  lua_pushlstring(L, g->url, g->url_len);
  lua_pushvalue(L, 3);
  lua_pushnumber(L, g->max_line);
  if (!encode_at(L, e, 6)) return -1;
  if ((lua_Number)e->line.len > g->max_bytes - g->bytes) { e->line.len = 0; return -1; }
#if LUA_VERSION_NUM >= 502 && !defined(LUAJIT_VERSION)
  if (((luaL_Stream *)g->fh_ud)->closef == NULL) { e->line.len = 0; return -1; }
#endif
  if (!(f = *(FILE **)g->fh_ud)) { e->line.len = 0; return -1; }
  r = lb_idmap_put(g->seen, id, il, h, g->tag + g->lines);
  if (r < 0) return nomem(L);
  if (r == 0) { e->line.len = 0; return -1; }    /* a duplicate: the Lua path words it */
  r = fwrite(e->line.p, 1, e->line.len, f) == e->line.len;
  if (r) {
    g->lines += 1;
    g->bytes += (lua_Number)e->line.len;
  }
  e->line.len = 0;
  return r;
}

/* The writer's add(self, id, body, url): the armed route's common request
 * written here (true), else slow(self, id, body, url, failed) with failed
 * true when that request's write failed. Upvalues: the three metatables,
 * "enc", slow. */
static int adder_call(lua_State *L) {
  encoder *e = NULL;
  int r = -1;
  lua_settop(L, 4);
  if (lua_type(L, 1) == LUA_TTABLE) {      /* self.enc, an encoder */
    lua_pushvalue(L, lua_upvalueindex(4));
    lua_rawget(L, 1);
    if ((e = lua_touserdata(L, 5)) && lua_getmetatable(L, 5)) {
      if (!lua_rawequal(L, -1, lua_upvalueindex(1))) e = NULL;
      lua_pop(L, 1);
    } else e = NULL;
  }
  if (e && (r = gate_put(L, e)) == 1) { lua_pushboolean(L, 1); return 1; }
  lua_settop(L, 4);
  lua_pushvalue(L, lua_upvalueindex(5));
  lua_insert(L, 1);
  lua_pushboolean(L, r == 0);
  lua_call(L, 5, LUA_MULTRET);
  return lua_gettop(L);
}

/* e:adder(slow): the writer's add method, the gate in front of slow */
static int e_adder(lua_State *L) {
  check(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_pushvalue(L, lua_upvalueindex(3));
  lua_pushliteral(L, "enc");
  lua_pushvalue(L, 2);
  lua_pushcclosure(L, adder_call, 5);
  return 1;
}

static int e_gc(lua_State *L) {
  encoder *e = luaL_checkudata(L, 1, ENCODER);
  disarm(L, &e->g);
  lb_buf_free(&e->line);
  free(e->marker);
  e->marker = NULL;
  return 0;
}

int lb_encoder_new(lua_State *L) {
  size_t ml = 0;
  const char *m = luaL_optlstring(L, 1, NULL, &ml);
  encoder *e = lua_newuserdata(L, sizeof *e);
  memset(e, 0, sizeof *e);
  luaL_getmetatable(L, ENCODER);
  lua_setmetatable(L, -2);
  if (m) {
    if (!(e->marker = malloc(ml ? ml : 1))) return nomem(L);
    memcpy(e->marker, m, ml);
    e->mlen = ml;
  }
  return 1;
}

/* core.encode(v [, marker]): v as lua-cjson writes it, or nothing */
int lb_encode(lua_State *L) {
  size_t ml = 0;
  const char *m = luaL_optlstring(L, 2, NULL, &ml);
  buf b = {0};
  int r;
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  r = lb_enc_value(L, &b, 1, 0, m, ml);
  if (r == LB_ENC_OK) lua_pushlstring(L, b.p ? b.p : "", b.len);
  lb_buf_free(&b);
  if (r == LB_ENC_NOMEM) return nomem(L);
  return r == LB_ENC_OK;
}

void lb_encoder_register(lua_State *L) {
  static const luaL_Reg methods[] = { {"encode", e_encode}, {"write", e_write}, {"put", e_put},
                                      {"arm", e_arm}, {"sync", e_sync}, {"adder", e_adder}, {NULL, NULL} };
  static const luaL_Reg meta[] = { {"__gc", e_gc}, {NULL, NULL} };
  luaL_newmetatable(L, ENCODER);
  lua_newtable(L);
  lua_pushvalue(L, -2);                          /* the methods' upvalues */
  luaL_getmetatable(L, LBATCH_IDMAP);
  luaL_getmetatable(L, LUA_FILEHANDLE);
  luaL_setfuncs(L, methods, 3);
  lua_setfield(L, -2, "__index");
  luaL_setfuncs(L, meta, 0);
  lua_pop(L, 1);
}
