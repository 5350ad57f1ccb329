#include "vault/db.hpp"

#include <sqlite3.h>

namespace vmsnap::vault {

int64_t DbRow::Int(size_t i) const {
  const auto& v = values.at(i);
  if (auto p = std::get_if<int64_t>(&v)) return *p;
  if (auto s = std::get_if<std::string>(&v)) return std::stoll(*s);
  return 0;
}

std::string DbRow::Text(size_t i) const {
  const auto& v = values.at(i);
  if (auto s = std::get_if<std::string>(&v)) return *s;
  if (auto p = std::get_if<int64_t>(&v)) return std::to_string(*p);
  return "";
}

namespace {

// A failed statement's status: a full disk is kResourceExhausted (the caller may go on without
// writing), a violated constraint kAlreadyExists, anything else kIoError.
Status StepError(int rc, const std::string& message) {
  const std::string msg = "metadata database: " + message;
  if (rc == SQLITE_CONSTRAINT) return Status::Error(Code::kAlreadyExists, msg);
  if ((rc & 0xff) == SQLITE_FULL)
    return Status::Error(Code::kResourceExhausted, msg, "free space on the vault's disk");
  return Status::IoError(msg);
}

// Only the process that opens a database first may use it: SQLite's "unix-excl" VFS holds an
// exclusive lock from the first access on (other connections of the same process share it).
// SQLite then keeps the WAL index in this process's memory instead of a memory-mapped
// "-shm" file. A write into such a mapping whose blocks the filesystem cannot allocate — a full
// disk with blocks smaller than a memory page (SQLite allocates only one block per page), or
// btrfs, which needs new space for every write — can kill the process with SIGBUS instead of
// failing the statement with SQLITE_FULL. A second vault on the same data directory gets a
// clear error instead of sharing the packs.
#if defined(__unix__)
constexpr const char* kVfs = "unix-excl";
#else
constexpr const char* kVfs = nullptr;
#endif

}  // namespace

Result<std::unique_ptr<Db>> Db::Open(const std::string& path) {
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(
      path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, kVfs);
  std::unique_ptr<Db> db(new Db(raw));
  if (rc != SQLITE_OK)
    return Status::IoError("open metadata database " + path + ": " + sqlite3_errstr(rc),
                           "check that the vault's data directory is writable");
  sqlite3_busy_timeout(raw, 5000);
  // The first access takes the lock: a database another process holds is busy.
  if (rc = sqlite3_exec(raw, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;", nullptr, nullptr,
                        nullptr);
      (rc & 0xff) == SQLITE_BUSY)
    return Status::Error(Code::kConflict,
                         "metadata database " + path + " is in use by another process",
                         "only one vmsnap-vault may serve a data directory: stop the other one "
                         "(see 'fuser " +
                             path + "')");
  if (rc != SQLITE_OK) return StepError(rc, "open " + path + ": " + sqlite3_errmsg(raw));
  return db;
}

Db::~Db() {
  if (db_) sqlite3_close_v2(db_);
}

Status Db::Exec(const std::string& sql) {
  char* err = nullptr;
  if (int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err); rc != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    return StepError(rc, msg);
  }
  return Status::Ok();
}

int64_t Db::Changes() const {
  return sqlite3_changes(db_);
}

Result<std::unique_ptr<DbStatement>> Db::Prepare(const std::string& sql) {
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v3(db_, sql.c_str(), -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr) !=
      SQLITE_OK)
    return Status::Internal("metadata database: " + std::string(sqlite3_errmsg(db_)) + " in " +
                            sql);
  return std::unique_ptr<DbStatement>(new DbStatement(db_, stmt));
}

DbStatement::~DbStatement() {
  sqlite3_finalize(stmt_);
}

void DbStatement::BindInt(int index, int64_t value) {
  sqlite3_bind_int64(stmt_, index, value);
}

void DbStatement::BindBlob(int index, const void* data, size_t size) {
  sqlite3_bind_blob(stmt_, index, data, static_cast<int>(size), SQLITE_TRANSIENT);
}

Result<bool> DbStatement::Step() {
  int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  std::string msg = sqlite3_errmsg(db_);
  sqlite3_reset(stmt_);
  return StepError(rc, msg);
}

int64_t DbStatement::ColumnInt(int column) const {
  return sqlite3_column_int64(stmt_, column);
}

std::string_view DbStatement::ColumnBlob(int column) const {
  const void* p = sqlite3_column_blob(stmt_, column);
  return {static_cast<const char*>(p), static_cast<size_t>(sqlite3_column_bytes(stmt_, column))};
}

void DbStatement::Reset() {
  sqlite3_reset(stmt_);
  sqlite3_clear_bindings(stmt_);
}

Result<std::vector<DbRow>> Db::Query(const std::string& sql, const std::vector<DbValue>& params) {
  sqlite3_stmt* stmt = nullptr;
  if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &stmt, nullptr) != SQLITE_OK)
    return Status::Internal("metadata database: " + std::string(sqlite3_errmsg(db_)) + " in " +
                            sql);
  std::unique_ptr<sqlite3_stmt, decltype(&sqlite3_finalize)> guard(stmt, &sqlite3_finalize);
  for (size_t i = 0; i < params.size(); ++i) {
    int idx = static_cast<int>(i + 1);
    if (auto p = std::get_if<int64_t>(&params[i]))
      sqlite3_bind_int64(stmt, idx, *p);
    else if (auto s = std::get_if<std::string>(&params[i]))
      sqlite3_bind_text(stmt, idx, s->data(), static_cast<int>(s->size()), SQLITE_TRANSIENT);
    else
      sqlite3_bind_null(stmt, idx);
  }
  std::vector<DbRow> rows;
  for (;;) {
    int rc = sqlite3_step(stmt);
    if (rc == SQLITE_DONE) break;
    if (rc != SQLITE_ROW) return StepError(rc, sqlite3_errmsg(db_));
    DbRow row;
    int n = sqlite3_column_count(stmt);
    for (int c = 0; c < n; ++c) {
      switch (sqlite3_column_type(stmt, c)) {
        case SQLITE_INTEGER:
          row.values.emplace_back(static_cast<int64_t>(sqlite3_column_int64(stmt, c)));
          break;
        case SQLITE_NULL:
          row.values.emplace_back(nullptr);
          break;
        default:
          row.values.emplace_back(
              std::string(reinterpret_cast<const char*>(sqlite3_column_text(stmt, c)),
                          static_cast<size_t>(sqlite3_column_bytes(stmt, c))));
      }
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace vmsnap::vault
