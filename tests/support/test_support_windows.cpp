// The Windows build of the test helpers in test_support.hpp that the Windows test executable
// uses (windows_tests.exe, run under Wine): temporary directories, disk image files, file
// contents. The process and vault helpers are Linux-only: the Windows end-to-end test drives
// vmsnap-agent.exe from scripts/windows-test.sh against a Linux vault instead.
#include <windows.h>
// after windows.h
#include <winioctl.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

#include "common/block_codec.hpp"
#include "tests/support/test_support.hpp"

namespace vmsnap::test {
namespace fs = std::filesystem;

namespace {
std::wstring Wide(const std::string& utf8) {
  std::u8string u8(utf8.begin(), utf8.end());
  return fs::path(u8).wstring();
}
std::string Utf8(const fs::path& p) {
  auto u8 = p.u8string();
  return std::string(u8.begin(), u8.end());
}

struct FileHandle {
  HANDLE h;
  ~FileHandle() {
    if (h != INVALID_HANDLE_VALUE) ::CloseHandle(h);
  }
};
}  // namespace

TempDir::TempDir() {
  std::random_device rd;
  for (int attempt = 0; attempt < 100; ++attempt) {
    fs::path p = fs::temp_directory_path() / ("vmsnap-test-" + std::to_string(rd()));
    std::error_code ec;
    if (fs::create_directory(p, ec)) {
      path_ = Utf8(p);
      return;
    }
  }
  throw std::runtime_error("cannot create a temporary directory");
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(fs::path(Wide(path_)), ec);
}

std::string ReadWhole(const std::string& path) {
  std::ifstream in(fs::path(Wide(path)), std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Sparse where the filesystem allows it (FSCTL_SET_SPARSE), then extended to `size`.
void CreateSparseFile(const std::string& path, uint64_t size) {
  FileHandle f{::CreateFileW(Wide(path).c_str(), GENERIC_READ | GENERIC_WRITE, 0, nullptr,
                             CREATE_ALWAYS, FILE_ATTRIBUTE_NORMAL, nullptr)};
  if (f.h == INVALID_HANDLE_VALUE) throw std::runtime_error("create " + path);
  DWORD ignored = 0;
  (void)::DeviceIoControl(f.h, FSCTL_SET_SPARSE, nullptr, 0, nullptr, 0, &ignored, nullptr);
  LARGE_INTEGER end;
  end.QuadPart = static_cast<LONGLONG>(size);
  if (!::SetFilePointerEx(f.h, end, nullptr, FILE_BEGIN) || !::SetEndOfFile(f.h))
    throw std::runtime_error("size " + path);
}

void WriteRandomBlocks(const std::string& path, uint64_t block_size,
                       const std::vector<uint64_t>& indexes, uint64_t seed) {
  FileHandle f{::CreateFileW(Wide(path).c_str(), GENERIC_WRITE, FILE_SHARE_READ, nullptr,
                             OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, nullptr)};
  if (f.h == INVALID_HANDLE_VALUE) throw std::runtime_error("open " + path);
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> buf(block_size / 8);
  for (uint64_t idx : indexes) {
    for (auto& w : buf) w = rng();
    OVERLAPPED ov{};
    const uint64_t offset = idx * block_size;
    ov.Offset = static_cast<DWORD>(offset & 0xffffffffu);
    ov.OffsetHigh = static_cast<DWORD>(offset >> 32);
    DWORD wrote = 0;
    if (!::WriteFile(f.h, buf.data(), static_cast<DWORD>(block_size), &wrote, &ov) ||
        wrote != block_size)
      throw std::runtime_error("write " + path);
  }
}

std::string FileSha256(const std::string& path) {
  return Sha256Hex(ReadWhole(path));
}

bool InCi() {
  const char* ci = std::getenv("CI");
  return ci && std::string(ci) == "true";
}

}  // namespace vmsnap::test
