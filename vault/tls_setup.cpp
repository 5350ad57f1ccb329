#include "vault/tls_setup.hpp"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <boost/asio/ip/address.hpp>
#include <filesystem>
#include <memory>

#include "platform/env.hpp"

namespace vmsnap::vault {
namespace {

namespace fs = std::filesystem;

struct Deleter {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
  void operator()(X509* p) const { X509_free(p); }
  void operator()(BIO* p) const { BIO_free(p); }
  void operator()(X509_EXTENSION* p) const { X509_EXTENSION_free(p); }
};
template <class T>
using Ptr = std::unique_ptr<T, Deleter>;

Status OpenSslError(const std::string& what) {
  return Status::Internal("OpenSSL failed to " + what);
}

Result<std::string> ToPem(EVP_PKEY* key, X509* cert) {
  Ptr<BIO> bio(BIO_new(BIO_s_mem()));
  bool ok = key ? PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr)
                : PEM_write_bio_X509(bio.get(), cert);
  if (!ok) return OpenSslError("encode PEM");
  char* data = nullptr;
  long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

Status AddExt(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  Ptr<X509_EXTENSION> ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
  if (!ext || !X509_add_ext(cert, ext.get(), -1)) return OpenSslError("add extension " + value);
  return Status::Ok();
}

Result<Ptr<X509>> MakeCert(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key,
                           bool is_ca, const std::string& san, int days) {
  Ptr<X509> cert(X509_new());
  X509_set_version(cert.get(), 2);
  unsigned char serial[16];
  RAND_bytes(serial, sizeof serial);
  serial[0] &= 0x7f;
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert.get()));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 60L * 60 * 24 * days);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("vmsnap"), -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509* iss = issuer ? issuer : cert.get();
  X509_set_issuer_name(cert.get(), X509_get_subject_name(iss));
  if (is_ca) {
    VMSNAP_RETURN_IF_ERROR(
        AddExt(cert.get(), iss, NID_basic_constraints, "critical,CA:TRUE,pathlen:0"));
    VMSNAP_RETURN_IF_ERROR(AddExt(cert.get(), iss, NID_key_usage, "critical,keyCertSign,cRLSign"));
  } else {
    VMSNAP_RETURN_IF_ERROR(AddExt(cert.get(), iss, NID_basic_constraints, "critical,CA:FALSE"));
    VMSNAP_RETURN_IF_ERROR(AddExt(cert.get(), iss, NID_key_usage, "critical,digitalSignature"));
    VMSNAP_RETURN_IF_ERROR(AddExt(cert.get(), iss, NID_ext_key_usage, "serverAuth"));
    VMSNAP_RETURN_IF_ERROR(AddExt(cert.get(), iss, NID_subject_alt_name, san));
  }
  VMSNAP_RETURN_IF_ERROR(AddExt(cert.get(), iss, NID_subject_key_identifier, "hash"));
  if (!X509_sign(cert.get(), issuer_key ? issuer_key : key, EVP_sha256()))
    return OpenSslError("sign certificate");
  return cert;
}

std::string FingerprintOf(X509* cert) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  X509_digest(cert, EVP_sha256(), md, &n);
  static const char* kDigits = "0123456789ABCDEF";
  std::string out;
  for (unsigned i = 0; i < n; ++i) {
    if (i) out.push_back(':');
    out.push_back(kDigits[md[i] >> 4]);
    out.push_back(kDigits[md[i] & 15]);
  }
  return out;
}

}  // namespace

Result<std::string> CertificateFingerprint(const std::string& pem_file) {
  auto pem = platform::Env::Default()->ReadFile(pem_file);
  if (!pem.ok()) return pem.take_status();
  Ptr<BIO> bio(BIO_new_mem_buf(pem->data(), static_cast<int>(pem->size())));
  Ptr<X509> cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) return Status::InvalidArgument(pem_file + " holds no PEM certificate");
  return FingerprintOf(cert.get());
}

Result<TlsMaterial> EnsureTls(const std::string& data_dir, const std::vector<std::string>& names) {
  auto* env = platform::Env::Default();
  const std::string dir = data_dir + "/tls";
  TlsMaterial m{dir + "/ca.pem", dir + "/server.pem", dir + "/server.key", "", false};
  std::error_code ec;
  if (!fs::exists(m.ca_cert_file) || !fs::exists(m.server_cert_file) ||
      !fs::exists(m.server_key_file)) {
    fs::create_directories(dir, ec);
    if (ec) return Status::IoError("create " + dir + ": " + ec.message());
    fs::permissions(dir, fs::perms::owner_all, ec);
    Ptr<EVP_PKEY> ca_key(EVP_EC_gen("P-256"));
    Ptr<EVP_PKEY> server_key(EVP_EC_gen("P-256"));
    if (!ca_key || !server_key) return OpenSslError("generate EC keys");
    std::string san = "IP:127.0.0.1,IP:::1,DNS:localhost";
    for (const auto& n : names) {
      if (n.empty() || n == "127.0.0.1" || n == "::1" || n == "localhost" || n == "0.0.0.0" ||
          n == "::")
        continue;
      boost::system::error_code bec;
      boost::asio::ip::make_address(n, bec);
      san += (bec ? ",DNS:" : ",IP:") + n;
    }
    auto ca = MakeCert(ca_key.get(), "vmsnap vault CA", nullptr, nullptr, true, "", 3650);
    if (!ca.ok()) return ca.take_status();
    auto server =
        MakeCert(server_key.get(), "vmsnap vault", ca->get(), ca_key.get(), false, san, 825);
    if (!server.ok()) return server.take_status();
    auto ca_key_pem = ToPem(ca_key.get(), nullptr);
    auto ca_pem = ToPem(nullptr, ca->get());
    auto key_pem = ToPem(server_key.get(), nullptr);
    auto cert_pem = ToPem(nullptr, server->get());
    if (!ca_key_pem.ok() || !ca_pem.ok() || !key_pem.ok() || !cert_pem.ok())
      return OpenSslError("encode certificates");
    VMSNAP_RETURN_IF_ERROR(env->WriteFileAtomic(dir + "/ca.key", *ca_key_pem, 0600));
    VMSNAP_RETURN_IF_ERROR(env->WriteFileAtomic(m.server_key_file, *key_pem, 0600));
    VMSNAP_RETURN_IF_ERROR(env->WriteFileAtomic(m.server_cert_file, *cert_pem + *ca_pem, 0644));
    // ca.pem last: its presence marks the set as complete.
    VMSNAP_RETURN_IF_ERROR(env->WriteFileAtomic(m.ca_cert_file, *ca_pem, 0644));
    m.created = true;
  }
  auto fp = CertificateFingerprint(m.ca_cert_file);
  if (!fp.ok()) return fp.take_status();
  m.ca_fingerprint_sha256 = *fp;
  return m;
}

}  // namespace vmsnap::vault
