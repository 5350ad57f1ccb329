// vmsnap-freeze-guard: freezes filesystems for the agent and always thaws them.
//
//   vmsnap-freeze-guard (--deadline-at-us T | --deadline-ms N) [--only-under DIR]... -- MP...
//
// Started by the agent (platform/linux/quiesce.cpp) before the freeze with stdin = a pipe
// from the agent and stdout = a pipe to the agent. It opens every mount point first, then a
// worker thread issues FIFREEZE in the given order (deepest first, "/" last). EBUSY and
// EOPNOTSUPP are recorded as "not frozen"; any other error thaws everything frozen so far.
// The main thread never enters an ioctl that can block on a freeze: it watches the clock,
// the agent's pipe and signals with poll(), and thaws (FITHAW, reverse order) when
//   - the agent writes "thaw",            - the agent's pipe closes (the agent died),
//   - SIGTERM, SIGINT or SIGHUP arrives,  - the deadline passes,
// even while the worker is blocked inside FIFREEZE (a filesystem the worker freezes after the
// thaw started is thawed by the worker at once).
//
// Output: JSON lines on stdout only (events "refused", "open_failed", "fs", "freeze_failed",
// "frozen", "thawing", "thaw", "thawed"), with monotonic-clock microseconds. Nothing is ever
// written to a file: a frozen filesystem must not be written while frozen. Writes to the pipe
// are non-blocking; the guard never waits for the agent to read.
//
// Safety: with --only-under or the environment variable VMSNAP_FREEZE_ONLY_UNDER, every
// mount point must be strictly below one of those directories, and "/" is refused.
// Exit status: 0 all thawed, 1 some thaw failed, 2 bad usage or refused, 3 open failed.
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

