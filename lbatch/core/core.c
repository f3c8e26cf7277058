/* lbatch.core: the module. Every metatable is registered here, once, when
 * the module loads; the files by job hold the rest:
 *   multi.c  the controller (core.new): the multi handle, its queue, step
 *   xfer.c   one transfer          fail.c   our own failure kinds (core.FAIL)
 *   idmap.c  the hash map          index.c  the JSONL indexer (idmap:scan)
 *   scan.c   byte scanners         sys.c    clock, sleep, mkdir, disk, signals, lock
 *   buf.c    growable buffers   enc.c    the request line encoder (core.encoder)
 *   rec.c    the result line scanner (core.result) and core.line_at
 *   hmac.c   HMAC-SHA256, a constant-time compare, base64, hex */
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

LB_EXPORT int luaopen_lbatch_core(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"new", lb_ctl_new}, {"idmap", lb_idmap_new},
    {"now", lb_now}, {"sleep", lb_sleep}, {"mkdir", lb_mkdir}, {"fsync", lb_fsync}, {"disk_free", lb_disk_free},
    {"lock", lb_lock},
    {"version", lb_version}, {"trap", lb_trap}, {"caught", lb_caught},
    {"utf8_check", lb_utf8_check}, {"json_string", lb_core_json_string},
    {"hmac_sha256", lb_hmac_sha256}, {"equal", lb_equal}, {"base64", lb_base64},
    {"unbase64", lb_unbase64}, {"hex", lb_hex}, {"encoder", lb_encoder_new}, {"encode", lb_encode},
    {"result", lb_core_result}, {"line_at", lb_line_at}, {"window", lb_window_new},
    {"answer_bytes", lb_answer_bytes},
    {"dumpable", lb_dumpable}, {"remove_parts", lb_remove_parts},
    {NULL, NULL}
  };
  static const luaL_Reg *const ctl_methods[] = { lb_ctl_methods, NULL };
  static const luaL_Reg *const idmap_methods[] = { lb_idmap_methods, lb_index_methods, NULL };
  curl_global_init(CURL_GLOBAL_DEFAULT);
  {  /* the first multipart boundary seeds the TLS library's random
      * generator (about 1 ms): pay it here, not in a host's frame */
    CURL *e = curl_easy_init();
    if (e) { curl_mime_free(curl_mime_init(e)); curl_easy_cleanup(e); }
  }
  metatable(L, LBATCH_CTL, lb_ctl_meta, ctl_methods);
  metatable(L, LBATCH_IDMAP, lb_idmap_meta, idmap_methods);
  lb_encoder_register(L);
  lb_lock_register(L);
  luaL_newlib(L, funcs);
  lb_push_fail(L);
  lua_setfield(L, -2, "FAIL");
  return 1;
}
