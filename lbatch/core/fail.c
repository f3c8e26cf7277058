/* Our own failure kinds, defined once: the name a result's `fail` holds
 * and the error lbatch makes of it (lbatch/impl/transport/http.lua reads core.FAIL).
 *
 *   core.FAIL.truncated -> { kind = "network", code = "truncated", retryable = true }
 */
#include "core.h"

const fail_info lb_fail[FAIL_COUNT] = {
  [FAIL_NONE]      = { NULL, NULL, NULL, 0 },
  [FAIL_IO]        = { "io", "io", NULL, 0 },
  [FAIL_TRUNCATED] = { "truncated", "network", "truncated", 1 },
  [FAIL_TOO_LARGE] = { "too_large", "decode", "response_too_large", 0 },
  [FAIL_STALLED]   = { "stalled", "timeout", "stalled", 1 },
  [FAIL_RESEND]    = { "resend", "network", "connection_lost", 1 },
  [FAIL_ENCODING]  = { "encoding", "decode", "unexpected_encoding", 0 },
  [FAIL_RANGE]     = { "range", "network", "bad_range", 1 },
};

/* core.FAIL: name -> { kind, code (absent when none), retryable } */
void lb_push_fail(lua_State *L) {
  int i;
  lua_createtable(L, 0, FAIL_COUNT - 1);
  for (i = FAIL_NONE + 1; i < FAIL_COUNT; i++) {
    const fail_info *f = &lb_fail[i];
    lua_createtable(L, 0, 3);
    lua_pushstring(L, f->kind);
    lua_setfield(L, -2, "kind");
    if (f->code) {
      lua_pushstring(L, f->code);
      lua_setfield(L, -2, "code");
    }
    lua_pushboolean(L, f->retryable);
    lua_setfield(L, -2, "retryable");
    lua_setfield(L, -2, f->name);
  }
}
