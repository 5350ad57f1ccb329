// VSS is a Windows facility: on Linux the factory and the disk-volume listing say so. The
// requester itself (platform/vss_requester.cpp) is compiled here too and tested with a fake.
#include "platform/vss.hpp"

namespace vmsnap::platform {

Result<std::unique_ptr<VssBackupComponents>> OpenSystemVss() {
  return Status::Unavailable("VSS is a Windows facility; this agent runs on Linux",
                             "use a Linux snapshot provider (auto, file, loop-reflink, lvm, "
                             "command) instead of vss")
      .InPhase("vss open");
}

Result<std::vector<VssDiskVolume>> VolumesOnDisk(const std::string& disk) {
  return Status::Unavailable(
             "cannot list the Windows volumes on " + disk + ": VSS is a Windows facility",
             "use a Linux snapshot provider instead of vss")
      .InPhase("vss volumes");
}

}  // namespace vmsnap::platform
