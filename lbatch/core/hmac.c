/* What verifying a webhook needs, from OpenSSL's libcrypto (which libcurl
 * already links), never written here:
 *   core.hmac_sha256(key, msg)  the 32-byte HMAC-SHA256 of msg
 *   core.equal(a, b)            constant-time comparison of two strings
 *   core.base64(s)              standard base64 (with padding)
 *   core.unbase64(s)            its inverse; nil for what is not base64
 *   core.hex(s)                 lower-case hex digits, two a byte (a digest's name) */
#include <string.h>
#include <openssl/hmac.h>
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include "core.h"

int lb_hmac_sha256(lua_State *L) {
  size_t klen, mlen;
  const char *key = luaL_checklstring(L, 1, &klen);
  const char *msg = luaL_checklstring(L, 2, &mlen);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int olen = 0;
  if (!HMAC(EVP_sha256(), key, (int)klen, (const unsigned char *)msg, mlen, out, &olen))
    return luaL_error(L, "hmac_sha256: OpenSSL failed");
  lua_pushlstring(L, (const char *)out, olen);
  return 1;
}

int lb_equal(lua_State *L) {
  size_t alen, blen;
  const char *a = luaL_checklstring(L, 1, &alen);
  const char *b = luaL_checklstring(L, 2, &blen);
  /* the lengths are public (a signature's is fixed); the bytes are not */
  lua_pushboolean(L, alen == blen && CRYPTO_memcmp(a, b, alen) == 0);
  return 1;
}

int lb_base64(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  unsigned char *out;
  int n;
  if (len > 0x3fffffff) return luaL_error(L, "base64: string too long");
  out = (unsigned char *)lua_newuserdata(L, 4 * ((len + 2) / 3) + 1);
  n = EVP_EncodeBlock(out, (const unsigned char *)s, (int)len);
  lua_pushlstring(L, (const char *)out, (size_t)n);
  return 1;
}

int lb_hex(lua_State *L) {
  static const char digits[] = "0123456789abcdef";
  size_t len, i;
  const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (i = 0; i < len; i++) {
    luaL_addchar(&b, digits[s[i] >> 4]);
    luaL_addchar(&b, digits[s[i] & 15]);
  }
  luaL_pushresult(&b);
  return 1;
}

int lb_unbase64(lua_State *L) {
  size_t len, i, pad = 0;
  const char *s = luaL_checklstring(L, 1, &len);
  unsigned char *out;
  int n;
  if (len % 4 != 0 || len > 0x3fffffff) { lua_pushnil(L); return 1; }
  for (i = 0; i < len; i++) {   /* EVP_DecodeBlock skips blanks: refuse them */
    unsigned char c = (unsigned char)s[i];
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
          c == '+' || c == '/' || (c == '=' && i >= len - 2))) { lua_pushnil(L); return 1; }
  }
  if (len >= 1 && s[len - 1] == '=') pad++;
  if (len >= 2 && s[len - 2] == '=') pad++;
  if (pad == 1 && len >= 2 && s[len - 2] == '=') { lua_pushnil(L); return 1; }
  out = (unsigned char *)lua_newuserdata(L, len / 4 * 3 + 1);
  n = len ? EVP_DecodeBlock(out, (const unsigned char *)s, (int)len) : 0;
  if (n < 0 || (size_t)n < pad) { lua_pushnil(L); return 1; }
  /* it counts the padding's zero bytes */
  lua_pushlstring(L, (const char *)out, (size_t)n - pad);
  return 1;
}
