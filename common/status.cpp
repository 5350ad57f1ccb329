#include "common/status.hpp"

#include <cerrno>
#include <cstring>

namespace vmsnap {

const char* CodeName(Code code) {
  switch (code) {
    case Code::kOk:
      return "OK";
    case Code::kInvalidArgument:
      return "INVALID_ARGUMENT";
    case Code::kNotFound:
      return "NOT_FOUND";
    case Code::kAlreadyExists:
      return "ALREADY_EXISTS";
    case Code::kIoError:
      return "IO_ERROR";
    case Code::kCorruption:
      return "CORRUPTION";
    case Code::kUnavailable:
      return "UNAVAILABLE";
    case Code::kTimeout:
      return "TIMEOUT";
    case Code::kUnauthenticated:
      return "UNAUTHENTICATED";
    case Code::kPermissionDenied:
      return "PERMISSION_DENIED";
    case Code::kConflict:
      return "CONFLICT";
    case Code::kCancelled:
      return "CANCELLED";
    case Code::kResourceExhausted:
      return "RESOURCE_EXHAUSTED";
    case Code::kInternal:
      return "INTERNAL";
  }
  return "UNKNOWN";
}

Status Status::FromErrno(int err, const std::string& what, std::string fix) {
  // A full filesystem or quota: what the operator does about it (free space) differs from a
  // failing device's, and retrying before that cannot help.
  bool full = err == ENOSPC;
#ifdef EDQUOT
  full = full || err == EDQUOT;
#endif
  return Error(full ? Code::kResourceExhausted : Code::kIoError, what + ": " + std::strerror(err),
               std::move(fix));
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s;
  if (!phase_.empty()) s += phase_ + ": ";
  s += cause_;
  s += " (";
  s += CodeName(code_);
  s += ")";
  if (!fix_.empty()) s += ". Fix: " + fix_;
  return s;
}

int Status::ExitCode() const {
  switch (code_) {
    case Code::kOk:
      return 0;
    case Code::kInvalidArgument:
      return 2;
    case Code::kUnavailable:
    case Code::kTimeout:
      return 3;
    case Code::kUnauthenticated:
    case Code::kPermissionDenied:
      return 4;
    case Code::kCorruption:
      return 5;
    case Code::kNotFound:
      return 6;
    case Code::kCancelled:
      return 7;
    default:
      return 1;
  }
}

}  // namespace vmsnap
