// A small RAII wrapper around one SQLite connection (the control plane's metadata store).
// Values are NULL, 64-bit integers or text. Not thread-safe: the owner serialises access
// (ControlPlane holds a mutex around every use). The database runs in WAL mode with
// synchronous=FULL, so a committed statement survives a crash. The first process to use a
// database holds it until its last connection closes; Open in another process fails with
// kConflict after a 5 s wait (see db.cpp).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "common/status.hpp"

struct sqlite3;
struct sqlite3_stmt;

namespace vmsnap::vault {

using DbValue = std::variant<std::nullptr_t, int64_t, std::string>;

struct DbRow {
  std::vector<DbValue> values;
  int64_t Int(size_t i) const;
  std::string Text(size_t i) const;
  bool IsNull(size_t i) const { return std::holds_alternative<std::nullptr_t>(values.at(i)); }
};

// One prepared statement of a Db, reused for many rows (Reset between uses): avoids parsing
// SQL per row on hot paths (the block index). Same thread rules as its Db; must not outlive it.
class DbStatement {
 public:
  ~DbStatement();
  DbStatement(const DbStatement&) = delete;
  DbStatement& operator=(const DbStatement&) = delete;
  // Parameters are 1-based like SQLite's. Blobs and text are copied.
  void BindInt(int index, int64_t value);
  void BindBlob(int index, const void* data, size_t size);
  // Next row: true with a row, false when done; kIoError (kAlreadyExists for a constraint).
  Result<bool> Step();
  int64_t ColumnInt(int column) const;
  std::string_view ColumnBlob(int column) const;
  // Ready to bind and run again (keeps the compiled statement, clears the bindings).
  void Reset();

 private:
  friend class Db;
  DbStatement(sqlite3* db, sqlite3_stmt* stmt) : db_(db), stmt_(stmt) {}
  sqlite3* db_;
  sqlite3_stmt* stmt_;
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
  Result<std::unique_ptr<DbStatement>> Prepare(const std::string& sql);

 private:
  explicit Db(sqlite3* db) : db_(db) {}
  sqlite3* db_;
};

}  // namespace vmsnap::vault
