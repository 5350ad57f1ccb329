// Linux: the daemon is a console program, whether systemd (Type=simple) or a shell started it.
// SIGTERM and SIGINT are blocked in every thread and taken by one sigwait thread, which turns
// them into stop requests; no async-signal-safety concerns arise in the body.
#include "platform/service.hpp"

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

extern char** environ;

namespace vmsnap::platform {

int RunServiceOrConsole(const ServiceSpec& spec) {
  // Block the stop signals before any other thread starts, so every thread inherits the mask
  // and only the sigwait thread below ever receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // Shared with the detached stop thread, which may still wait in sigwait when the body has
  // returned: once `body_done` is set (under `mu`) on_stop is never called again.
  struct Shared {
    StopToken token;
    std::function<StopResponse()> on_stop;
    std::mutex mu;
    bool body_done = false;
  };
  auto shared = std::make_shared<Shared>();
  shared->on_stop = spec.on_stop;
  std::thread([shared, signals] {
    int sig = 0;
    if (sigwait(&signals, &sig) != 0) return;
    shared->token.RequestStop();
    std::lock_guard lock(shared->mu);
    if (shared->body_done || !shared->on_stop) return;
    if (shared->on_stop() == StopResponse::kExitNow) std::_Exit(0);
    // Further signals stay blocked and pending: the body is already stopping.
  }).detach();
  int rc = spec.run(shared->token, RunMode::kConsole);
  std::lock_guard lock(shared->mu);
  shared->body_done = true;
  return rc;
}

Status ConfigureRecoveryActions(const std::string& /*name*/) {
  // systemd restarts the daemon after a failure (Restart=on-failure in the unit).
  return Status::Ok();
}

namespace {

// Runs /bin/systemctl ARGS... and reports whether it exited 0. Output goes to our stderr.
bool Systemctl(const std::vector<std::string>& args) {
  std::vector<std::string> argv_storage = {"systemctl"};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, "/bin/systemctl", nullptr, nullptr, argv.data(), environ) != 0)
    return false;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return false;
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

}  // namespace

std::string EnableAndRestartService(const std::string& name) {
  std::error_code ec;
  if (!std::filesystem::exists("/run/systemd/system", ec)) return "";
  const std::string unit = name + ".service";
  bool enabled = Systemctl({"enable", unit});
  bool restarted = Systemctl({"restart", unit});
  return enabled && restarted
             ? unit + " enabled and (re)started"
             : "could not enable " + unit + "; run: systemctl enable --now " + name;
}

int CurrentProcessId() {
  return static_cast<int>(::getpid());
}

}  // namespace vmsnap::platform
