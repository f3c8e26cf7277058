/* libFuzzer harness for the writer's encoder (lbatch/core/enc.c): the
 * input builds a Lua value (strings of any bytes, numbers of any bits,
 * nested tables, arrays with holes, cjson.null, booleans) and whatever the
 * encoder writes must be, byte for byte, what lua-cjson's encode writes;
 * what it leaves to lua-cjson it may leave. Built with Lua 5.4 and run by
 * spec/fuzz/run beside fuzz_scan.c. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include "../../lbatch/core/core.h"

static lua_State *L;

typedef struct in { const uint8_t *p; size_t n; } in;

static int byte(in *x) {
  if (!x->n) return -1;
  x->n--;
  return *x->p++;
}

/* one value from the input on the stack */
static void build(in *x, int depth) {
  int b = byte(x), k, len;
  if (b < 0) { lua_pushinteger(L, 0); return; }
  switch (b % 8) {
  case 0: case 1:                        /* a string of the next bytes */
    len = byte(x);
    len = len < 0 ? 0 : len % 24;
    if ((size_t)len > x->n) len = (int)x->n;
    lua_pushlstring(L, (const char *)x->p, (size_t)len);
    x->p += len; x->n -= (size_t)len;
    return;
  case 2: {                              /* a number of any bits */
    double d = 0;
    if (x->n >= sizeof d) { memcpy(&d, x->p, sizeof d); x->p += sizeof d; x->n -= sizeof d; }
    lua_pushnumber(L, d);
    return;
  }
  case 3: lua_pushinteger(L, (lua_Integer)(int8_t)byte(x) * 1000003); return;
  case 4: lua_pushboolean(L, b & 8); return;
  case 5: lua_pushlightuserdata(L, NULL); return;   /* cjson.null */
  default:
    lua_newtable(L);
    if (depth > 6) return;
    len = byte(x);
    len = len < 0 ? 0 : len % 6;
    for (k = 0; k < len; k++) {
      if (b % 8 == 6) {                    /* an array, now and then with a hole */
        build(x, depth + 1);
        lua_rawseti(L, -2, k + 1 + ((b & 64) && k == len - 1));
      } else {
        build(x, depth + 1);
        if (!lua_isstring(L, -1) || lua_type(L, -1) != LUA_TSTRING) { lua_pop(L, 1); lua_pushstring(L, "k"); }
        build(x, depth + 1);
        lua_rawset(L, -3);
      }
    }
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  in x = { data, size };
  buf b = {0};
  int r;
  if (!L) {
    L = luaL_newstate();
    luaL_openlibs(L);
    if (luaL_dostring(L, "package.cpath = '/usr/lib/x86_64-linux-gnu/lua/5.4/?.so;' .. package.cpath "
                         "cjson_encode = require('cjson.safe').encode")) abort();
  }
  lua_settop(L, 0);
  build(&x, 0);
  r = lb_enc_value(L, &b, 1, 0, NULL, 0);
  if (r == LB_ENC_OK) {
    size_t n;
    const char *want;
    lua_getglobal(L, "cjson_encode");
    lua_pushvalue(L, 1);
    lua_call(L, 1, 1);
    want = lua_tolstring(L, -1, &n);
    if (!want || n != b.len || memcmp(want, b.p, n) != 0) abort();
  } else if (r != LB_ENC_NO) abort();
  lb_buf_free(&b);
  return 0;
}
