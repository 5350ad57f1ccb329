// Running a long-lived command (the agent daemon) under the OS's service manager or as a
// console program, and delivering stop requests to it safely. Exactly one implementation is
// compiled: platform/linux/service.cpp or platform/windows/service.cpp.
//
//  - Linux: the process is a console program whether systemd started it or a shell did;
//    SIGTERM and SIGINT are stop requests (taken by a dedicated sigwait thread, never by an
//    async signal handler). Recovery after a crash is the unit's Restart=on-failure.
//  - Windows: started by the service control manager (SCM), the process registers as the
//    service `name`, reports START_PENDING, RUNNING, STOP_PENDING (with wait hints while the
//    body finishes at its next safe point) and STOPPED, and accepts STOP, SHUTDOWN and
//    PRESHUTDOWN as stop requests; recovery actions are set at the first start. Started from a
//    console instead, Ctrl-C, Ctrl-Break and closing the console are stop requests.
//
// The contract of a stop request: it only *requests* a stop. The body decides when stopping
// is safe (the agent never stops inside a snapshot or a freeze; it cancels its job at the next
// safe point), or says through on_stop that the process may end at once (idle).
//
// No OS header is included here. Functions return Status or Result where they can fail; none
// throws.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>

#include "common/status.hpp"

namespace vmsnap::platform {

// Set once when the OS asks the program to stop; never cleared. Thread-safe: RequestStop is
// called from the platform's own thread (signal thread, SCM handler, console handler), the
// other members from any thread.
class StopToken {
 public:
  StopToken() = default;
  StopToken(const StopToken&) = delete;
  StopToken& operator=(const StopToken&) = delete;

  bool stop_requested() const {
    std::lock_guard lock(mu_);
    return stopped_;
  }

  // Sleeps for `d` or until a stop is requested, whichever comes first. Returns true when the
  // whole time passed without a stop request.
  bool SleepFor(std::chrono::milliseconds d) const {
    std::unique_lock lock(mu_);
    return !cv_.wait_for(lock, d, [this] { return stopped_; });
  }

  // Idempotent. Wakes every SleepFor.
  void RequestStop() {
    {
      std::lock_guard lock(mu_);
      stopped_ = true;
    }
    cv_.notify_all();
  }

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  bool stopped_ = false;
};

// How the body was started.
enum class RunMode {
  kConsole,         // a shell, systemd (Type=simple), or a Windows console
  kServiceManager,  // the Windows service control manager
};

// What the body says when a stop is requested.
enum class StopResponse {
  kExitNow,          // nothing is in flight: the platform ends the process at once, exit code 0
  kStopAtSafePoint,  // work is in flight: the body returns from run once it reached a safe point
};

struct ServiceSpec {
  // The service's name in the service manager (Windows SCM); also used in log lines.
  std::string name;

  // The long-running body. Runs on the thread that called RunServiceOrConsole (console) or on
  // the SCM's service thread. Returns the process exit code: 0 is a clean stop; any other
  // value is a failure the service manager may answer with its recovery actions.
  std::function<int(StopToken& stop, RunMode mode)> run;

  // Called once, on the platform's thread, right after the token was set: it must return
  // quickly and never block (set flags, nothing more). kExitNow ends the process with exit
  // code 0 without waiting for run (under the SCM after reporting SERVICE_STOPPED); use it
  // only when nothing can be half-done. kStopAtSafePoint waits for run to return. Optional:
  // when empty, every stop waits for run.
  std::function<StopResponse()> on_stop;
};

// Runs spec.run under the service manager when the OS started the process as a service, else
// as a console program, delivering stop requests as described above. Returns run's exit code
// (or non-zero with a logged error when the service could not be registered).
// Must be called from the main thread before any other thread is started (Linux blocks
// SIGTERM/SIGINT for the whole process so that only the stop thread receives them).
int RunServiceOrConsole(const ServiceSpec& spec);

// Makes the service manager restart `name` after a failure, unless recovery actions were
// already set (so an operator's own settings are kept). Windows: restart after 10 s, 60 s,
// then 60 s for every later failure within a day, including a non-zero exit code (failure
// actions flag). Linux: nothing to do (the unit's Restart=on-failure); returns Ok.
// kNotFound when the service is not installed; kPermissionDenied without the rights.
Status ConfigureRecoveryActions(const std::string& name);

// After enrollment: when the service `name` is installed with a service manager, makes it
// start at boot and (re)starts it so it reads the new configuration. Returns a one-line note
// for the user: what was done, or (when that failed) the exact command to run. Returns an
// empty string when there is no service manager or the service is not installed; the caller
// then tells the user how to start the daemon by hand.
std::string EnableAndRestartService(const std::string& name);

// This process's id (for markers naming the process that runs a job).
int CurrentProcessId();

}  // namespace vmsnap::platform
