/* The results reader's scanner: one pass over a result line that checks
 * it is JSON and finds what a record needs (custom_id, id, the error,
 * response.status_code, request_id, and in the body model, created,
 * error, usage, choices[0].message.content and reasoning_content,
 * data[0].embedding), without decoding the rest.
 *
 *   core.result(line) -> rec [, error, body_error]   the record's fields
 *                        (JSON null as nil, whole numbers as integers:
 *                        what json.normalize makes of lua-cjson's decode)
 *                     -> false when it leaves the line to lua-cjson: a
 *                        shape it does not know (content parts, a
 *                        custom_id that is not a string, an array where an
 *                        object is wanted, a key seen twice, deep nesting,
 *                        anything that is not plain JSON)
 *
 * lbatch/results.lua decodes the whole line only when a record's body is
 * read. The scanner reads untrusted bytes and never past n; spec/fuzz
 * fuzzes lb_result_scan and lb_json_unescape. */
#include <stdlib.h>
#include <string.h>
#include "scan.h"

#define MAX_DEPTH 256        /* deeper lines go to lua-cjson (its limit: 1000) */

/* The scanner's steps take the line (s, n) and an index into it, and
 * return the index past what they read, or BAD: the line is not JSON as
 * the scanner takes it (the caller leaves it to lua-cjson). Indexes in
 * and out, not a cursor in memory: the compiler keeps them in registers. */
#define BAD ((size_t)-1)

