// Windows implementation of platform/quiesce.hpp.
//
// Windows has no filesystem freeze: application and file-system consistency come from VSS
// (platform/vss.hpp), so discovery finds nothing to freeze, FreezeSession::Start is
// kUnavailable and there is never a leftover freeze. What is real here: RunProcess
// (CreateProcessW in a Job object that is terminated at the timeout, output through pipes),
// CheckTrustedFile (owner and DACL of the file) and LockRuntimeDir (LockFileEx).
#include "platform/quiesce.hpp"

#include <windows.h>
// after windows.h
#include <aclapi.h>
#include <sddl.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "platform/windows/win_util.hpp"

namespace vmsnap::platform {
namespace fs = std::filesystem;
using win::FromWin32;
using win::Handle;
using win::Narrow;
using win::Widen;

int64_t MonotonicNowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ---------------------------------------------------------------------------------------------
// RunProcess

std::string ProcessOutcome::Describe() const {
  if (timed_out) return "timed out after " + std::to_string(duration_ms) + " ms (job terminated)";
  if (term_signal > 0) return "killed by signal " + std::to_string(term_signal);
  return "exit code " + std::to_string(exit_code);
}

namespace {

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string Extension(const std::string& path) {
  return Lower(Narrow(fs::path(Widen(path)).extension().wstring()));
}

// One argument quoted for CommandLineToArgvW / the MSVC runtime: backslashes are literal
// except before a quote, where they are doubled.
std::wstring QuoteArg(const std::wstring& arg) {
  if (!arg.empty() && arg.find_first_of(L" \t\n\v\"") == std::wstring::npos) return arg;
  std::wstring out = L"\"";
  size_t backslashes = 0;
  for (wchar_t c : arg) {
    if (c == L'\\') {
      ++backslashes;
      continue;
    }
    if (c == L'"')
      out.append(backslashes * 2 + 1, L'\\');
    else
      out.append(backslashes, L'\\');
    backslashes = 0;
    out.push_back(c);
  }
  out.append(backslashes * 2, L'\\');
  out.push_back(L'"');
  return out;
}

std::wstring SystemProgram(const wchar_t* env_var, const wchar_t* fallback) {
  wchar_t buf[MAX_PATH + 1] = {};
  DWORD n = ::GetEnvironmentVariableW(env_var, buf, MAX_PATH);
  if (n > 0 && n < MAX_PATH) return buf;
  return fallback;
}

// The program to start and its full command line: .exe/.com directly, .cmd/.bat through
// %ComSpec% /d /s /c, .ps1 through powershell -File.
struct CommandLine {
  std::wstring application;
  std::wstring line;
};

Result<CommandLine> BuildCommandLine(const ProcessSpec& spec) {
  const std::string ext = Extension(spec.path);
  const std::wstring program = Widen(spec.path);
  std::wstring args;
  for (const auto& a : spec.args) args += L" " + QuoteArg(Widen(a));
  if (ext == ".cmd" || ext == ".bat") {
    // cmd /s strips the outer quotes of what follows /c and runs the rest as typed.
    std::wstring comspec = SystemProgram(L"ComSpec", L"C:\\Windows\\System32\\cmd.exe");
    return CommandLine{comspec,
                       QuoteArg(comspec) + L" /d /s /c \"" + QuoteArg(program) + args + L"\""};
  }
  if (ext == ".ps1") {
    std::wstring root = SystemProgram(L"SystemRoot", L"C:\\Windows");
    std::wstring ps = root + L"\\System32\\WindowsPowerShell\\v1.0\\powershell.exe";
    return CommandLine{ps, QuoteArg(ps) +
                               L" -NoProfile -NonInteractive -ExecutionPolicy Bypass -File " +
                               QuoteArg(program) + args};
  }
  return CommandLine{program, QuoteArg(program) + args};
}

// The output of a child, collected by one reader thread per pipe.
struct OutputSink {
  std::mutex mu;
  std::string stdout_text;
  std::string output_tail;
  size_t tail_limit = 0;
  size_t stdout_limit = 0;

