/* idmap: custom_id -> integer, in C memory.
 *
 * The JSONL writer keeps up to 50,000 custom_ids per file and the results
 * reader indexes every result line. Held in a Lua table, that many live
 * strings make LuaJIT's collector run rarely while request-sized strings
 * pile up in its string table, where LuaJIT's sampled hash puts lines that
 * differ only in the middle into the same chains: interning goes quadratic
 * (measured: 10x slower writes). Here they cost the collector nothing.
 *
 *   local m = core.idmap()
 *   m:put(key, value) -> true if new, false if the key was there (kept)
 *   m:get(key) -> value | nil;  m:take(key) -> value | nil (and removes it)
 *   m:count();  m:keys() -> list of the keys left;  m:clear()
 *   m:has(key) -> boolean
 *   m:scan(path, fileno [, start, max_lines, filter, drop])
 *     reads the JSONL file at path from byte `start` (0) for at most
 *     `max_lines` lines and, for each line's top-level "custom_id" string,
 *     puts custom_id -> fileno * 2^36 + the line's byte offset (the first
 *     one wins) or, with `drop`, removes it; with `filter` (another idmap)
 *     only the ids in filter count. No Lua string is made per line.
 *     Returns lines read, the offset after them (nil at the end of the
 *     file), and the offsets of the lines whose id it could not read
 *     cheaply (escapes, no id, over LINE_MAX bytes): the caller decodes
 *     those. Or nil and the OS's reason. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core.h"
#include "scan.h"

#define SCAN_CHUNK (1 << 20)
#define SCAN_LINE_MAX (8u << 20)   /* past the service's 6 MB line limit */
#define FILE_SPAN 68719476736.0    /* 2^36: offsets up to 64 GB per file */

#define LBATCH_IDMAP "lbatch.core.idmap"
#define TOMB ((char *)1)

typedef struct slot {
  uint64_t hash;
  char *key;          /* NULL: empty; TOMB: removed */
  size_t len;
  lua_Number value;
} slot;

typedef struct idmap {
  slot *slots;
  size_t cap, n, used;  /* used counts tombstones too */
} idmap;

static uint64_t fnv1a(const char *s, size_t n) {
  uint64_t h = 1469598103934665603ULL;
  size_t i;
  for (i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 1099511628211ULL; }
  return h;
}

static slot *find(idmap *m, const char *k, size_t len, uint64_t h, int for_insert) {
  size_t i = (size_t)h & (m->cap - 1);
  slot *tomb = NULL;
  for (;;) {
    slot *s = &m->slots[i];
    if (s->key == NULL) return for_insert ? (tomb ? tomb : s) : NULL;
    if (s->key == TOMB) { if (!tomb) tomb = s; }
    else if (s->hash == h && s->len == len && memcmp(s->key, k, len) == 0) return s;
    i = (i + 1) & (m->cap - 1);
  }
}

static int grow(idmap *m) {
  size_t i, cap = m->cap ? m->cap * 2 : 64;
  slot *old = m->slots, *ns = calloc(cap, sizeof *ns);
  size_t oldcap = m->cap;
  if (!ns) return 0;
  m->slots = ns; m->cap = cap; m->used = m->n;
  for (i = 0; i < oldcap; i++)
    if (old[i].key && old[i].key != TOMB) *find(m, old[i].key, old[i].len, old[i].hash, 1) = old[i];
  free(old);
  return 1;
}

static void clear(idmap *m) {
  size_t i;
  for (i = 0; i < m->cap; i++)
    if (m->slots[i].key && m->slots[i].key != TOMB) free(m->slots[i].key);
  free(m->slots);
  m->slots = NULL;
  m->cap = m->n = m->used = 0;
}

static idmap *check(lua_State *L) { return luaL_checkudata(L, 1, LBATCH_IDMAP); }

static int m_put(lua_State *L) {
  idmap *m = check(L);
  size_t len;
  const char *k = luaL_checklstring(L, 2, &len);
  lua_Number v = lua_isnoneornil(L, 3) ? 1 : luaL_checknumber(L, 3);
  uint64_t h = fnv1a(k, len);
  slot *s;
  char *copy;
  if ((m->used + 1) * 10 >= m->cap * 7 && !grow(m)) return luaL_error(L, "idmap: out of memory");
  s = find(m, k, len, h, 1);
  if (s->key && s->key != TOMB) { lua_pushboolean(L, 0); return 1; }
  if (!(copy = malloc(len ? len : 1))) return luaL_error(L, "idmap: out of memory");
  memcpy(copy, k, len);
  if (!s->key) m->used++;
  s->key = copy; s->len = len; s->hash = h; s->value = v;
  m->n++;
  lua_pushboolean(L, 1);
  return 1;
}

static int lookup(lua_State *L, int take) {
  idmap *m = check(L);
  size_t len;
  const char *k = luaL_checklstring(L, 2, &len);
  slot *s = m->cap ? find(m, k, len, fnv1a(k, len), 0) : NULL;
  if (!s) return 0;
  lua_pushnumber(L, s->value);
  if (take) { free(s->key); s->key = TOMB; m->n--; }
  return 1;
}
static int m_get(lua_State *L) { return lookup(L, 0); }
static int m_take(lua_State *L) { return lookup(L, 1); }

static int m_count(lua_State *L) { lua_pushinteger(L, (lua_Integer)check(L)->n); return 1; }

static int m_keys(lua_State *L) {
  idmap *m = check(L);
  size_t i;
  int n = 0;
  lua_createtable(L, (int)m->n, 0);
  for (i = 0; i < m->cap; i++) {
    if (m->slots[i].key && m->slots[i].key != TOMB) {
      lua_pushlstring(L, m->slots[i].key, m->slots[i].len);
      lua_rawseti(L, -2, ++n);
    }
  }
  return 1;
}

