// platform/service.hpp on Linux: the stop token, and RunServiceOrConsole in a child process that
// receives real SIGTERM/SIGINT (the daemon's stop path, without a vault).
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "platform/service.hpp"

namespace {

using namespace std::chrono_literals;
using vmsnap::platform::RunMode;
using vmsnap::platform::RunServiceOrConsole;
using vmsnap::platform::ServiceSpec;
using vmsnap::platform::StopResponse;
using vmsnap::platform::StopToken;

struct ChildResult {
  int exit_code = -1;  // -1: did not exit normally
  std::string output;  // what the child wrote to its pipe
  std::chrono::milliseconds after_signal{0};
};

// Forks a child that runs `spec` through RunServiceOrConsole and exits with its result. The
// body writes to fd `out` (the child's end of a pipe); "ready" first. Sends `sig` once ready.
template <class MakeSpec>
ChildResult RunChild(int sig, MakeSpec make_spec) {
  int fds[2];
  REQUIRE(pipe(fds) == 0);
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    close(fds[0]);
    ServiceSpec spec = make_spec(fds[1]);
    _exit(RunServiceOrConsole(spec));
  }
  close(fds[1]);
  ChildResult r;
  char buf[256];
  while (r.output.find("ready") == std::string::npos) {
    ssize_t n = read(fds[0], buf, sizeof buf);
    if (n <= 0) break;
    r.output.append(buf, static_cast<size_t>(n));
  }
  auto signalled = std::chrono::steady_clock::now();
  kill(pid, sig);
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;)
    r.output.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  r.after_signal = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - signalled);
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  return r;
}

void Say(int fd, const char* text) {
  ssize_t ignored = write(fd, text, strlen(text));
  (void)ignored;
}

}  // namespace

TEST_CASE("StopToken: SleepFor runs its time without a stop, and a stop wakes it at once") {
  StopToken token;
  CHECK_FALSE(token.stop_requested());
  auto t0 = std::chrono::steady_clock::now();
  CHECK(token.SleepFor(50ms));
  CHECK(std::chrono::steady_clock::now() - t0 >= 50ms);

  std::thread stopper([&] {
    std::this_thread::sleep_for(100ms);
    token.RequestStop();
  });
  t0 = std::chrono::steady_clock::now();
  CHECK_FALSE(token.SleepFor(60s));
  CHECK(std::chrono::steady_clock::now() - t0 < 10s);
  stopper.join();
  CHECK(token.stop_requested());
  CHECK_FALSE(token.SleepFor(1h));  // stays set
  token.RequestStop();              // idempotent
  CHECK(token.stop_requested());
}

TEST_CASE("Linux: SIGTERM while idle ends the process at once with exit code 0") {
  ChildResult r = RunChild(SIGTERM, [](int out) {
    ServiceSpec spec;
    spec.name = "vmsnap-test";
    spec.run = [out](StopToken&, RunMode mode) {
      Say(out, mode == RunMode::kConsole ? "console ready\n" : "scm ready\n");
      for (;;) std::this_thread::sleep_for(1s);  // never returns by itself
      return 3;
    };
    spec.on_stop = [] { return StopResponse::kExitNow; };
    return spec;
  });
  INFO(r.output);
  CHECK(r.output.find("console ready") != std::string::npos);
  CHECK(r.exit_code == 0);
  CHECK(r.after_signal < 10s);
}

TEST_CASE("Linux: SIGINT during work: the body sees the stop and returns its own exit code") {
  ChildResult r = RunChild(SIGINT, [](int out) {
    ServiceSpec spec;
    spec.name = "vmsnap-test";
    spec.run = [out](StopToken& stop, RunMode) {
      Say(out, "ready\n");
      while (stop.SleepFor(20ms)) {
      }
      std::this_thread::sleep_for(200ms);  // reaching the safe point
      Say(out, "stopped at a safe point\n");
      return 42;
    };
    spec.on_stop = [out] {
      Say(out, "on_stop\n");
      return StopResponse::kStopAtSafePoint;
    };
    return spec;
  });
  INFO(r.output);
  CHECK(r.output.find("on_stop") != std::string::npos);
  CHECK(r.output.find("stopped at a safe point") != std::string::npos);
  CHECK(r.exit_code == 42);
}

TEST_CASE("Linux: without on_stop a stop request waits for the body") {
  ChildResult r = RunChild(SIGTERM, [](int out) {
    ServiceSpec spec;
    spec.name = "vmsnap-test";
    spec.run = [out](StopToken& stop, RunMode) {
      Say(out, "ready\n");
      while (stop.SleepFor(20ms)) {
      }
      Say(out, "body done\n");
      return 0;
    };
    return spec;
  });
  INFO(r.output);
  CHECK(r.output.find("body done") != std::string::npos);
  CHECK(r.exit_code == 0);
}

TEST_CASE("Linux: recovery actions are the unit's business; the process id is ours") {
  CHECK(vmsnap::platform::ConfigureRecoveryActions("vmsnap-agent").ok());
  CHECK(vmsnap::platform::CurrentProcessId() == static_cast<int>(getpid()));
}