  void Add(const char* data, size_t n, bool is_stdout) {
    std::lock_guard<std::mutex> lock(mu);
    output_tail.append(data, n);
    if (output_tail.size() > tail_limit) output_tail.erase(0, output_tail.size() - tail_limit);
    if (is_stdout && stdout_text.size() < stdout_limit)
      stdout_text.append(data, std::min(n, stdout_limit - stdout_text.size()));
  }
};

void ReadPipe(HANDLE pipe, OutputSink* sink, bool is_stdout) {
  char buf[4096];
  for (;;) {
    DWORD got = 0;
    if (!::ReadFile(pipe, buf, sizeof buf, &got, nullptr) || got == 0) return;
    sink->Add(buf, got, is_stdout);
  }
}

// An anonymous pipe whose write end the child inherits.
Status MakePipe(Handle& read_end, Handle& write_end) {
  SECURITY_ATTRIBUTES sa{sizeof(SECURITY_ATTRIBUTES), nullptr, TRUE};
  HANDLE r = nullptr, w = nullptr;
  if (!::CreatePipe(&r, &w, &sa, 0)) return FromWin32(::GetLastError(), "create pipe");
  read_end.Reset(r);
  write_end.Reset(w);
  ::SetHandleInformation(r, HANDLE_FLAG_INHERIT, 0);
  return Status::Ok();
}

// Joins a reader thread on every path out of RunProcess.
struct JoinOnExit {
  std::thread t;
  ~JoinOnExit() {
    if (t.joinable()) t.join();
  }
};

}  // namespace

// The child runs in a Job object with JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE: at the timeout the
// whole job (the program and everything it started) is terminated; once the program has
// exited, whatever it left running in the background is terminated too (so the pipes close).
// Only the three standard handles are inherited (PROC_THREAD_ATTRIBUTE_HANDLE_LIST), so
// concurrent RunProcess calls do not leak pipes into each other's children.
Result<ProcessOutcome> RunProcess(const ProcessSpec& spec) {
  if (spec.path.empty()) return Status::InvalidArgument("no program given");
  auto cmd = BuildCommandLine(spec);
  if (!cmd.ok()) return cmd.take_status();

  Handle out_r, out_w, err_r, err_w;
  VMSNAP_RETURN_IF_ERROR(MakePipe(out_r, out_w));
  VMSNAP_RETURN_IF_ERROR(MakePipe(err_r, err_w));
  SECURITY_ATTRIBUTES inherit{sizeof(SECURITY_ATTRIBUTES), nullptr, TRUE};
  Handle null_in(::CreateFileW(L"NUL", GENERIC_READ, FILE_SHARE_READ | FILE_SHARE_WRITE, &inherit,
                               OPEN_EXISTING, 0, nullptr));
  if (!null_in.valid()) return FromWin32(::GetLastError(), "open NUL");

  Handle job(::CreateJobObjectW(nullptr, nullptr));
  if (!job.valid()) return FromWin32(::GetLastError(), "create job object");
  JOBOBJECT_EXTENDED_LIMIT_INFORMATION limits{};
  limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
  ::SetInformationJobObject(job.get(), JobObjectExtendedLimitInformation, &limits, sizeof limits);

  HANDLE inherited[3] = {null_in.get(), out_w.get(), err_w.get()};
  SIZE_T attr_size = 0;
  ::InitializeProcThreadAttributeList(nullptr, 1, 0, &attr_size);
  std::vector<char> attr_storage(attr_size);
  auto* attrs = reinterpret_cast<LPPROC_THREAD_ATTRIBUTE_LIST>(attr_storage.data());
  if (!::InitializeProcThreadAttributeList(attrs, 1, 0, &attr_size))
    return FromWin32(::GetLastError(), "initialize process attributes");
  struct AttrGuard {
    LPPROC_THREAD_ATTRIBUTE_LIST a;
    ~AttrGuard() { ::DeleteProcThreadAttributeList(a); }
  } attr_guard{attrs};
  if (!::UpdateProcThreadAttribute(attrs, 0, PROC_THREAD_ATTRIBUTE_HANDLE_LIST, inherited,
                                   sizeof inherited, nullptr, nullptr))
    return FromWin32(::GetLastError(), "set inherited handles");

  STARTUPINFOEXW si{};
  si.StartupInfo.cb = sizeof si;
  si.StartupInfo.dwFlags = STARTF_USESTDHANDLES;
  si.StartupInfo.hStdInput = null_in.get();
  si.StartupInfo.hStdOutput = out_w.get();
  si.StartupInfo.hStdError = err_w.get();
  si.lpAttributeList = attrs;
  PROCESS_INFORMATION pi{};
  std::wstring line = cmd->line;  // CreateProcessW may modify it
  const int64_t start_us = MonotonicNowUs();
  if (!::CreateProcessW(cmd->application.c_str(), line.data(), nullptr, nullptr, TRUE,
                        CREATE_SUSPENDED | CREATE_NO_WINDOW | EXTENDED_STARTUPINFO_PRESENT, nullptr,
                        nullptr, &si.StartupInfo, &pi)) {
    DWORD err = ::GetLastError();
    return FromWin32(err, "start " + spec.path,
                     "check that the file exists and is a program (.exe), a batch file "
                     "(.cmd, .bat) or a PowerShell script (.ps1)");
  }
  Handle process(pi.hProcess);
  Handle thread(pi.hThread);
  if (!::AssignProcessToJobObject(job.get(), process.get())) {
    DWORD err = ::GetLastError();
    ::TerminateProcess(process.get(), 1);
    return FromWin32(err, "put " + spec.path + " into a job object");
  }
  ::ResumeThread(thread.get());
  thread.Reset();
  out_w.Reset();  // the child holds the only write ends now
  err_w.Reset();
  null_in.Reset();

  OutputSink sink;
  sink.tail_limit = spec.output_tail_bytes;
  sink.stdout_limit = spec.stdout_limit_bytes;
  JoinOnExit out_reader{std::thread(ReadPipe, out_r.get(), &sink, true)};
  JoinOnExit err_reader{std::thread(ReadPipe, err_r.get(), &sink, false)};

  ProcessOutcome outcome;
  const DWORD wait_ms = static_cast<DWORD>(
      std::clamp<int64_t>(spec.timeout.count(), 0, static_cast<int64_t>(INFINITE - 1)));
  DWORD waited = ::WaitForSingleObject(process.get(), wait_ms);
  if (waited == WAIT_TIMEOUT) {
    outcome.timed_out = true;
    ::TerminateJobObject(job.get(), 1);
    ::WaitForSingleObject(process.get(), 5000);
  } else {
    DWORD code = 0;
    ::GetExitCodeProcess(process.get(), &code);
    outcome.exit_code = static_cast<int>(code);
    ::TerminateJobObject(job.get(), 1);  // background children: the pipes must close
  }
  outcome.duration_ms = (MonotonicNowUs() - start_us) / 1000;
  out_reader.t.join();
  err_reader.t.join();
  outcome.stdout_text = std::move(sink.stdout_text);
  outcome.output_tail = std::move(sink.output_tail);
  return outcome;
}

bool IsProgramFile(const std::string& path) {
  DWORD attrs = ::GetFileAttributesW(Widen(path).c_str());
  if (attrs == INVALID_FILE_ATTRIBUTES ||
      (attrs & (FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_DEVICE)))
    return false;
  const std::string ext = Extension(path);
  return ext == ".exe" || ext == ".com" || ext == ".cmd" || ext == ".bat" || ext == ".ps1";
}

// ---------------------------------------------------------------------------------------------
// CheckTrustedFile

namespace {

bool IsWellKnown(PSID sid, WELL_KNOWN_SID_TYPE type) {
  return sid != nullptr && ::IsValidSid(sid) && ::IsWellKnownSid(sid, type);
}

std::string SidText(PSID sid) {
  wchar_t* text = nullptr;
  if (sid == nullptr || !::ConvertSidToStringSidW(sid, &text)) return "an unknown account";
  std::string out = Narrow(text);
  ::LocalFree(text);
  return out;
}

constexpr DWORD kWriteRights = FILE_WRITE_DATA | FILE_APPEND_DATA | FILE_WRITE_EA |
                               FILE_WRITE_ATTRIBUTES | WRITE_DAC | WRITE_OWNER | DELETE |
                               GENERIC_WRITE | GENERIC_ALL;

}  // namespace

// Trusted: a regular file owned by SYSTEM or Administrators whose DACL grants no write right
// to Users, Everyone, Authenticated Users or Interactive (a null DACL grants everything).
Status CheckTrustedFile(const std::string& path, const std::string& what) {
  const std::string phase = "check " + what;
  const std::string fix = "icacls \"" + path + "\" /setowner *S-1-5-32-544 && icacls \"" + path +
                          "\" /inheritance:r /grant:r *S-1-5-18:F *S-1-5-32-544:F "
                          "*S-1-5-32-545:RX";
  const std::wstring wpath = Widen(path);
  DWORD attrs = ::GetFileAttributesW(wpath.c_str());
  if (attrs == INVALID_FILE_ATTRIBUTES)
    return FromWin32(::GetLastError(), what + " " + path).InPhase(phase);
  if (attrs & (FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_DEVICE))
    return Status::Error(Code::kPermissionDenied, what + " " + path + " is not a regular file",
                         "replace it with a regular file")
        .InPhase(phase);
  PSID owner = nullptr;
  PACL dacl = nullptr;
  PSECURITY_DESCRIPTOR sd = nullptr;
  DWORD rc = ::GetNamedSecurityInfoW(wpath.c_str(), SE_FILE_OBJECT,
                                     OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION, &owner,
                                     nullptr, &dacl, nullptr, &sd);
  if (rc != ERROR_SUCCESS)
    return FromWin32(rc, "read the owner and permissions of " + what + " " + path).InPhase(phase);
  struct SdGuard {
    PSECURITY_DESCRIPTOR sd;
    ~SdGuard() { ::LocalFree(sd); }
  } guard{sd};
  if (dacl == nullptr)
    return Status::Error(Code::kPermissionDenied,
                         what + " " + path +
                             " has no access control list (everyone may change it); refusing "
                             "to run or read it",
                         fix)
        .InPhase(phase);
  for (DWORD i = 0; i < dacl->AceCount; ++i) {
    void* raw = nullptr;
    if (!::GetAce(dacl, i, &raw)) continue;
    auto* header = static_cast<ACE_HEADER*>(raw);
    if (header->AceType != ACCESS_ALLOWED_ACE_TYPE) continue;
    if (header->AceFlags & INHERIT_ONLY_ACE) continue;
    auto* ace = static_cast<ACCESS_ALLOWED_ACE*>(raw);
    PSID sid = &ace->SidStart;
    const char* who = IsWellKnown(sid, WinBuiltinUsersSid)        ? "Users"
                      : IsWellKnown(sid, WinWorldSid)             ? "Everyone"
                      : IsWellKnown(sid, WinAuthenticatedUserSid) ? "Authenticated Users"
                      : IsWellKnown(sid, WinInteractiveSid)       ? "Interactive"
                                                                  : nullptr;
    if (who != nullptr && (ace->Mask & kWriteRights) != 0)
      return Status::Error(
                 Code::kPermissionDenied,
                 what + " " + path + " is writable by " + who + "; refusing to run or read it", fix)
          .InPhase(phase);
  }
  if (!IsWellKnown(owner, WinLocalSystemSid) && !IsWellKnown(owner, WinBuiltinAdministratorsSid))
    return Status::Error(Code::kPermissionDenied,
                         what + " " + path + " is owned by " + SidText(owner) +
                             ", not SYSTEM or Administrators; refusing to run or read it",
                         fix)
        .InPhase(phase);
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// Discovery and freezing: Windows uses VSS instead.

Result<std::vector<MountedFilesystem>> DiscoverFilesystems(const std::vector<std::string>& disks,
                                                           const DiscoveryOptions&) {
  for (const auto& disk : disks) {
    if (disk.rfind("\\\\.\\", 0) == 0 || disk.rfind("\\\\?\\GLOBALROOT\\", 0) == 0) continue;
    if (::GetFileAttributesW(Widen(disk).c_str()) == INVALID_FILE_ATTRIBUTES)
      return Status::NotFound("disk " + disk + " does not exist",
                              "pass the path of an existing disk or image file")
          .InPhase("discover filesystems");
  }
  return std::vector<MountedFilesystem>{};  // nothing is frozen on Windows (VSS instead)
}

std::vector<std::string> LoopDevicesBackedBy(const std::string&, const std::string&) {
  return {};
}

Result<std::string> LoopBackingFile(const std::string& loop_device, const std::string&) {
  return Status::NotFound(loop_device + " is not a loop device (Windows has none)");
}

Result<std::unique_ptr<FreezeSession>> FreezeSession::Start(const std::vector<MountedFilesystem>&,
                                                            const FreezeOptions&) {
  return Status::Unavailable("Windows uses VSS, not a filesystem freeze",
                             "use the VSS path of the consistency engine")
      .InPhase("freeze");
}

Result<LeftoverFreeze> RecoverLeftoverFreeze(const std::string& runtime_dir) {
  LeftoverFreeze out;  // there is never a filesystem freeze to undo on Windows
  out.marker_path = runtime_dir + "\\" + kFrozenMarkerName;
  return out;
}

// ---------------------------------------------------------------------------------------------
// RuntimeDirLock: LockFileEx on one byte far past the end of runtime_dir\agent.lock, so the
// holder's pid at the start of the file stays readable. Windows releases the lock when the
// handle is closed or the process ends.

namespace {
constexpr DWORD kLockOffsetHigh = 0x100;  // byte 2^40
}

RuntimeDirLock::RuntimeDirLock(RuntimeDirLock&& other) noexcept
    : handle_(std::exchange(other.handle_, -1)), why_not_(std::move(other.why_not_)) {}

RuntimeDirLock& RuntimeDirLock::operator=(RuntimeDirLock&& other) noexcept {
  if (this != &other) {
    if (handle_ != -1) ::CloseHandle(reinterpret_cast<HANDLE>(handle_));
    handle_ = std::exchange(other.handle_, -1);
    why_not_ = std::move(other.why_not_);
  }
  return *this;
}

RuntimeDirLock::~RuntimeDirLock() {
  if (handle_ != -1) ::CloseHandle(reinterpret_cast<HANDLE>(handle_));  // releases the lock
}

Result<RuntimeDirLock> LockRuntimeDir(const std::string& runtime_dir,
                                      std::chrono::milliseconds wait) {
  const char* phase = "lock runtime dir";
  RuntimeDirLock lock;
  std::error_code ec;
  fs::create_directories(fs::path(Widen(runtime_dir)), ec);
  if (ec && ec.value() == ERROR_ACCESS_DENIED) {
    lock.why_not_ = "cannot create " + runtime_dir + ": " + ec.message();
    return lock;
  }
  if (ec)
    return Status::IoError("create runtime dir " + runtime_dir + ": " + ec.message(),
                           "create the directory or configure another runtime dir")
        .InPhase(phase);
  const std::string path = runtime_dir + "\\agent.lock";
  Handle h(::CreateFileW(Widen(path).c_str(), GENERIC_READ | GENERIC_WRITE,
                         FILE_SHARE_READ | FILE_SHARE_WRITE, nullptr, OPEN_ALWAYS,
                         FILE_ATTRIBUTE_NORMAL, nullptr));
  if (!h.valid()) {
    DWORD err = ::GetLastError();
    if (err == ERROR_ACCESS_DENIED) {
      lock.why_not_ = "cannot open " + path + ": " + win::ErrorText(err);
      return lock;
    }
    return FromWin32(err, "open " + path).InPhase(phase);
  }
  const auto until = std::chrono::steady_clock::now() + wait;
  for (;;) {
    OVERLAPPED ov{};
    ov.OffsetHigh = kLockOffsetHigh;
    if (::LockFileEx(h.get(), LOCKFILE_EXCLUSIVE_LOCK | LOCKFILE_FAIL_IMMEDIATELY, 0, 1, 0, &ov))
      break;
    DWORD err = ::GetLastError();
    if (err != ERROR_LOCK_VIOLATION && err != ERROR_IO_PENDING)
      return FromWin32(err, "lock " + path).InPhase(phase);
    if (std::chrono::steady_clock::now() >= until) {
      std::string holder;
      std::ifstream in(fs::path(Widen(path)));
      std::getline(in, holder);
      return Status::Error(Code::kConflict,
                           "another vmsnap agent" +
                               (holder.empty() ? std::string() : " (pid " + holder + ")") +
                               " is taking a consistent snapshot with runtime dir " + runtime_dir +
                               " and did not finish within " + std::to_string(wait.count()) + " ms",
                           "wait for that backup to finish, or end that agent; a dead agent "
                           "releases the lock by itself")
          .InPhase(phase);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const std::string pid = std::to_string(::GetCurrentProcessId()) + "\n";
  FILE_END_OF_FILE_INFO eof{};
  if (::SetFileInformationByHandle(h.get(), FileEndOfFileInfo, &eof, sizeof eof)) {
    OVERLAPPED ov{};
    DWORD wrote = 0;
    (void)::WriteFile(h.get(), pid.data(), static_cast<DWORD>(pid.size()), &wrote, &ov);
  }
  lock.handle_ = reinterpret_cast<intptr_t>(h.Release());
  return lock;
}

}  // namespace vmsnap::platform
