// Windows: the same vmsnap-agent.exe runs as the service `vmsnap-agent` under the service
// control manager (SCM) or as a console program.
//
// Under the SCM: StartServiceCtrlDispatcherW (main thread) runs ServiceMain on a thread of its
// own; ServiceMain registers the control handler, sets the recovery actions the first time,
// reports RUNNING and runs the body. STOP, SHUTDOWN and PRESHUTDOWN set the stop token and ask
// spec.on_stop: kExitNow reports STOPPED and ends the process; kStopAtSafePoint reports
// STOP_PENDING, and a heartbeat thread keeps advancing the checkpoint (wait hint 30 s) until
// the body returns, so the SCM does not give up on a job that is reaching its safe point.
// Started from a console, StartServiceCtrlDispatcherW fails with
// ERROR_FAILED_SERVICE_CONTROLLER_CONNECT and the body runs on the main thread with a console
// control handler (Ctrl-C, Ctrl-Break, closing the console, logoff, shutdown). The dispatcher
// is only tried when services.exe (the SCM) started this process: Wine's
// StartServiceCtrlDispatcherW does not fail in a console program, it connects to another
// service's control pipe and blocks for ever.
#include "platform/service.hpp"

#include <windows.h>  // first: tlhelp32.h and winsvc.h need it
//
#include <spdlog/spdlog.h>
#include <tlhelp32.h>
#include <winsvc.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <iterator>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "platform/windows/win_util.hpp"

