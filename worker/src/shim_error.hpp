// How the worker's C++ shims report errors: no exception crosses the C ABI. Every
// c10::Error or std::exception becomes a malloc'd message returned through `err` (the
// Rust side frees it with rw_free_error, defined in c10d_shim.cpp) and a non-zero or
// null result.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace rankway {

inline char* copy_message(const char* what) {
  size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, what, n + 1);
  }
  return out;
}

// Runs `f`, turning any exception into a message in `err`: 0 on success, 1 on error.
template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    *err = copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = copy_message(e.what());
  } catch (...) {
    *err = copy_message("unknown C++ exception");
  }
  return 1;
}

}  // namespace rankway