static int m_clear(lua_State *L) { clear(check(L)); return 0; }

static int m_has(lua_State *L) {
  idmap *m = check(L);
  size_t len;
  const char *k = luaL_checklstring(L, 2, &len);
  lua_pushboolean(L, m->cap && find(m, k, len, fnv1a(k, len), 0) != NULL);
  return 1;
}

/* one line of a scan: its id counted in m (or its offset listed for Lua) */
static int scan_line(lua_State *L, idmap *m, idmap *filter, int drop, double base,
                     const char *line, size_t n, int over, size_t off, int *bad) {
  size_t io = 0, il = 0;
  slot *s;
  uint64_t h;
  if (n && line[n - 1] == '\r') n--;
  if (over || lb_json_string(line, n, "custom_id", 9, &io, &il) != LB_FOUND) {
    if (n == 0 && !over) return 1;                 /* an empty line */
    lua_pushinteger(L, (lua_Integer)off);
    lua_rawseti(L, -2, ++*bad);
    return 1;
  }
  h = fnv1a(line + io, il);
  if (filter && !(filter->cap && find(filter, line + io, il, h, 0))) return 1;
  if (drop) {
    s = m->cap ? find(m, line + io, il, h, 0) : NULL;
    if (s) { free(s->key); s->key = TOMB; m->n--; }
    return 1;
  }
  if ((m->used + 1) * 10 >= m->cap * 7 && !grow(m)) return 0;
  s = find(m, line + io, il, h, 1);
  if (s->key && s->key != TOMB) return 1;          /* the first one wins */
  if (!s->key) m->used++;
  if (!(s->key = malloc(il ? il : 1))) { s->key = TOMB; return 0; }
  memcpy(s->key, line + io, il);
  s->len = il; s->hash = h; s->value = base + (double)off;
  m->n++;
  return 1;
}

static int m_scan(lua_State *L) {
  idmap *m = check(L);
  const char *path = luaL_checkstring(L, 2);
  double fileno = luaL_checknumber(L, 3);
  size_t start = (size_t)luaL_optnumber(L, 4, 0);
  double max_lines = luaL_optnumber(L, 5, -1);
  idmap *filter = lua_isnoneornil(L, 6) ? NULL : luaL_checkudata(L, 6, LBATCH_IDMAP);
  int drop = lua_toboolean(L, 7);
  double base = fileno * FILE_SPAN, lines = 0;
  size_t off = start, line_off = start;  /* where the next read starts; where the line began */
  int bad = 0, ok = 1, over = 0, at_end = 0;
  buf line = {0};
  char *chunk;
  FILE *f = fopen(path, "rb");
  if (!f) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", path, strerror(errno));
    return 2;
  }
  if (start && fseek(f, (long)start, SEEK_SET) != 0) { fclose(f); return luaL_error(L, "idmap: cannot seek"); }
  if (!(chunk = malloc(SCAN_CHUNK))) { fclose(f); return luaL_error(L, "idmap: out of memory"); }
  lua_newtable(L);
  while (ok && (max_lines < 0 || lines < max_lines)) {
    size_t got = fread(chunk, 1, SCAN_CHUNK, f), i = 0;
    if (got == 0) {
      if (ferror(f)) { ok = -1; break; }
      if (line.len || over) {                       /* a last line without \n */
        ok = scan_line(L, m, filter, drop, base, line.p, line.len, over, line_off, &bad);
        lines++;
      }
      at_end = 1;
      break;
    }
    while (i < got) {
      char *nl = memchr(chunk + i, '\n', got - i);
      size_t take = nl ? (size_t)(nl - (chunk + i)) : got - i;
      const char *p = chunk + i;
      if (!over && line.len + take > SCAN_LINE_MAX) { over = 1; line.len = 0; }
      if (!nl) {
        if (!over && !buf_add(&line, p, take)) { ok = 0; break; }
        i = got;
        break;
      }
      if (line.len && !over) {
        if (!buf_add(&line, p, take)) { ok = 0; break; }
        ok = scan_line(L, m, filter, drop, base, line.p, line.len, 0, line_off, &bad);
      } else {
        ok = scan_line(L, m, filter, drop, base, p, take, over, line_off, &bad);
      }
      line.len = 0; over = 0;
      i += take + 1;
      line_off = off + i;
      lines++;
      if (!ok || (max_lines >= 0 && lines >= max_lines)) break;
    }
    off += i;
    if (ok && i < got) break;                        /* max_lines reached mid-chunk */
  }
  free(chunk);
  buf_free(&line);
  if (ok == -1 || ferror(f)) {
    fclose(f);
    lua_pushnil(L);
    lua_pushfstring(L, "%s: read error", path);
    return 2;
  }
  fclose(f);
  if (!ok) return luaL_error(L, "idmap: out of memory");
  lua_pushinteger(L, (lua_Integer)lines);
  lua_insert(L, -2);
  if (at_end) lua_pushnil(L); else lua_pushinteger(L, (lua_Integer)line_off);
  lua_insert(L, -2);
  return 3;
}

int lbatch_idmap_new(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"put", m_put}, {"get", m_get}, {"take", m_take}, {"count", m_count},
    {"keys", m_keys}, {"clear", m_clear}, {"has", m_has}, {"scan", m_scan}, {NULL, NULL}
  };
  idmap *m = lua_newuserdata(L, sizeof *m);
  memset(m, 0, sizeof *m);
  if (luaL_newmetatable(L, LBATCH_IDMAP)) {
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, m_clear);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return 1;
}
