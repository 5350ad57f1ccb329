// How the admin CLI (`vmsnap`) finds and authenticates to the vault: --vault URL --ca CAFILE
// (--token T | --token-file F), or --vault-config FILE, the DATA/vault.json the vault writes at
// start-up (url, ca_file, token_file). Without any of them, $VMSNAP_VAULT_CONFIG, then
// /var/lib/vmsnap-vault/vault.json, are tried.
#pragma once

#include <string>

#include "common/https_client.hpp"

namespace CLI {
class App;
}

namespace vmsnap::vault {

inline constexpr const char* kDefaultVaultConfig = "/var/lib/vmsnap-vault/vault.json";

struct AdminConnection {
  std::string vault, ca, token, token_file, vault_config;
  int retries = 3;
  int timeout_s = 60;

  void AddTo(CLI::App* app);
  Result<ClientOptions> Options() const;
};

}  // namespace vmsnap::vault