namespace {

using json = nlohmann::json;

int64_t NowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Pending output for the agent; flushed without ever blocking.
class Outbox {
 public:
  void Add(const json& event) {
    std::lock_guard lock(mu_);
    pending_ += event.dump() + "\n";
  }
  bool HasPending() {
    std::lock_guard lock(mu_);
    return !pending_.empty() && !agent_gone_;
  }
  void Flush() {
    std::lock_guard lock(mu_);
    while (!pending_.empty() && !agent_gone_) {
      ssize_t n = ::write(STDOUT_FILENO, pending_.data(), pending_.size());
      if (n > 0) {
        pending_.erase(0, static_cast<size_t>(n));
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else if (n < 0 && errno == EAGAIN) {
        return;  // the agent is not reading: keep it for later, never block
      } else {
        agent_gone_ = true;  // EPIPE: nobody listens any more
        pending_.clear();
      }
    }
  }

 private:
  std::mutex mu_;
  std::string pending_;
  bool agent_gone_ = false;
};

struct Shared {
  std::mutex mu;
  bool stop = false;  // the main thread started thawing
  bool worker_done = false;
  std::string fatal;         // a freeze error that is not EBUSY/EOPNOTSUPP
  std::vector<bool> frozen;  // frozen by the worker and not yet thawed
};

std::string Canonical(const std::string& p) {
  std::error_code ec;
  auto c = std::filesystem::weakly_canonical(p, ec);
  return ec ? p : c.string();
}

bool Below(const std::string& path, const std::string& dir) {
  return path.size() > dir.size() + 1 && path.compare(0, dir.size(), dir) == 0 &&
         path[dir.size()] == '/';
}

}  // namespace

int main(int argc, char** argv) {
  Outbox out;
  ::signal(SIGPIPE, SIG_IGN);
  // Block the thaw signals in every thread (the worker inherits the mask); the main thread
  // receives them through a signalfd.
  sigset_t sigs;
  sigemptyset(&sigs);
  for (int s : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&sigs, s);
  ::pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  int sigfd = ::signalfd(-1, &sigs, SFD_CLOEXEC | SFD_NONBLOCK);
  int flags = ::fcntl(STDOUT_FILENO, F_GETFL);
  if (flags >= 0) ::fcntl(STDOUT_FILENO, F_SETFL, flags | O_NONBLOCK);

  int64_t deadline_us = 0;
  std::vector<std::string> only_under, mount_points;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--deadline-at-us" && i + 1 < argc) {
      deadline_us = std::strtoll(argv[++i], nullptr, 10);
    } else if (a == "--deadline-ms" && i + 1 < argc) {
      deadline_us = NowUs() + std::strtoll(argv[++i], nullptr, 10) * 1000;
    } else if (a == "--only-under" && i + 1 < argc) {
      only_under.push_back(argv[++i]);
    } else if (a == "--") {
      for (++i; i < argc; ++i) mount_points.push_back(argv[i]);
    } else {
      out.Add({{"event", "refused"}, {"error", "usage: unknown argument " + a}});
      out.Flush();
      return 2;
    }
  }
  if (deadline_us <= 0 || mount_points.empty() || deadline_us > NowUs() + 61'000'000) {
    out.Add({{"event", "refused"},
             {"error",
              "usage: a deadline of at most 60 s and at least one mount point are "
              "required"}});
    out.Flush();
    return 2;
  }
  if (const char* env = std::getenv("VMSNAP_FREEZE_ONLY_UNDER")) {
    std::string cur;
    for (const char* p = env;; ++p) {
      if (*p == ':' || *p == 0) {
        if (!cur.empty()) only_under.push_back(cur);
        cur.clear();
        if (*p == 0) break;
      } else {
        cur.push_back(*p);
      }
    }
  }
  if (!only_under.empty()) {
    for (const auto& mp : mount_points) {
      std::string c = Canonical(mp);
      bool ok = c != "/";
      if (ok) {
        ok = false;
        for (const auto& d : only_under) {
          std::string dc = Canonical(d);
          if (dc != "/" && !dc.empty() && Below(c, dc)) ok = true;
        }
      }
      if (!ok) {
        out.Add({{"event", "refused"},
                 {"error", "refusing to freeze " + c +
                               ": not below an allowed directory (safety restriction)"}});
        out.Flush();
        return 2;
      }
    }
  }

  // Open everything before freezing anything: opening may need a lookup on a filesystem that
  // is about to be frozen.
  std::vector<int> fds;
  for (const auto& mp : mount_points) {
    int fd = ::open(mp.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
      out.Add({{"event", "open_failed"}, {"error", "open " + mp + ": " + std::strerror(errno)}});
      out.Flush();
      return 3;
    }
    fds.push_back(fd);
  }

  int wake[2];
  if (::pipe2(wake, O_CLOEXEC | O_NONBLOCK) != 0) return 3;
  Shared shared;
  shared.frozen.assign(fds.size(), false);
  auto notify = [&] { (void)!::write(wake[1], "x", 1); };

  std::thread worker([&] {
    for (size_t i = 0; i < fds.size(); ++i) {
      {
        std::lock_guard lock(shared.mu);
        if (shared.stop) break;
      }
      int rc = ::ioctl(fds[i], FIFREEZE, 0);
      int err = errno;
      int64_t at = NowUs();
      std::lock_guard lock(shared.mu);
      json ev = {{"event", "fs"}, {"index", i}, {"mount_point", mount_points[i]}, {"at_us", at}};
      if (rc == 0) {
        ev["frozen"] = true;
        out.Add(ev);
        if (shared.stop) {  // the thaw already started while this FIFREEZE was blocked
          int trc = ::ioctl(fds[i], FITHAW, 0);
          int terr = errno;
          out.Add({{"event", "thaw"},
                   {"index", i},
                   {"ok", trc == 0},
                   {"at_us", NowUs()},
                   {"error", trc == 0 ? "" : std::string("FITHAW: ") + std::strerror(terr)}});
          notify();
          break;
        }
        shared.frozen[i] = true;
      } else if (err == EBUSY || err == EOPNOTSUPP) {
        ev["frozen"] = false;
        ev["why_not"] = err == EBUSY ? "busy (EBUSY: already frozen or being changed)"
                                     : "freezing not supported (EOPNOTSUPP)";
        out.Add(ev);
      } else {
        ev["frozen"] = false;
        ev["why_not"] = std::string("FIFREEZE failed: ") + std::strerror(err);
        out.Add(ev);
        shared.fatal = "FIFREEZE " + mount_points[i] + ": " + std::strerror(err);
        out.Add({{"event", "freeze_failed"}, {"error", shared.fatal + "; thawing all"}});
        break;
      }
      notify();
    }
    std::lock_guard lock(shared.mu);
    shared.worker_done = true;
    if (shared.fatal.empty() && !shared.stop) out.Add({{"event", "frozen"}});
    notify();
  });

  std::string reason;
  bool thawed = false, all_ok = true;
  bool stdin_open = true;
  std::string input;
  for (;;) {
    out.Flush();
    {
      std::lock_guard lock(shared.mu);
      if (reason.empty() && !shared.fatal.empty()) reason = "freeze error";
      if (thawed && shared.worker_done) break;
    }
    if (!reason.empty() && !thawed) {
      out.Add({{"event", "thawing"}, {"reason", reason}});
      std::vector<size_t> to_thaw;
      {
        std::lock_guard lock(shared.mu);
        shared.stop = true;
        for (size_t i = 0; i < fds.size(); ++i)
          if (shared.frozen[i]) to_thaw.push_back(i);
        shared.frozen.assign(fds.size(), false);
      }
      for (auto it = to_thaw.rbegin(); it != to_thaw.rend(); ++it) {
        int rc = ::ioctl(fds[*it], FITHAW, 0);
        int err = errno;
        if (rc != 0) all_ok = false;
        out.Add({{"event", "thaw"},
                 {"index", *it},
                 {"ok", rc == 0},
                 {"at_us", NowUs()},
                 {"error", rc == 0 ? "" : std::string("FITHAW: ") + std::strerror(err)}});
      }
      out.Add({{"event", "thawed"}, {"ok", all_ok}, {"reason", reason}});
      thawed = true;
      continue;
    }
    int timeout_ms = 100;  // after the thaw: waiting for a worker still inside FIFREEZE
    if (!thawed) {
      int64_t left = deadline_us - NowUs();
      if (left <= 0) {
        reason = "deadline";
        continue;
      }
      timeout_ms = static_cast<int>(left / 1000 + 1);
    }
    struct pollfd p[4];
    nfds_t n = 0;
    p[n++] = {wake[0], POLLIN, 0};
    p[n++] = {sigfd, POLLIN, 0};
    int stdout_i = -1, stdin_i = -1;
    if (out.HasPending()) {
      stdout_i = static_cast<int>(n);
      p[n++] = {STDOUT_FILENO, POLLOUT, 0};
    }
    if (stdin_open) {
      stdin_i = static_cast<int>(n);
      p[n++] = {STDIN_FILENO, POLLIN, 0};
    }
    if (stdout_i >= 0 && timeout_ms > 50) timeout_ms = 50;
    int r = ::poll(p, n, timeout_ms);
    if (r <= 0) continue;
    if (p[0].revents) {
      char b[64];
      while (::read(wake[0], b, sizeof b) > 0) {
      }
    }
    if (p[1].revents) {
      struct signalfd_siginfo si;
      if (::read(sigfd, &si, sizeof si) == sizeof si && reason.empty())
        reason = "signal " + std::to_string(si.ssi_signo);
    }
    if (stdin_i >= 0 && p[stdin_i].revents) {
      char b[256];
      ssize_t got = ::read(STDIN_FILENO, b, sizeof b);
      if (got > 0) {
        input.append(b, static_cast<size_t>(got));
        if (input.find("thaw") != std::string::npos && reason.empty()) reason = "agent asked";
      } else if (got == 0 || errno != EINTR) {
        stdin_open = false;
        if (reason.empty()) reason = "agent pipe closed";
      }
    }
  }
  worker.join();
  out.Flush();
  for (int fd : fds) ::close(fd);
  return all_ok ? 0 : 1;
}