static inline size_t ws_at(const char *s, size_t n, size_t i) {
  while (i < n && (unsigned char)s[i] <= ' ' && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
  return i;
}

static int hexval(char ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

/* the code unit of the escape \uXXXX at s[i] (i the backslash), or
 * 0x10000 when there is none there */
static unsigned u_escape(const char *s, size_t n, size_t i) {
  unsigned cp = 0;
  int k;
  if (i + 6 > n || s[i] != '\\' || s[i + 1] != 'u') return 0x10000;
  for (k = 2; k < 6; k++) {
    int h = hexval(s[i + k]);
    if (h < 0) return 0x10000;
    cp = cp << 4 | (unsigned)h;
  }
  return cp;
}

/* the rest of a string from the backslash at s[i]: past its closing
 * quote; BAD when malformed or when lua-cjson would refuse it (a lone
 * surrogate): then every field of the line, asked for or not, is left to
 * lua-cjson */
static size_t string_escaped(const char *s, size_t n, size_t i) {
  for (;;) {
    char ch;
    if (i + 1 >= n) return BAD;
    ch = s[i + 1];
    if (ch == 'u') {
      unsigned cp = u_escape(s, n, i);
      if (cp > 0xFFFF || (cp >= 0xDC00 && cp <= 0xDFFF)) return BAD;   /* bad, or a lone low surrogate */
      i += 6;
      if (cp >= 0xD800 && cp <= 0xDBFF) {      /* a high one: a low one must follow (lua-cjson's rule) */
        unsigned lo = u_escape(s, n, i);
        if (lo < 0xDC00 || lo > 0xDFFF) return BAD;
        i += 6;
      }
    } else if (!strchr("\"\\/bfnrt", ch) || ch == '\0') {
      return BAD;
    } else {
      i += 2;
    }
    i = lb_str_stop(s, n, i);                 /* the next backslash or quote */
    if (i >= n) return BAD;
    if (s[i] == '"') return i + 1;
  }
}

/* a string at the quote s[i]: its content's span in out */
static inline size_t string_at(const char *s, size_t n, size_t i, lb_span *out) {
  size_t j = lb_str_stop(s, n, i + 1), end = j + 1;
  if (j >= n) return BAD;
  out->esc = s[j] != '"';
  if (out->esc && (end = string_escaped(s, n, j)) == BAD) return BAD;
  out->kind = LB_J_STR; out->off = i + 1; out->len = end - 1 - (i + 1);
  return end;
}

/* a number as JSON has it (lua-cjson takes more; those go to it) */
static size_t number_at(const char *s, size_t n, size_t i, lb_span *out) {
  size_t start = i, d;
  if (i < n && s[i] == '-') i++;
  if (i >= n) return BAD;
  if (s[i] == '0') i++;
  else if (s[i] >= '1' && s[i] <= '9') while (i < n && s[i] >= '0' && s[i] <= '9') i++;
  else return BAD;
  if (i < n && s[i] == '.') {
    d = ++i;
    while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    if (i == d) return BAD;
  }
  if (i < n && (s[i] == 'e' || s[i] == 'E')) {
    i++;
    if (i < n && (s[i] == '+' || s[i] == '-')) i++;
    d = i;
    while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    if (i == d) return BAD;
  }
  out->kind = LB_J_NUM; out->off = start; out->len = i - start; out->esc = 0;
  return i;
}

static size_t literal_at(const char *s, size_t n, size_t i, const char *word, size_t len, int kind, lb_span *out) {
  if (n - i < len || memcmp(s + i, word, len) != 0) return BAD;
  out->kind = kind; out->off = i; out->len = len; out->esc = 0;
  return i + len;
}

/* the levels whose keys are looked at */
enum { TOP, RESPONSE, BODY, CHOICES, CHOICE, MESSAGE, DATA, DATUM, NONE };

static size_t value_at(const char *s, size_t n, size_t i, lb_span *out, int level, int depth, lb_result *r);

/* the span a key of an object at `level` goes to, and the level its
 * value is walked at (NONE: only checked) */
static lb_span *slot_of(lb_result *r, int level, const char *k, size_t kl, int *inner) {
#define K(name) (kl == sizeof name - 1 && memcmp(k, name, kl) == 0)
  *inner = NONE;
  switch (level) {
  case TOP:
    if (K("custom_id")) return &r->custom_id;
    if (K("id")) return &r->id;
    if (K("error")) return &r->error;
    if (K("response")) { *inner = RESPONSE; return &r->response; }
    break;
  case RESPONSE:
    if (K("status_code")) return &r->status_code;
    if (K("request_id")) return &r->request_id;
    if (K("body")) { *inner = BODY; return &r->body; }
    break;
  case BODY:
    if (K("model")) return &r->model;
    if (K("created")) return &r->created;
    if (K("error")) return &r->body_error;
    if (K("usage")) return &r->usage;
    if (K("choices")) { *inner = CHOICES; return &r->choices; }
    if (K("data")) { *inner = DATA; return &r->data; }
    break;
  case CHOICE:
    if (K("message")) { *inner = MESSAGE; return &r->message; }
    break;
  case MESSAGE:
    if (K("content")) return &r->content;
    if (K("reasoning_content")) return &r->reasoning;
    break;
  case DATUM:
    if (K("embedding")) return &r->embedding;
    break;
  }
  return NULL;
#undef K
}

static size_t object_at(const char *s, size_t n, size_t i, int level, int depth, lb_result *r, size_t *count) {
  *count = 0;
  i = ws_at(s, n, i + 1);
  if (i < n && s[i] == '}') return i + 1;
  for (;;) {
    lb_span key, skip, *to = NULL;
    int inner = NONE;
    if (i >= n || s[i] != '"' || (i = string_at(s, n, i, &key)) == BAD) return BAD;
    if (level != NONE) {
      if (key.esc) return BAD;              /* an escaped key might be one of ours */
      to = slot_of(r, level, s + key.off, key.len, &inner);
    }
    i = ws_at(s, n, i);
    if (i >= n || s[i] != ':') return BAD;
    i = ws_at(s, n, i + 1);
    if (!to) to = &skip;
    else if (inner != NONE && to->kind != LB_J_ABSENT) return BAD;   /* a container twice */
    if ((i = value_at(s, n, i, to, inner, depth, r)) == BAD) return BAD;
    if (to->kind != LB_J_NULL) ++*count;     /* keys json.normalize keeps */
    i = ws_at(s, n, i);
    if (i < n && s[i] == ',') { i = ws_at(s, n, i + 1); continue; }
    if (i < n && s[i] == '}') return i + 1;
    return BAD;
  }
}

static size_t array_at(const char *s, size_t n, size_t i, int level, int depth, lb_result *r) {
  size_t k = 0;
  i = ws_at(s, n, i + 1);
  if (i < n && s[i] == ']') return i + 1;
  for (;;) {
    lb_span skip, *to = &skip;
    int inner = NONE;
    if (k == 0 && level == CHOICES) { to = &r->choice0; inner = CHOICE; }
    if (k == 0 && level == DATA) { to = &r->datum0; inner = DATUM; }
    if ((i = value_at(s, n, i, to, inner, depth, r)) == BAD) return BAD;
    k++;
    i = ws_at(s, n, i);
    if (i < n && s[i] == ',') { i = ws_at(s, n, i + 1); continue; }
    if (i < n && s[i] == ']') return i + 1;
    return BAD;
  }
}

static size_t value_at(const char *s, size_t n, size_t i, lb_span *out, int level, int depth, lb_result *r) {
  size_t start = i, count = 0;
  if (i >= n) return BAD;
  switch (s[i]) {
  case '"': return string_at(s, n, i, out);
  case '{':
    if (depth >= MAX_DEPTH) return BAD;
    i = object_at(s, n, i, level == CHOICES || level == DATA ? NONE : level, depth + 1, r, &count);
    if (i == BAD) return BAD;
    out->kind = LB_J_OBJ;
    if (level == BODY) r->body_keys = count;
    break;
  case '[':
    if (depth >= MAX_DEPTH || (i = array_at(s, n, i, level, depth + 1, r)) == BAD) return BAD;
    out->kind = LB_J_ARR;
    break;
  case 't': return literal_at(s, n, i, "true", 4, LB_J_TRUE, out);
  case 'f': return literal_at(s, n, i, "false", 5, LB_J_FALSE, out);
  case 'n': return literal_at(s, n, i, "null", 4, LB_J_NULL, out);
  default: return number_at(s, n, i, out);
  }
  out->off = start; out->len = i - start; out->esc = 0;
  return i;
}

int lb_result_scan(const char *s, size_t n, lb_result *r) {
  lb_span top;
  size_t i;
  memset(r, 0, sizeof *r);
  i = ws_at(s, n, 0);
  if (i >= n || s[i] != '{') return 0;
  if ((i = value_at(s, n, i, &top, TOP, 0, r)) == BAD) return 0;
  return ws_at(s, n, i) == n;
}

long lb_json_unescape(const char *s, size_t n, char *out) {
  size_t i = 0, o = 0;
  while (i < n) {
    char ch = s[i];
    if (ch != '\\') { out[o++] = ch; i++; continue; }
    if (i + 1 >= n) return -1;
    ch = s[i + 1];
    if (ch == 'u') {
      unsigned cp = u_escape(s, n, i);
      if (cp > 0xFFFF) return -1;
      i += 6;
      if (cp >= 0xDC00 && cp <= 0xDFFF) return -1;          /* a lone low surrogate */
      if (cp >= 0xD800 && cp <= 0xDBFF) {                    /* a pair, or lua-cjson says no */
        unsigned lo = u_escape(s, n, i);
        if (lo < 0xDC00 || lo > 0xDFFF) return -1;
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        i += 6;
      }
      if (cp < 0x80) out[o++] = (char)cp;
      else if (cp < 0x800) { out[o++] = (char)(0xC0 | cp >> 6); out[o++] = (char)(0x80 | (cp & 0x3F)); }
      else if (cp < 0x10000) {
        out[o++] = (char)(0xE0 | cp >> 12); out[o++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[o++] = (char)(0x80 | (cp & 0x3F));
      } else {
        out[o++] = (char)(0xF0 | cp >> 18); out[o++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[o++] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[o++] = (char)(0x80 | (cp & 0x3F));
      }
      continue;
    }
    switch (ch) {
    case '"': case '\\': case '/': out[o++] = ch; break;
    case 'b': out[o++] = '\b'; break;
    case 'f': out[o++] = '\f'; break;
    case 'n': out[o++] = '\n'; break;
    case 'r': out[o++] = '\r'; break;
    case 't': out[o++] = '\t'; break;
    default: return -1;
    }
    i += 2;
  }
  return (long)o;
}

/* ------------------------------------------------------------ Lua */
#ifndef LBATCH_SCAN_ONLY
#include <errno.h>
#include <math.h>
#include <unistd.h>
#include "core.h"

/* a cursor over checked JSON, for the pushes below */
typedef struct cur { const char *s; size_t n, i; } cur;
static void ws(cur *c) { c->i = ws_at(c->s, c->n, c->i); }
static void string(cur *c, lb_span *out) { c->i = string_at(c->s, c->n, c->i, out); }
static void number(cur *c, lb_span *out) { c->i = number_at(c->s, c->n, c->i, out); }

typedef struct ctx { lua_State *L; const char *s; char *tmp; int keys; } ctx;   /* keys: lb_push_keys's, or 0 */

/* push a scanned string; 0 when lua-cjson would refuse its escapes */
static int push_string(ctx *x, const lb_span *v) {
  long len;
  if (!v->esc) { lua_pushlstring(x->L, x->s + v->off, v->len); return 1; }
  len = lb_json_unescape(x->s + v->off, v->len, x->tmp);
  if (len < 0) return 0;
  lua_pushlstring(x->L, x->tmp, (size_t)len);
  return 1;
}

/* a JSON number of up to 15 digits and nothing else (no fraction, no
 * exponent, not -0) in *out: exact as an integer and as a double, read
 * without strtod (a record has five: status, created, usage) */
static int small_int(const char *p, size_t n, long long *out) {
  size_t i = p[0] == '-';
  long long v = 0;
  if (n <= i || n - i > 15) return 0;
  for (; i < n; i++) {
    if (p[i] < '0' || p[i] > '9') return 0;
    v = v * 10 + (p[i] - '0');
  }
  if (p[0] == '-') {
    if (v == 0) return 0;
    v = -v;
  }
  *out = v;
  return 1;
}

/* the number at p (n bytes, checked JSON) as lua-cjson reads it */
static double number_of(const char *p, size_t n) {
  long long v;
  if (small_int(p, n, &v)) return (double)v;
  return strtod(p, NULL);                         /* lua-cjson's strtod, on the digits JSON allows */
}

static void push_number(lua_State *L, const char *p, size_t n) {
  lua_Number d;
  long long v;
  if (small_int(p, n, &v)) {
#if LUA_VERSION_NUM >= 503
    lua_pushinteger(L, (lua_Integer)v);
#else
    lua_pushnumber(L, (lua_Number)v);
#endif
    return;
  }
  d = (lua_Number)strtod(p, NULL);
#if LUA_VERSION_NUM >= 503
  lua_Integer i;
  if (d == floor(d) && lua_numbertointeger(d, &i)) {   /* math.tointeger */
    lua_pushinteger(L, i);
    return;
  }
#endif
  lua_pushnumber(L, d);
}

static int push_key(ctx *x, const lb_span *v);

/* push any value (checked JSON) as json.normalize leaves lua-cjson's:
 * nulls dropped from objects; 0 for what this leaves to lua-cjson (a
 * null in an array, escapes it refuses) */
static int push_value(ctx *x, cur *c) {
  lua_State *L = x->L;
  lb_span v;
  ws(c);
  switch (c->s[c->i]) {
  case '"':
    string(c, &v);
    return push_string(x, &v);
  case 't': c->i += 4; lua_pushboolean(L, 1); return 1;
  case 'f': c->i += 5; lua_pushboolean(L, 0); return 1;
  case 'n': return 0;                          /* only inside objects (below) */
  case '{':
    if (!lua_checkstack(L, 3)) return 0;
    lua_createtable(L, 0, 4);                  /* room for a usage's keys: no rehash on the way */
    c->i++;
    for (;;) {
      ws(c);
      if (c->s[c->i] == '}') { c->i++; return 1; }
      if (c->s[c->i] == ',') { c->i++; continue; }
      string(c, &v);
      if (!push_key(x, &v)) return 0;
      ws(c);
      c->i++;                                  /* the colon */
      ws(c);
      if (c->s[c->i] == 'n') { c->i += 4; lua_pop(L, 1); continue; }
      if (!push_value(x, c)) return 0;
      lua_rawset(L, -3);
    }
  case '[': {
    lua_Integer k = 0;
    if (!lua_checkstack(L, 3)) return 0;
    lua_newtable(L);
    c->i++;
    for (;;) {
      ws(c);
      if (c->s[c->i] == ']') { c->i++; return 1; }
      if (c->s[c->i] == ',') { c->i++; continue; }
      if (!push_value(x, c)) return 0;
      lua_rawseti(L, -2, ++k);
    }
  }
  default:
    number(c, &v);
    push_number(L, c->s + v.off, v.len);
    return 1;
  }
}

/* push the value at span v (nil for null or absent) */
static int push_span(ctx *x, const lb_span *v) {
  cur c;
  if (v->kind == LB_J_ABSENT || v->kind == LB_J_NULL) { lua_pushnil(x->L); return 1; }
  if (v->kind == LB_J_STR) return push_string(x, v);
  c.s = x->s; c.n = v->off + v->len; c.i = v->off;
  return push_value(x, &c);
}

#define OPT(v, k) ((v).kind == LB_J_ABSENT || (v).kind == LB_J_NULL || (v).kind == (k))
#define NIL(v) ((v).kind == LB_J_ABSENT || (v).kind == LB_J_NULL)

/* a record's fields: their names, in the order of the K_ constants, and
 * the bit of each one a record may do without (results' each{fields =
 * ...}) in a `want` mask (0: every record has it) */
enum { K_CUSTOM_ID, K_ID, K_STATUS, K_REQUEST_ID, K_OK, K_MODEL, K_CREATED, K_USAGE, K_CONTENT, K_REASONING,
       K_EMBEDDING, K_COUNT };
static const struct { const char *name; unsigned bit; } field[K_COUNT] = {
  {"custom_id", 0}, {"id", LB_F_ID}, {"status_code", LB_F_STATUS}, {"request_id", LB_F_REQUEST_ID}, {"ok", 0},
  {"model", LB_F_MODEL}, {"created", LB_F_CREATED}, {"usage", LB_F_USAGE}, {"content", LB_F_CONTENT},
  {"reasoning", LB_F_REASONING}, {"embedding", LB_F_EMBEDDING}
};

unsigned lb_fields_wanted(lua_State *L, int idx) {
  unsigned mask = 0;
  int k;
  for (k = 0; k < K_COUNT; k++) {
    if (!field[k].bit) continue;
    lua_getfield(L, idx, field[k].name);
    if (lua_toboolean(L, -1)) mask |= field[k].bit;
    lua_pop(L, 1);
  }
  return mask;
}

/* the keys of a usage object, pushed once a batch too: a record's usage
 * table takes them from there, not made strings again each time */
static const struct { const char *name; size_t len; } usage_key[] = {
  {"prompt_tokens", 13}, {"completion_tokens", 17}, {"total_tokens", 12}, {"prompt_tokens_details", 21},
  {"completion_tokens_details", 25}, {"cached_tokens", 13}, {"reasoning_tokens", 16}
};
#define U_COUNT (int)(sizeof usage_key / sizeof usage_key[0])

int lb_push_keys(lua_State *L) {
  int k;
  luaL_checkstack(L, K_COUNT + U_COUNT, "too many records");
  for (k = 0; k < K_COUNT; k++) lua_pushstring(L, field[k].name);
  for (k = 0; k < U_COUNT; k++) lua_pushlstring(L, usage_key[k].name, usage_key[k].len);
  return lua_gettop(L) - K_COUNT - U_COUNT + 1;
}

/* an object's key: one of usage_key's, pushed once a batch, when it is
 * (an escaped key's bytes hold a backslash: never one of them) */
static int push_key(ctx *x, const lb_span *v) {
  int k;
  if (x->keys)
    for (k = 0; k < U_COUNT; k++)
      if (v->len == usage_key[k].len && memcmp(x->s + v->off, usage_key[k].name, v->len) == 0) {
        lua_pushvalue(x->L, x->keys + K_COUNT + k);
        return 1;
      }
  return push_string(x, v);
}

/* t[field k] = the value on the stack's top, t below it (popped): with
 * the name pushed once a batch (x->keys, lb_push_keys) when there is one,
 * not made a string again each time */
static void set(ctx *x, int k) {
  if (!x->keys) { lua_setfield(x->L, -2, field[k].name); return; }
  lua_pushvalue(x->L, x->keys + k);
  lua_insert(x->L, -2);
  lua_rawset(x->L, -3);
}

/* the fields as results.record has them (custom_id and ok, and those of
 * `want` the line has), or 0: lua-cjson decides; *okp the record's ok */
static int fields(ctx *x, const lb_result *r, int *okp, unsigned want) {
  lua_State *L = x->L;
  int body = r->body.kind == LB_J_OBJ, ok;
  if (!OPT(r->custom_id, LB_J_STR) || !OPT(r->id, LB_J_STR) || !OPT(r->error, LB_J_OBJ)
      || !OPT(r->response, LB_J_OBJ) || !OPT(r->status_code, LB_J_NUM) || !OPT(r->request_id, LB_J_STR)
      || !OPT(r->body, LB_J_OBJ) || !OPT(r->model, LB_J_STR) || !OPT(r->created, LB_J_NUM)
      || !OPT(r->body_error, LB_J_OBJ) || r->usage.kind == LB_J_ARR
      || r->choices.kind == LB_J_OBJ || r->choice0.kind == LB_J_ARR || r->message.kind == LB_J_ARR
      || !OPT(r->content, LB_J_STR) || !OPT(r->reasoning, LB_J_STR)
      || r->data.kind == LB_J_OBJ || r->datum0.kind == LB_J_ARR
      || !(OPT(r->embedding, LB_J_ARR) || r->embedding.kind == LB_J_FALSE))
    return 0;
  if (want == LB_F_ALL) lua_createtable(L, 0, 16);    /* with room for line, class and the lazy ones */
  else {
    int n = 3;                                         /* custom_id, ok, line */
    unsigned m;
    for (m = want; m; m &= m - 1) n++;
    lua_createtable(L, 0, n);
  }
#define SET(k, span) do { \
    if ((field[k].bit == 0 || (want & field[k].bit)) && !NIL(span)) { if (!push_span(x, &(span))) return 0; set(x, k); } \
  } while (0)
  SET(K_CUSTOM_ID, r->custom_id);
  SET(K_ID, r->id);
  SET(K_STATUS, r->status_code);
  SET(K_REQUEST_ID, r->request_id);
  ok = 0;
  if (r->status_code.kind == LB_J_NUM) {
    double st = number_of(x->s + r->status_code.off, r->status_code.len);
    ok = st >= 200 && st < 300 && NIL(r->error) && NIL(r->body_error) && body && r->body_keys > 0;
  }
  lua_pushboolean(L, ok);
  set(x, K_OK);
  *okp = ok;
  if (body) {
    SET(K_MODEL, r->model);
    SET(K_CREATED, r->created);
    if (r->usage.kind == LB_J_OBJ) SET(K_USAGE, r->usage);
    if (r->message.kind == LB_J_OBJ) {
      SET(K_CONTENT, r->content);
      SET(K_REASONING, r->reasoning);
    }
    if (r->datum0.kind == LB_J_OBJ && r->embedding.kind == LB_J_ARR) SET(K_EMBEDDING, r->embedding);
  }
#undef SET
  if (!push_span(x, &r->error) || !push_span(x, &r->body_error)) return 0;
  return 1;
}

#ifndef LUA_FILEHANDLE
#define LUA_FILEHANDLE "FILE*"
#endif

/* core.line_at(fh, off): the line at byte off of an open file (without
 * its newline and a final \r), read with pread: a joined result costs
 * its own bytes, not a buffer's worth of them after a seek; nil at the
 * end of the file, nil and the reason when it cannot be read */
/* the FILE of a Lua file handle at idx, or NULL when it is closed */
FILE *lb_file_of(lua_State *L, int idx) {
  void *ud = luaL_checkudata(L, idx, LUA_FILEHANDLE);
  FILE *f = *(FILE **)ud;   /* the FILE first, on every Lua */
#if LUA_VERSION_NUM >= 502 && !defined(LUAJIT_VERSION)
  if (((luaL_Stream *)ud)->closef == NULL) f = NULL;   /* closed: f is freed memory (enc.c's file_of) */
#endif
  return f;
}

/* the line at byte off of fd into *p (small, or a block of the collector's
 * pushed on L: nothing to free, whatever raises after) and its length
 * without the newline; *eof when nothing was there. 0, or -1 (errno) */
static int read_line(lua_State *L, int fd, off_t off, char *small, size_t cap, char **out, size_t *outlen,
                     int *eof) {
  char *p = small, *nl = NULL;
  size_t len = 0;
  for (;;) {
    ssize_t got = pread(fd, p + len, cap - len, off + (off_t)len);
    if (got < 0) return -1;
    nl = memchr(p + len, '\n', (size_t)got);
    len += (size_t)got;
    if (nl || got == 0) break;
    if (len == cap) {                        /* (twice as much: the one before is garbage) */
      char *q = lua_newuserdata(L, cap * 2);
      memcpy(q, p, len);
      p = q;
      cap *= 2;
    }
  }
  if (nl) len = (size_t)(nl - p);
  *eof = len == 0 && !nl;
  if (len && p[len - 1] == '\r') len--;
  *out = p;
  *outlen = len;
  return 0;
}

int lb_line_at(lua_State *L) {
  FILE *f = lb_file_of(L, 1);
  off_t off = (off_t)luaL_checknumber(L, 2);
  char small[2048], *p;
  size_t len;
  int fd, eof, rc;
  if (!f) return luaL_error(L, "line_at: the file is closed");
  fd = fileno(f);
  if (fd < 0) return luaL_argerror(L, 1, "an open file expected");
  rc = read_line(L, fd, off, small, sizeof small, &p, &len, &eof);
  if (rc == -1) {
    lua_pushnil(L);
    lua_pushstring(L, strerror(errno));
    return 2;
  }
  if (eof) lua_pushnil(L); else lua_pushlstring(L, p, len);
  return 1;
}

/* the fields of result line s (n bytes), scanned into r, pushed as
 * core.result returns them (3 values; the record with only the fields of
 * `want`, and custom_id and ok), or false (1 value) when the scanner
 * leaves it to Lua; *ok the record's ok */
int lb_push_scanned(lua_State *L, const char *s, size_t n, const lb_result *r, int *ok, unsigned want, int keys) {
  ctx x;
  int top = lua_gettop(L), done;
  char small[4096];
  *ok = 0;
  x.L = L; x.s = s; x.keys = keys;
  x.tmp = small;                                  /* unescaped text is never longer than n */
  if (n > sizeof small) x.tmp = lua_newuserdata(L, n);   /* (the collector's: no leak when a push raises) */
  done = fields(&x, r, ok, want);
  if (!done) { lua_settop(L, top); lua_pushboolean(L, 0); *ok = 0; return 1; }
  if (x.tmp != small) lua_remove(L, top + 1);
  return 3;
}

/* the same, scanned here */
int lb_push_result(lua_State *L, const char *s, size_t n) {
  lb_result r;
  int ok;
  if (!lb_result_scan(s, n, &r)) { lua_pushboolean(L, 0); return 1; }
  return lb_push_scanned(L, s, n, &r, &ok, LB_F_ALL, 0);
}

/* found:answer(line, handles): the join's step for one input line, in one
 * call. Its custom_id taken from the index `found` (values fileno * 2^36 +
 * offset, as m:scan puts them), the answer's line read from handles[fileno]
 * (an open file) and scanned: returns the answer's line and core.result's
 * values for it (rec, err, berr, or false); nil and the custom_id when the
 * index has no answer for it; false when the id cannot be read cheaply
 * (the caller decodes the line); nil, nil and the reason when the answer
 * cannot be read. */
int lb_idmap_answer(lua_State *L) {
  idmap *m = lb_idmap_check(L, 1);
  size_t n, io = 0, il = 0, len;
  const char *s = luaL_checklstring(L, 2, &n);
  lua_Number v;
  double k;
  char small[2048], *p;
  FILE *f;
  int eof, rc, fd, got;
  luaL_checktype(L, 3, LUA_TTABLE);
  if (lb_json_string(s, n, "custom_id", 9, &io, &il) != LB_FOUND) { lua_pushboolean(L, 0); return 1; }
  if (!lb_idmap_take(m, s + io, il, &v)) {
    lua_pushnil(L);
    lua_pushlstring(L, s + io, il);
    return 2;
  }
  k = floor(v / 68719476736.0);
  lua_rawgeti(L, 3, (lua_Integer)k);
  f = lb_file_of(L, -1);
  if (!f || (fd = fileno(f)) < 0) return luaL_error(L, "answer: the file is closed");
  lua_pop(L, 1);
  rc = read_line(L, fd, (off_t)(v - k * 68719476736.0), small, sizeof small, &p, &len, &eof);
  if (rc == -1) {
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushstring(L, strerror(errno));
    return 3;
  }
  lua_pushlstring(L, p, len);
  s = lua_tolstring(L, -1, &n);
  got = lb_push_result(L, s, n);
  return 1 + got;
}

int lb_core_result(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  return lb_push_result(L, s, n);
}
#endif
