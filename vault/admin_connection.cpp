#include "vault/admin_connection.hpp"

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "platform/env.hpp"

namespace vmsnap::vault {

using nlohmann::json;

void AdminConnection::AddTo(CLI::App* app) {
  auto* v = app->add_option("--vault", vault, "Vault URL, https://HOST:PORT");
  app->add_option("--ca", ca, "CA certificate of the vault (PEM)");
  auto* t = app->add_option("--token", token, "Admin access token");
  auto* tf = app->add_option("--token-file", token_file, "File holding the admin token");
  t->excludes(tf);
  auto* vc = app->add_option("--vault-config", vault_config,
                             "The vault's DATA/vault.json (url, ca_file, token_file)");
  vc->excludes(v);
  app->add_option("--retries", retries, "Attempts per request on transient errors")
      ->capture_default_str()
      ->check(CLI::Range(1, 100));
  app->add_option("--timeout", timeout_s, "Seconds to wait for each network step")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600));
}

Result<ClientOptions> AdminConnection::Options() const {
  auto* env = platform::Env::Default();
  ClientOptions o;
  o.url = vault;
  o.ca_file = ca;
  o.token = token;
  o.max_attempts = retries;
  o.io_timeout = std::chrono::seconds(timeout_s);
  std::string tfile = token_file;
  std::string config = vault_config;
  if (config.empty() && vault.empty()) {
    const char* from_env = std::getenv("VMSNAP_VAULT_CONFIG");
    config = from_env && *from_env ? from_env : kDefaultVaultConfig;
  }
  if (!config.empty()) {
    auto text = env->ReadFile(config);
    if (!text.ok())
      return Status::InvalidArgument(
                 "no vault connection: cannot read " + config + " (" + text.status().cause() + ")",
                 "pass --vault-config DATA/vault.json, or --vault URL --ca CAFILE --token-file F")
          .InPhase("read vault config");
    json j = json::parse(*text, nullptr, false);
    if (!j.is_object() || !j.contains("url"))
      return Status::InvalidArgument(config + " is not a vault.json",
                                     "pass the vault's DATA/vault.json")
          .InPhase("read vault config");
    o.url = j.value("url", "");
    if (o.ca_file.empty()) o.ca_file = j.value("ca_file", "");
    if (o.token.empty() && tfile.empty()) tfile = j.value("token_file", "");
  }
  if (o.url.empty() || o.ca_file.empty())
    return Status::InvalidArgument("no vault connection given",
                                   "pass --vault URL --ca CAFILE --token-file F, or --vault-config "
                                   "DATA/vault.json")
        .InPhase("connect to vault");
  if (!tfile.empty()) {
    auto t = env->ReadFile(tfile);
    if (!t.ok()) return std::move(t.take_status()).InPhase("read token file");
    o.token = *t;
    while (!o.token.empty() && (o.token.back() == '\n' || o.token.back() == '\r'))
      o.token.pop_back();
  }
  return o;
}

}  // namespace vmsnap::vault
