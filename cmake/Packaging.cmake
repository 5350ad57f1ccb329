# Debian packages (issue 7): `vmsnap-agent` and `vmsnap-vault`, built by CPack DEB from the
# install components "agent" and "vault". Build them with ./scripts/package.sh (see
# docs/PACKAGING.md). Included at the end of the root CMakeLists.txt.
#
# The targets' own install() rules (agent/, vault/, cmake/*.cmake) have no component; they land
# in "Unspecified", which no package contains. The rules below install the same targets again,
# each into its package's component.

if(NOT VMSNAP_PLATFORM STREQUAL "linux")
  return()
endif()

set(VMSNAP_PACKAGE_VERSION "${PROJECT_VERSION}" CACHE STRING
    "Version of the Debian packages (default: the CMake project version)")
if(NOT VMSNAP_PACKAGE_VERSION MATCHES "^[0-9][A-Za-z0-9.+~]*$")
  message(FATAL_ERROR "VMSNAP_PACKAGE_VERSION '${VMSNAP_PACKAGE_VERSION}' is not a valid Debian "
                      "native version. Fix: use digits, dots, '+' or '~', e.g. 0.1.1")
endif()

set(_inst ${PROJECT_SOURCE_DIR}/installer)
set(_gen ${PROJECT_BINARY_DIR}/packaging)
file(MAKE_DIRECTORY ${_gen})

# --- agent ----------------------------------------------------------------------------------
install(TARGETS vmsnap-agent RUNTIME DESTINATION bin COMPONENT agent)
install(TARGETS vmsnap-freeze-guard RUNTIME DESTINATION libexec/vmsnap COMPONENT agent)
install(FILES ${_inst}/systemd/vmsnap-agent.service DESTINATION /lib/systemd/system
        COMPONENT agent)
# A sample hook, executable so it can be copied as is; skipped by the agent (*.sample).
install(PROGRAMS ${_inst}/hooks.d/README.sample DESTINATION /etc/vmsnap/hooks.d COMPONENT agent)

# --- vault ----------------------------------------------------------------------------------
install(TARGETS vmsnap-vault vmsnap RUNTIME DESTINATION bin COMPONENT vault)
install(FILES ${_inst}/systemd/vmsnap-vault.service DESTINATION /lib/systemd/system
        COMPONENT vault)
install(FILES ${_inst}/default/vmsnap-vault DESTINATION /etc/default COMPONENT vault)

# --- per-package documentation (copyright, changelog.gz: Debian policy 12.5 and 12.7) --------
foreach(_comp agent vault)
  set(_pkg vmsnap-${_comp})
  set(_doc ${_gen}/${_pkg}/doc)
  file(MAKE_DIRECTORY ${_doc})
  configure_file(${_inst}/debian/changelog.in ${_doc}/changelog @ONLY)
  # Reproducible (gzip -n: no name, no time stamp) and rebuilt when the version changes.
  add_custom_command(OUTPUT ${_doc}/changelog.gz
                     COMMAND gzip -n -9 -c ${_doc}/changelog > ${_doc}/changelog.gz
                     DEPENDS ${_doc}/changelog VERBATIM)
  add_custom_target(vmsnap_${_comp}_changelog ALL DEPENDS ${_doc}/changelog.gz)
  install(FILES ${_inst}/debian/copyright ${_doc}/changelog.gz
          DESTINATION share/doc/${_pkg} COMPONENT ${_comp})
  # Maintainer scripts and conffiles: control members of the .deb.
  set(_ctl)
  foreach(_script postinst prerm postrm)
    if(EXISTS ${_inst}/debian/${_pkg}.${_script})
      configure_file(${_inst}/debian/${_pkg}.${_script} ${_gen}/${_pkg}/${_script} COPYONLY)
      list(APPEND _ctl ${_gen}/${_pkg}/${_script})
    endif()
  endforeach()
  configure_file(${_inst}/debian/${_pkg}.conffiles ${_gen}/${_pkg}/conffiles COPYONLY)
  list(APPEND _ctl ${_gen}/${_pkg}/conffiles)
  string(TOUPPER ${_comp} _COMP)
  set(CPACK_DEBIAN_${_COMP}_PACKAGE_CONTROL_EXTRA "${_ctl}")
endforeach()

# --- CPack ----------------------------------------------------------------------------------
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME vmsnap)
set(CPACK_PACKAGE_VENDOR "vmsnap")
set(CPACK_PACKAGE_VERSION "${VMSNAP_PACKAGE_VERSION}")
set(CPACK_PACKAGE_CONTACT "vmsnap maintainers <vmsnap@example.org>")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)
set(CPACK_PACKAGE_DIRECTORY ${PROJECT_BINARY_DIR})
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_COMPONENTS_ALL agent vault)
set(CPACK_COMPONENTS_GROUPING IGNORE)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_HOMEPAGE "https://example.org/vmsnap")
# Depends on shared libraries are computed by dpkg-shlibdeps from the binaries (libc6,
# libstdc++6, libssl3, libzstd1, libxxhash0, libspdlog1.10, libfmt9, libsqlite3-0, libfuse3-3,
# whatever they really link), plus the tools the maintainer scripts and binaries run.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS OFF)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)

set(CPACK_DEBIAN_AGENT_PACKAGE_NAME vmsnap-agent)
# flock (util-linux) and pidof (sysvinit-utils), used by prerm, are Essential on Debian 12.
set(CPACK_DEBIAN_AGENT_PACKAGE_RECOMMENDS "e2fsprogs")
set(CPACK_COMPONENT_AGENT_DESCRIPTION
"in-guest VM backup agent for a vmsnap vault
vmsnap-agent runs inside a virtual machine, reads its disks, finds the
blocks that changed since the last backup and sends only those over
verified TLS to a vmsnap vault. Before reading it runs the hooks in
/etc/vmsnap/hooks.d and freezes the filesystems through
vmsnap-freeze-guard, which always thaws them.

The systemd unit vmsnap-agent.service is installed but not enabled:
enroll the agent with `vmsnap-agent enroll`, then enable the service.")

set(CPACK_DEBIAN_VAULT_PACKAGE_NAME vmsnap-vault)
# adduser: postinst creates the system user; fuse3: `vmsnap mount` for non-root users.
set(CPACK_DEBIAN_VAULT_PACKAGE_DEPENDS "adduser")
set(CPACK_DEBIAN_VAULT_PACKAGE_RECOMMENDS "fuse3")
set(CPACK_COMPONENT_VAULT_DESCRIPTION
"vmsnap backup vault server and admin CLI
vmsnap-vault keeps the recovery points (first full, then incremental)
that vmsnap agents send over HTTPS, and runs the control plane: agent
enrollment, policies, schedules and jobs. The vmsnap command is the
admin CLI (enrollment tokens, VMs, policies, backups, jobs, mounting
recovery points).

The service vmsnap-vault.service runs as the system user vmsnap-vault
with its data in /var/lib/vmsnap-vault; /etc/default/vmsnap-vault sets
the listen address.")

include(CPack)

# --- test -----------------------------------------------------------------------------------
if(BUILD_TESTING)
  add_test(NAME packaging COMMAND ${PROJECT_SOURCE_DIR}/tests/packaging_test.sh)
  set_tests_properties(packaging PROPERTIES TIMEOUT 1200 RUN_SERIAL ON)
endif()
