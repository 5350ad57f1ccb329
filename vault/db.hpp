// A small RAII wrapper around one SQLite connection (the control plane's metadata store).
// Values are NULL, 64-bit integers or text. Not thread-safe: the owner serialises access
// (ControlPlane holds a mutex around every use). The database runs in WAL mode with
// synchronous=FULL, so a committed statement survives a crash.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "common/status.hpp"

struct sqlite3;

namespace vmsnap::vault {

using DbValue = std::variant<std::nullptr_t, int64_t, std::string>;

struct DbRow {
  std::vector<DbValue> values;
  int64_t Int(size_t i) const;
  std::string Text(size_t i) const;
  bool IsNull(size_t i) const { return std::holds_alternative<std::nullptr_t>(values.at(i)); }
};

class Db {
 public:
  static Result<std::unique_ptr<Db>> Open(const std::string& path);
  ~Db();
  // Runs one statement with positional parameters (?1, ?2, ...) and returns its rows.
  Result<std::vector<DbRow>> Query(const std::string& sql, const std::vector<DbValue>& params = {});
  // Runs statements without parameters (schema, PRAGMA, BEGIN/COMMIT).
  Status Exec(const std::string& sql);
  int64_t Changes() const;

 private:
  explicit Db(sqlite3* db) : db_(db) {}
  sqlite3* db_;
};

}  // namespace vmsnap::vault
