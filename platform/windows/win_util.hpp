// Helpers shared by the Windows platform files (never included outside platform/windows):
// UTF-8 <-> UTF-16 conversion, an RAII HANDLE owner and Win32 errors as vmsnap::Status.
#pragma once

#include <windows.h>

#include <string>
#include <utility>

#include "common/status.hpp"

namespace vmsnap::platform::win {

// UTF-8 -> UTF-16 for the W functions. Invalid UTF-8 becomes U+FFFD (the file is then not
// found, with the path named in the error).
std::wstring Widen(const std::string& utf8);
// UTF-16 -> UTF-8 (unpaired surrogates become U+FFFD).
std::string Narrow(const std::wstring& utf16);

// The system's message for a Win32 error code, without the trailing newline, e.g.
// "The system cannot find the file specified. (error 2)".
std::string ErrorText(DWORD error);

// A Status for a failed Win32 call: kNotFound for missing files and paths, kPermissionDenied
// for access errors, kUnavailable for sharing violations, kIoError otherwise.
// Cause: "<what>: <system message> (error N)".
Status FromWin32(DWORD error, const std::string& what, std::string fix = {});

// Owns a kernel HANDLE (file, process, job, pipe, event); closes it on destruction. Both
// INVALID_HANDLE_VALUE and nullptr mean "none". Movable, not copyable; one owner.
class Handle {
 public:
  Handle() = default;
  explicit Handle(HANDLE h) : h_(h) {}
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle(Handle&& o) noexcept : h_(std::exchange(o.h_, INVALID_HANDLE_VALUE)) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      Reset();
      h_ = std::exchange(o.h_, INVALID_HANDLE_VALUE);
    }
    return *this;
  }
  ~Handle() { Reset(); }
  HANDLE get() const { return h_; }
  bool valid() const { return h_ != INVALID_HANDLE_VALUE && h_ != nullptr; }
  HANDLE Release() { return std::exchange(h_, INVALID_HANDLE_VALUE); }
  void Reset(HANDLE h = INVALID_HANDLE_VALUE) {
    if (valid()) ::CloseHandle(h_);
    h_ = h;
  }

 private:
  HANDLE h_ = INVALID_HANDLE_VALUE;
};

}  // namespace vmsnap::platform::win