namespace vmsnap::platform {

namespace {

using win::Widen;

// Owns an SC_HANDLE (SCM or service); closes it on destruction.
struct ScHandleCloser {
  void operator()(SC_HANDLE h) const {
    if (h != nullptr) ::CloseServiceHandle(h);
  }
};
using ScHandle = std::unique_ptr<std::remove_pointer_t<SC_HANDLE>, ScHandleCloser>;

constexpr DWORD kStopWaitHintMs = 30000;   // what we promise the SCM per checkpoint
constexpr DWORD kStopHeartbeatMs = 10000;  // how often the checkpoint advances

// State shared by the SCM's threads (dispatcher/handler, ServiceMain) or the console handler
// thread, and the body. Allocated once and never freed: the OS may call the handlers until
// the process ends, and they have no context parameter (console) or must outlive any body.
struct RunState {
  const ServiceSpec* spec = nullptr;
  std::wstring name;
  StopToken token;
  std::mutex mu;                    // guards everything below
  std::condition_variable changed;  // stop requested or body done
  bool stop_handled = false;        // on_stop was called
  bool stopping = false;            // on_stop said kStopAtSafePoint
  bool body_done = false;
  int exit_code = 0;
  // Under the SCM only.
  SERVICE_STATUS_HANDLE status_handle = nullptr;
  SERVICE_STATUS status{};
};

RunState* g_state = nullptr;

// Reports a status to the SCM; state.mu must be held.
void ReportLocked(RunState& s, DWORD state, DWORD wait_hint_ms = 0) {
  s.status.dwServiceType = SERVICE_WIN32_OWN_PROCESS;
  s.status.dwCurrentState = state;
  s.status.dwControlsAccepted =
      state == SERVICE_RUNNING
          ? SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN | SERVICE_ACCEPT_PRESHUTDOWN
          : 0;
  s.status.dwWaitHint = wait_hint_ms;
  if (state == SERVICE_RUNNING || state == SERVICE_STOPPED)
    s.status.dwCheckPoint = 0;
  else
    ++s.status.dwCheckPoint;
  if (state == SERVICE_STOPPED) {
    s.status.dwWin32ExitCode = s.exit_code == 0 ? NO_ERROR : ERROR_SERVICE_SPECIFIC_ERROR;
    s.status.dwServiceSpecificExitCode = static_cast<DWORD>(s.exit_code);
  } else {
    s.status.dwWin32ExitCode = NO_ERROR;
    s.status.dwServiceSpecificExitCode = 0;
  }
  if (!::SetServiceStatus(s.status_handle, &s.status))
    spdlog::warn("cannot report the service state to the SCM: {}", win::ErrorText(GetLastError()));
}

// A stop request from any source (SCM handler or console handler thread). Sets the token and
// calls on_stop once, under the lock (it must not block). kExitNow ends the process here.
void HandleStopRequest(RunState& s) {
  s.token.RequestStop();
  std::lock_guard lock(s.mu);
  if (s.body_done || s.stop_handled) return;
  s.stop_handled = true;
  StopResponse response = s.spec->on_stop ? s.spec->on_stop() : StopResponse::kStopAtSafePoint;
  if (response == StopResponse::kExitNow) {
    if (s.status_handle != nullptr) {
      s.exit_code = 0;
      ReportLocked(s, SERVICE_STOPPED);
    }
    std::_Exit(0);
  }
  s.stopping = true;
  if (s.status_handle != nullptr) ReportLocked(s, SERVICE_STOP_PENDING, kStopWaitHintMs);
  s.changed.notify_all();
}

DWORD WINAPI ServiceControlHandler(DWORD control, DWORD /*event_type*/, LPVOID /*event_data*/,
                                   LPVOID context) {
  auto& s = *static_cast<RunState*>(context);
  switch (control) {
    case SERVICE_CONTROL_STOP:
    case SERVICE_CONTROL_SHUTDOWN:
    case SERVICE_CONTROL_PRESHUTDOWN:
      HandleStopRequest(s);
      return NO_ERROR;
    case SERVICE_CONTROL_INTERROGATE:
      return NO_ERROR;
    default:
      return ERROR_CALL_NOT_IMPLEMENTED;
  }
}

void WINAPI ServiceMain(DWORD /*argc*/, LPWSTR* /*argv*/) {
  RunState& s = *g_state;
  SERVICE_STATUS_HANDLE handle =
      ::RegisterServiceCtrlHandlerExW(s.name.c_str(), ServiceControlHandler, &s);
  if (handle == nullptr) {
    spdlog::error("cannot register the control handler of service {}: {}", s.spec->name,
                  win::ErrorText(GetLastError()));
    s.exit_code = 1;
    return;
  }
  {
    std::lock_guard lock(s.mu);
    s.status_handle = handle;
    ReportLocked(s, SERVICE_START_PENDING, 10000);
  }
  if (Status st = ConfigureRecoveryActions(s.spec->name); !st.ok())
    spdlog::warn("recovery actions of service {} not set: {}", s.spec->name, st.ToString());
  {
    std::lock_guard lock(s.mu);
    if (!s.stop_handled) ReportLocked(s, SERVICE_RUNNING);
  }
  // Keeps the SCM waiting while a job reaches its safe point after a stop request.
  std::thread heartbeat([&s] {
    std::unique_lock lock(s.mu);
    s.changed.wait(lock, [&s] { return s.stopping || s.body_done; });
    while (!s.body_done) {
      if (s.changed.wait_for(lock, std::chrono::milliseconds(kStopHeartbeatMs),
                             [&s] { return s.body_done; }))
        break;
      ReportLocked(s, SERVICE_STOP_PENDING, kStopWaitHintMs);
    }
  });
  int rc = s.spec->run(s.token, RunMode::kServiceManager);
  {
    std::lock_guard lock(s.mu);
    s.body_done = true;
    s.exit_code = rc;
    s.changed.notify_all();
  }
  heartbeat.join();
  std::lock_guard lock(s.mu);
  ReportLocked(s, SERVICE_STOPPED);  // after this the dispatcher returns on the main thread
}

BOOL WINAPI ConsoleControlHandler(DWORD type) {
  RunState& s = *g_state;
  switch (type) {
    case CTRL_C_EVENT:
    case CTRL_BREAK_EVENT:
      HandleStopRequest(s);
      return TRUE;  // handled: the process keeps running until the body returns
    case CTRL_CLOSE_EVENT:
    case CTRL_LOGOFF_EVENT:
    case CTRL_SHUTDOWN_EVENT: {
      // The OS ends the process when this handler returns (or after its own timeout), so
      // wait here for the body to reach its safe point.
      HandleStopRequest(s);
      std::unique_lock lock(s.mu);
      s.changed.wait(lock, [&s] { return s.body_done; });
      return TRUE;
    }
    default:
      return FALSE;
  }
}

// True when this process's parent is services.exe, i.e. the SCM started it as a service.
// Unknown (snapshot failure) counts as true: the dispatcher then decides.
bool StartedByServiceManager() {
  win::Handle snapshot(::CreateToolhelp32Snapshot(TH32CS_SNAPPROCESS, 0));
  if (!snapshot.valid()) return true;
  const DWORD self = ::GetCurrentProcessId();
  DWORD parent = 0;
  std::vector<PROCESSENTRY32W> processes;
  PROCESSENTRY32W entry{};
  entry.dwSize = sizeof(entry);
  for (BOOL ok = ::Process32FirstW(snapshot.get(), &entry); ok;
       ok = ::Process32NextW(snapshot.get(), &entry)) {
    processes.push_back(entry);
    if (entry.th32ProcessID == self) parent = entry.th32ParentProcessID;
  }
  if (processes.empty()) return true;
  for (const auto& p : processes)
    if (p.th32ProcessID == parent) return ::lstrcmpiW(p.szExeFile, L"services.exe") == 0;
  return false;  // the parent is gone: not the SCM, which lives as long as the system
}

Status ScError(DWORD error, const std::string& what) {
  switch (error) {
    case ERROR_SERVICE_DOES_NOT_EXIST:
      return Status::NotFound(what + ": the service is not installed",
                              "install vmsnap-agent.msi (msiexec /i vmsnap-agent.msi)");
    case ERROR_ACCESS_DENIED:
      return Status::Error(Code::kPermissionDenied, what + ": " + win::ErrorText(error),
                           "run as an administrator (an elevated prompt) or as LocalSystem");
    default:
      return win::FromWin32(error, what);
  }
}

}  // namespace

int RunServiceOrConsole(const ServiceSpec& spec) {
  g_state = new RunState();  // never freed: see RunState
  g_state->spec = &spec;
  g_state->name = Widen(spec.name);
  if (StartedByServiceManager()) {
    SERVICE_TABLE_ENTRYW table[] = {{g_state->name.data(), ServiceMain}, {nullptr, nullptr}};
    if (::StartServiceCtrlDispatcherW(table)) {
      // ServiceMain ran and reported STOPPED.
      std::lock_guard lock(g_state->mu);
      return g_state->exit_code;
    }
    DWORD error = GetLastError();
    if (error != ERROR_FAILED_SERVICE_CONTROLLER_CONNECT) {
      spdlog::error("cannot connect to the service control manager: {}", win::ErrorText(error));
      return 1;
    }
  }
  // Not started by the SCM: a console program.
  if (!::SetConsoleCtrlHandler(ConsoleControlHandler, TRUE))
    spdlog::warn("cannot install the Ctrl-C handler: {}", win::ErrorText(GetLastError()));
  int rc = spec.run(g_state->token, RunMode::kConsole);
  std::lock_guard lock(g_state->mu);
  g_state->body_done = true;
  g_state->exit_code = rc;
  g_state->changed.notify_all();
  return rc;
}

Status ConfigureRecoveryActions(const std::string& name) {
  const std::string what = "set the recovery actions of service " + name;
  ScHandle scm(::OpenSCManagerW(nullptr, nullptr, SC_MANAGER_CONNECT));
  if (!scm) return ScError(GetLastError(), what);
  // SC_ACTION_RESTART needs SERVICE_START on the service.
  ScHandle service(::OpenServiceW(scm.get(), Widen(name).c_str(),
                                  SERVICE_QUERY_CONFIG | SERVICE_CHANGE_CONFIG | SERVICE_START));
  if (!service) return ScError(GetLastError(), what);
  DWORD needed = 0;
  ::QueryServiceConfig2W(service.get(), SERVICE_CONFIG_FAILURE_ACTIONS, nullptr, 0, &needed);
  if (needed > 0) {
    std::vector<BYTE> buf(needed);
    if (!::QueryServiceConfig2W(service.get(), SERVICE_CONFIG_FAILURE_ACTIONS, buf.data(), needed,
                                &needed))
      return ScError(GetLastError(), what);
    auto* current = reinterpret_cast<SERVICE_FAILURE_ACTIONSW*>(buf.data());
    if (current->cActions > 0) return Status::Ok();  // set before (by us or an operator)
  }
  // Restart after 10 s, then after 60 s for every later failure; the count resets after a day
  // without failures.
  SC_ACTION actions[] = {
      {SC_ACTION_RESTART, 10000}, {SC_ACTION_RESTART, 60000}, {SC_ACTION_RESTART, 60000}};
  SERVICE_FAILURE_ACTIONSW failure{};
  failure.dwResetPeriod = 24 * 60 * 60;
  failure.cActions = static_cast<DWORD>(std::size(actions));
  failure.lpsaActions = actions;
  if (!::ChangeServiceConfig2W(service.get(), SERVICE_CONFIG_FAILURE_ACTIONS, &failure))
    return ScError(GetLastError(), what);
  // Also when the service stops itself with a non-zero exit code, not only on a crash.
  SERVICE_FAILURE_ACTIONS_FLAG flag{};
  flag.fFailureActionsOnNonCrashFailures = TRUE;
  if (!::ChangeServiceConfig2W(service.get(), SERVICE_CONFIG_FAILURE_ACTIONS_FLAG, &flag))
    return ScError(GetLastError(), what);
  spdlog::info("recovery actions of service {} set: restart after 10 s, then after 60 s", name);
  return Status::Ok();
}

std::string EnableAndRestartService(const std::string& name) {
  const std::string manual = "sc config " + name + " start= auto && sc stop " + name +
                             " & sc start " + name + " (from an elevated prompt)";
  ScHandle scm(::OpenSCManagerW(nullptr, nullptr, SC_MANAGER_CONNECT));
  if (!scm) return "";  // no service manager to talk to
  ScHandle service(
      ::OpenServiceW(scm.get(), Widen(name).c_str(),
                     SERVICE_CHANGE_CONFIG | SERVICE_START | SERVICE_STOP | SERVICE_QUERY_STATUS));
  if (!service) {
    DWORD error = GetLastError();
    if (error == ERROR_SERVICE_DOES_NOT_EXIST) return "";  // not installed from the MSI
    return "could not open the " + name + " service (" + win::ErrorText(error) +
           "); run: " + manual;
  }
  if (!::ChangeServiceConfigW(service.get(), SERVICE_NO_CHANGE, SERVICE_AUTO_START,
                              SERVICE_NO_CHANGE, nullptr, nullptr, nullptr, nullptr, nullptr,
                              nullptr, nullptr))
    return "could not set the " + name + " service to start automatically (" +
           win::ErrorText(GetLastError()) + "); run: " + manual;
  // Restart so the service reads the new config (a running one may be waiting for it, or use
  // an old credential). An idle agent stops at once; one in a job stops at its safe point.
  SERVICE_STATUS status{};
  if (::QueryServiceStatus(service.get(), &status) && status.dwCurrentState != SERVICE_STOPPED) {
    if (status.dwCurrentState != SERVICE_STOP_PENDING)
      ::ControlService(service.get(), SERVICE_CONTROL_STOP, &status);
    for (int i = 0; i < 600 && ::QueryServiceStatus(service.get(), &status) &&
                    status.dwCurrentState != SERVICE_STOPPED;
         ++i)
      ::Sleep(500);
    if (status.dwCurrentState != SERVICE_STOPPED)
      return "the " + name +
             " service did not stop within 5 minutes to read the new config; run: " + manual;
  }
  if (!::StartServiceW(service.get(), 0, nullptr)) {
    DWORD error = GetLastError();
    if (error != ERROR_SERVICE_ALREADY_RUNNING)
      return "could not start the " + name + " service (" + win::ErrorText(error) +
             "); run: " + manual;
  }
  return "service " + name + " set to start automatically and (re)started";
}

int CurrentProcessId() {
  return static_cast<int>(::GetCurrentProcessId());
}

}  // namespace vmsnap::platform
