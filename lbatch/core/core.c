/* lbatch.core: the module. Every metatable is registered here, once, when
 * the module loads; the files by job hold the rest:
 *   multi.c  the controller (core.new): the multi handle, its queue, step
 *   xfer.c   one transfer          fail.c   our own failure kinds (core.FAIL)
 *   idmap.c  the hash map          index.c  the JSONL indexer (idmap:scan)
 *   scan.c   byte scanners         sys.c    clock, sleep, mkdir, disk, signals, lock
 *   buf.c    growable buffers   enc.c    the request line encoder (core.encoder)
 *   rec.c    the result line scanner (core.result) */
#include "core.h"

#if LIBCURL_VERSION_NUM < 0x073800
#error "lbatch needs libcurl 7.56.0 or newer (curl_mime)"
#endif

/* a metatable `name` with metamethods `meta` and, as __index, one table
 * of every method list in `methods` (NULL-terminated) */
static void metatable(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *const *methods) {
  luaL_newmetatable(L, name);
  lua_newtable(L);
  for (; *methods; methods++) luaL_setfuncs(L, *methods, 0);
  lua_setfield(L, -2, "__index");
  luaL_setfuncs(L, meta, 0);
  lua_pop(L, 1);
}

int luaopen_lbatch_core(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"new", lbatch_ctl_new}, {"idmap", lbatch_idmap_new},
    {"now", lbatch_now}, {"sleep", lbatch_sleep}, {"mkdir", lbatch_mkdir}, {"fsync", lbatch_fsync}, {"disk_free", lbatch_disk_free},
    {"lock", lbatch_lock},
    {"version", lbatch_version}, {"trap", lbatch_trap}, {"caught", lbatch_caught},
    {"utf8_check", lbatch_utf8_check}, {"json_string", lbatch_json_string},
    {"hmac_sha256", lbatch_hmac_sha256}, {"equal", lbatch_equal}, {"base64", lbatch_base64},
    {"unbase64", lbatch_unbase64}, {"encoder", lbatch_encoder_new}, {"encode", lbatch_encode},
    {"result", lbatch_result}, {"line_at", lbatch_line_at},
    {"dumpable", lbatch_dumpable}, {"remove_parts", lbatch_remove_parts},
    {NULL, NULL}
  };
  static const luaL_Reg *const ctl_methods[] = { lbatch_ctl_methods, NULL };
  static const luaL_Reg *const idmap_methods[] = { lbatch_idmap_methods, lbatch_index_methods, NULL };
  curl_global_init(CURL_GLOBAL_DEFAULT);
  {  /* the first multipart boundary seeds the TLS library's random
      * generator (about 1 ms): pay it here, not in a host's frame */
    CURL *e = curl_easy_init();
    if (e) { curl_mime_free(curl_mime_init(e)); curl_easy_cleanup(e); }
  }
  metatable(L, LBATCH_CTL, lbatch_ctl_meta, ctl_methods);
  metatable(L, LBATCH_IDMAP, lbatch_idmap_meta, idmap_methods);
  lbatch_encoder_register(L);
  lbatch_lock_register(L);
  luaL_newlib(L, funcs);
  lbatch_push_fail(L);
  lua_setfield(L, -2, "FAIL");
  return 1;
}
