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
 *   m:count();  m:keys() -> list of the keys left;  m:clear() */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "core.h"

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

int lbatch_idmap_new(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"put", m_put}, {"get", m_get}, {"take", m_take}, {"count", m_count},
    {"keys", m_keys}, {"clear", m_clear}, {NULL, NULL}
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
