// Errors as values, in the spirit of leveldb's Status.
//
// A Status is either ok or carries a Code, the phase that failed (e.g. "read disk", "upload",
// "commit"), the cause, and the fix an operator can apply. The code says whether a retry can
// help (retryable()). Status and Result<T> are plain values: copy them, return them, never
// throw them. Thread-compatible (no shared state).
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace vmsnap {

enum class Code {
  kOk = 0,
  kInvalidArgument,    // the caller's input is wrong; retrying the same input cannot help
  kNotFound,           // a named thing (disk, recovery point, block) does not exist
  kAlreadyExists,      // refusing to overwrite
  kIoError,            // the OS failed a read or write
  kCorruption,         // stored data does not match its checksum
  kUnavailable,        // transient: network down, server restarting; retry with backoff
  kTimeout,            // transient: a deadline passed
  kUnauthenticated,    // bad or missing token/credential
  kPermissionDenied,   // authenticated but not allowed, or unsafe file permissions
  kConflict,           // state changed underneath (e.g. parent recovery point moved)
  kCancelled,          // the job was cancelled
  kResourceExhausted,  // out of space (a full disk, the vault's at its reserve); free it first
  kInternal,           // a bug
};

const char* CodeName(Code code);

class Status {
 public:
  Status() = default;  // ok

  static Status Ok() { return Status(); }
  static Status Error(Code code, std::string cause, std::string fix = {}) {
    Status s;
    s.code_ = code;
    s.cause_ = std::move(cause);
    s.fix_ = std::move(fix);
    return s;
  }
  static Status InvalidArgument(std::string cause, std::string fix = {}) {
    return Error(Code::kInvalidArgument, std::move(cause), std::move(fix));
  }
  static Status NotFound(std::string cause, std::string fix = {}) {
    return Error(Code::kNotFound, std::move(cause), std::move(fix));
  }
  static Status IoError(std::string cause, std::string fix = {}) {
    return Error(Code::kIoError, std::move(cause), std::move(fix));
  }
  static Status Corruption(std::string cause, std::string fix = {}) {
    return Error(Code::kCorruption, std::move(cause), std::move(fix));
  }
  static Status Unavailable(std::string cause, std::string fix = {}) {
    return Error(Code::kUnavailable, std::move(cause), std::move(fix));
  }
  static Status Internal(std::string cause) { return Error(Code::kInternal, std::move(cause)); }

  // errno-based error: "<what>: <strerror(err)>". kResourceExhausted for a full filesystem or
  // quota (ENOSPC, EDQUOT), else kIoError.
  static Status FromErrno(int err, const std::string& what, std::string fix = {});

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  // True when the same operation may succeed later (network, timeouts, server busy).
  bool retryable() const { return code_ == Code::kUnavailable || code_ == Code::kTimeout; }

  const std::string& phase() const { return phase_; }
  const std::string& cause() const { return cause_; }
  const std::string& fix() const { return fix_; }

  // Sets the phase if none is set yet (the innermost phase is the most precise).
  Status& InPhase(std::string phase) & {
    if (phase_.empty()) phase_ = std::move(phase);
    return *this;
  }
  Status&& InPhase(std::string phase) && { return std::move(InPhase(std::move(phase))); }
  Status& WithFix(std::string fix) & {
    if (fix_.empty()) fix_ = std::move(fix);
    return *this;
  }
  Status&& WithFix(std::string fix) && { return std::move(WithFix(std::move(fix))); }

  // "phase: cause (CODE). Fix: fix" — one line for logs and the terminal.
  std::string ToString() const;

  // Process exit code for this status (documented in docs/OPERATIONS.md).
  int ExitCode() const;

 private:
  Code code_ = Code::kOk;
  std::string phase_;
  std::string cause_;
  std::string fix_;
};

// A value or the Status explaining why there is none.
template <class T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}         // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {}  // NOLINT: must not be ok
  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  Status take_status() { return ok() ? Status() : std::move(std::get<Status>(v_)); }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() { return value(); }

 private:
  std::variant<T, Status> v_;
};

#define VMSNAP_RETURN_IF_ERROR(expr) \
  do {                               \
    ::vmsnap::Status _st = (expr);   \
    if (!_st.ok()) return _st;       \
  } while (0)

}  // namespace vmsnap
