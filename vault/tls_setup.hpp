// First-start TLS material of the vault: a private CA and a server certificate signed by it.
//
// Layout under DATA/tls: ca.pem (the CA certificate agents pin), ca.key (0600), server.pem,
// server.key (0600). Created once; later starts reuse them. The server certificate covers
// 127.0.0.1, ::1, localhost, the machine's host name and the listen address.
#pragma once

#include <string>
#include <vector>

#include "common/status.hpp"

namespace vmsnap::vault {

struct TlsMaterial {
  std::string ca_cert_file;
  std::string server_cert_file;
  std::string server_key_file;
  std::string ca_fingerprint_sha256;  // hex with colons, of the CA certificate's DER
  bool created = false;               // true if this call generated them
};

Result<TlsMaterial> EnsureTls(const std::string& data_dir, const std::vector<std::string>& names);

// SHA-256 fingerprint (AA:BB:...) of the first certificate in a PEM file.
Result<std::string> CertificateFingerprint(const std::string& pem_file);

}  // namespace vmsnap::vault
