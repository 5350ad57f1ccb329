// The agent daemon (`vmsnap-agent run`) and enrollment (`vmsnap-agent enroll`), issue 4.
//
// The daemon makes outbound connections only: it long-polls the control plane for work (which
// doubles as its heartbeat), runs one job at a time, posts progress (learning about
// cancellation from the answer) and a final result. Results are written to
// STATE_DIR/results/<job>.json before they are sent and deleted only once the vault
// acknowledged them, so a lost connection or a vault restart never loses one; the vault
// counts a re-sent result once. A lost connection is retried with backoff (1 s to 30 s).
// `run` runs under the OS's service manager or as a console program (platform/service.hpp). A
// stop request (SIGTERM/SIGINT; on Windows the SCM's STOP/SHUTDOWN or Ctrl-C) while idle exits
// at once; during a job the job is cancelled at its next safe point (never inside a freeze or
// a shadow copy: the consistency engine thaws first), reported, and the daemon exits. Started
// by the Windows SCM before enrollment, `run` waits for the config instead of failing.
#pragma once

#include <memory>

namespace CLI {
class App;
}

namespace vmsnap::agent {

// Adds `enroll` and `run` to the agent's command line. After parsing, if Handles() is true,
// main returns Execute().
class DaemonCommands {
 public:
  static std::unique_ptr<DaemonCommands> Add(CLI::App& app);
  virtual ~DaemonCommands() = default;
  virtual bool Handles() const = 0;
  virtual int Execute() = 0;
};

}  // namespace vmsnap::agent
