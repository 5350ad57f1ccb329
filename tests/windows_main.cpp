// main() of windows_tests.exe: the doctest runner, plus child modes the RunProcess tests start
// as a real Windows program (this same executable):
//   windows_tests.exe --child-echo CODE ARG...   prints ARGs (one per line) on stdout, "err" on
//                                                stderr, exits with CODE
//   windows_tests.exe --child-sleep MS [--spawn-sleeper FILE]
//                                                optionally starts a grandchild (itself with
//                                                --child-sleep) and writes the grandchild's pid
//                                                to FILE, then sleeps MS milliseconds
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <windows.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

namespace {

int ChildEcho(int argc, char** argv) {
  for (int i = 3; i < argc; ++i) std::printf("%s\n", argv[i]);
  std::fflush(stdout);
  std::fprintf(stderr, "err\n");
  return std::atoi(argv[2]);
}

int ChildSleep(int argc, char** argv) {
  if (argc >= 5 && std::strcmp(argv[3], "--spawn-sleeper") == 0) {
    wchar_t self[MAX_PATH] = {};
    ::GetModuleFileNameW(nullptr, self, MAX_PATH);
    std::wstring line = L"\"" + std::wstring(self) + L"\" --child-sleep 60000";
    STARTUPINFOW si{};
    si.cb = sizeof si;
    PROCESS_INFORMATION pi{};
    if (!::CreateProcessW(self, line.data(), nullptr, nullptr, FALSE, 0, nullptr, nullptr, &si,
                          &pi))
      return 90;
    std::ofstream(argv[4]) << pi.dwProcessId << "\n";
    ::CloseHandle(pi.hThread);
    ::CloseHandle(pi.hProcess);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(argv[2])));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::strcmp(argv[1], "--child-echo") == 0) return ChildEcho(argc, argv);
  if (argc >= 3 && std::strcmp(argv[1], "--child-sleep") == 0) return ChildSleep(argc, argv);
  doctest::Context context(argc, argv);
  return context.run();
}
