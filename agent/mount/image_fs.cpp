#define FUSE_USE_VERSION 312
#include "agent/mount/image_fs.hpp"

#include <fuse3/fuse.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <thread>
#include <vector>

#include "agent/mount/system.hpp"

namespace vmsnap::mount {

namespace {
constexpr const char* kStatsName = "stats.json";
}

class ImageFilesystem::Impl {
 public:
  Impl(RecoveryPointImages& images, std::string dir) : images_(images), dir_(std::move(dir)) {}
  ~Impl() { (void)Unmount(); }

  Status Start() {
    ops_.getattr = &Impl::GetAttr;
    ops_.readdir = &Impl::ReadDir;
    ops_.open = &Impl::Open;
    ops_.read = &Impl::Read;
    ops_.release = &Impl::Release;
    ops_.init = &Impl::Init;
    std::vector<std::string> argv_s{"vmsnap", "-o",
                                    "ro,default_permissions,fsname=vmsnap,subtype=vmsnap"};
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
    fuse_ = fuse_new(&args, &ops_, sizeof ops_, this);
    fuse_opt_free_args(&args);
    if (!fuse_)
      return Status::Internal("libfuse refused the options (fuse_new failed)")
          .InPhase("start image filesystem");
    if (fuse_mount(fuse_, dir_.c_str()) != 0) {
      fuse_destroy(fuse_);
      fuse_ = nullptr;
      return Status::IoError("cannot mount the FUSE image filesystem on " + dir_,
                             "run as root on a machine with /dev/fuse (Debian package fuse3)")
          .InPhase("start image filesystem");
    }
    mounted_ = true;
    loop_ = std::thread([this] {
      fuse_loop_config* cfg = fuse_loop_cfg_create();
      fuse_loop_cfg_set_max_threads(cfg, 16);
      int rc = fuse_loop_mt(fuse_, cfg);
      fuse_loop_cfg_destroy(cfg);
      if (rc != 0) spdlog::debug("FUSE loop for {} ended with {}", dir_, rc);
    });
    return Status::Ok();
  }

  Status Unmount() {
    if (!fuse_) return Status::Ok();
    fuse_exit(fuse_);
    // MNT_FORCE aborts the FUSE connection: every worker blocked on /dev/fuse returns.
    Status st = mounted_ ? sys::ForceUnmountFuse(dir_) : Status::Ok();
    if (loop_.joinable()) loop_.join();
    if (mounted_) fuse_unmount(fuse_);  // closes the device fd; no-op on an aborted connection
    mounted_ = false;
    fuse_destroy(fuse_);
    fuse_ = nullptr;
    return st;
  }

  const std::string& dir() const { return dir_; }

 private:
  static Impl* Self() { return static_cast<Impl*>(fuse_get_context()->private_data); }

  static void* Init(fuse_conn_info*, fuse_config* cfg) {
    cfg->kernel_cache = 1;  // the images never change
    cfg->attr_timeout = 3600;
    cfg->entry_timeout = 3600;
    return fuse_get_context()->private_data;
  }

  // Position in images().disks() for "/disk<N>.img", or -1.
  int DiskFor(const char* path) const {
    const auto& disks = images_.disks();
    for (size_t i = 0; i < disks.size(); ++i)
      if (path[0] == '/' && ImageName(disks[i].index) == path + 1) return static_cast<int>(i);
    return -1;
  }

  static int GetAttr(const char* path, struct stat* st, fuse_file_info*) {
    Impl* self = Self();
    std::memset(st, 0, sizeof *st);
    st->st_uid = 0;
    st->st_gid = 0;
    if (std::strcmp(path, "/") == 0) {
      st->st_mode = S_IFDIR | 0555;
      st->st_nlink = 2;
      return 0;
    }
    if (std::strcmp(path, "/stats.json") == 0) {
      st->st_mode = S_IFREG | 0444;
      st->st_nlink = 1;
      st->st_size = 0;  // generated at open; read with direct I/O
      return 0;
    }
    int d = self->DiskFor(path);
    if (d < 0) return -ENOENT;
    st->st_mode = S_IFREG | 0444;
    st->st_nlink = 1;
    st->st_size = static_cast<off_t>(self->images_.disks()[d].size_bytes);
    st->st_blksize = self->images_.disks()[d].block_size;
    st->st_blocks = (st->st_size + 511) / 512;
    return 0;
  }

  static int ReadDir(const char* path, void* buf, fuse_fill_dir_t fill, off_t, fuse_file_info*,
                     fuse_readdir_flags) {
    if (std::strcmp(path, "/") != 0) return -ENOENT;
    Impl* self = Self();
    fill(buf, ".", nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
    fill(buf, "..", nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
    for (const auto& d : self->images_.disks())
      fill(buf, ImageName(d.index).c_str(), nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
    fill(buf, kStatsName, nullptr, 0, static_cast<fuse_fill_dir_flags>(0));
    return 0;
  }

  static int Open(const char* path, fuse_file_info* fi) {
    if ((fi->flags & O_ACCMODE) != O_RDONLY) return -EROFS;
    Impl* self = Self();
    if (std::strcmp(path, "/stats.json") == 0) {
      auto* text = new std::string(self->images_.StatsJson().dump(2) + "\n");
      fi->fh = reinterpret_cast<uint64_t>(text);
      fi->direct_io = 1;
      return 0;
    }
    if (self->DiskFor(path) < 0) return -ENOENT;
    fi->fh = 0;
    fi->keep_cache = 1;
    return 0;
  }

  static int Release(const char*, fuse_file_info* fi) {
    delete reinterpret_cast<std::string*>(fi->fh);  // stats snapshot; 0 for disk images
    fi->fh = 0;
    return 0;
  }

  static int Read(const char* path, char* buf, size_t size, off_t off, fuse_file_info* fi) {
    Impl* self = Self();
    if (fi->fh != 0) {
      const std::string& text = *reinterpret_cast<std::string*>(fi->fh);
      if (off < 0 || static_cast<size_t>(off) >= text.size()) return 0;
      size_t n = std::min(size, text.size() - static_cast<size_t>(off));
      std::memcpy(buf, text.data() + off, n);
      return static_cast<int>(n);
    }
    int d = self->DiskFor(path);
    if (d < 0) return -ENOENT;
    auto n = self->images_.Read(static_cast<size_t>(d), static_cast<uint64_t>(off),
                                std::span(reinterpret_cast<std::byte*>(buf), size));
    if (!n.ok()) return -EIO;  // RecoveryPointImages logged the cause
    return static_cast<int>(*n);
  }

  RecoveryPointImages& images_;
  std::string dir_;
  fuse_operations ops_{};
  fuse* fuse_ = nullptr;
  bool mounted_ = false;
  std::thread loop_;
};

Result<std::unique_ptr<ImageFilesystem>> ImageFilesystem::Mount(RecoveryPointImages& images,
                                                                const std::string& dir) {
  auto impl = std::make_unique<Impl>(images, dir);
  VMSNAP_RETURN_IF_ERROR(impl->Start());
  return std::unique_ptr<ImageFilesystem>(new ImageFilesystem(std::move(impl)));
}

ImageFilesystem::ImageFilesystem(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ImageFilesystem::~ImageFilesystem() = default;

Status ImageFilesystem::Unmount() {
  return impl_->Unmount();
}

const std::string& ImageFilesystem::dir() const {
  return impl_->dir();
}

std::string ImageFilesystem::ImageName(uint32_t disk_index) {
  return "disk" + std::to_string(disk_index) + ".img";
}

}  // namespace vmsnap::mount
