// A one-file FUSE filesystem for tests: a disk whose device fails to read a range.
//
//   vmsnap-test-eio-fs IMAGE CONTROL MOUNTPOINT
//
// Mounts (in the foreground, until unmounted or sent SIGTERM) a read-only directory holding
// "disk.img", a file with the bytes and size of IMAGE. While the file CONTROL exists and holds
// "OFFSET LENGTH", every read that touches [OFFSET, OFFSET + LENGTH) of disk.img fails with EIO,
// as the kernel reports a failing disk's sectors; without it every read succeeds. CONTROL is
// read at each read, so a test turns the failure on and off while the mount stays. Reads bypass
// the page cache (direct_io): every read comes here.
#define FUSE_USE_VERSION 31
#include <fcntl.h>
#include <fuse.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

namespace {

int image_fd = -1;
off_t image_size = 0;
std::string control_path;

bool InFailingRange(off_t offset, size_t size) {
  std::ifstream control(control_path);
  uint64_t bad_offset = 0, bad_length = 0;
  if (!(control >> bad_offset >> bad_length)) return false;
  const uint64_t begin = static_cast<uint64_t>(offset), end = begin + size;
  return begin < bad_offset + bad_length && bad_offset < end;
}

int GetAttr(const char* path, struct stat* st, struct fuse_file_info*) {
  std::memset(st, 0, sizeof *st);
  if (std::strcmp(path, "/") == 0) {
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = 2;
    return 0;
  }
  if (std::strcmp(path, "/disk.img") == 0) {
    st->st_mode = S_IFREG | 0444;
    st->st_nlink = 1;
    st->st_size = image_size;
    return 0;
  }
  return -ENOENT;
}

int ReadDir(const char* path, void* buf, fuse_fill_dir_t fill, off_t, struct fuse_file_info*,
            enum fuse_readdir_flags) {
  if (std::strcmp(path, "/") != 0) return -ENOENT;
  fill(buf, ".", nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
  fill(buf, "..", nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
  fill(buf, "disk.img", nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
  return 0;
}

int Open(const char* path, struct fuse_file_info* fi) {
  if (std::strcmp(path, "/disk.img") != 0) return -ENOENT;
  if ((fi->flags & O_ACCMODE) != O_RDONLY) return -EACCES;
  fi->direct_io = 1;
  return 0;
}

int Read(const char*, char* buf, size_t size, off_t offset, struct fuse_file_info*) {
  if (InFailingRange(offset, size)) return -EIO;
  ssize_t n = ::pread(image_fd, buf, size, offset);
  return n < 0 ? -errno : static_cast<int>(n);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s IMAGE CONTROL MOUNTPOINT\n", argv[0]);
    return 2;
  }
  image_fd = ::open(argv[1], O_RDONLY | O_CLOEXEC);
  struct stat st {};
  if (image_fd < 0 || ::fstat(image_fd, &st) != 0) {
    std::fprintf(stderr, "open %s: %s\n", argv[1], std::strerror(errno));
    return 1;
  }
  image_size = st.st_size;
  control_path = argv[2];
  struct fuse_operations ops {};
  ops.getattr = GetAttr;
  ops.readdir = ReadDir;
  ops.open = Open;
  ops.read = Read;
  char ro[] = "-oro,fsname=vmsnap-test-eio";
  char foreground[] = "-f";
  char* args[] = {argv[0], foreground, ro, argv[3], nullptr};
  return fuse_main(4, args, &ops, nullptr);
}
