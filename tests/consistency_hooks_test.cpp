// Pre/post scripts (agent/hooks.hpp) and RunProcess.
#include <signal.h>

#include "agent/hooks.hpp"
#include "consistency_fixtures.hpp"

namespace vmsnap::test {
namespace {

using agent::HookOptions;
using agent::ScriptHooks;

// A hooks setup inside a TempDir: hooks.d, an Azure config path that does not exist yet, a
// log file every script appends to.
struct HookDirs {
  TempDir dir;
  std::string hooks = dir / "hooks.d";
  std::string azure = dir / "azure.json";
  std::string log = dir / "log";
  HookDirs() { fs::create_directories(hooks); }
  HookOptions Options() const {
    HookOptions o;
    o.hooks_dir = hooks;
    o.azure_config_path = azure;
    return o;
  }
  // A hook that logs "<name> <args>" and exits with `rc`.
  void Hook(const std::string& name, int rc = 0, int mode = 0755) const {
    WriteFile(
        hooks + "/" + name,
        "#!/bin/sh\necho \"" + name + " $*\" >> " + log + "\nexit " + std::to_string(rc) + "\n",
        mode);
  }
  std::string Log() const { return ReadFileText(log); }
};

bool ProcessGone(pid_t pid) {
  // Gone, or a zombie nobody reaps (PID 1 here may not reap): either way not running.
  std::string stat = ReadFileText("/proc/" + std::to_string(pid) + "/stat");
  if (stat.empty()) return true;
  auto close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] == 'Z';
}

TEST_CASE("hooks: lexical order, skip patterns, thaw in reverse") {
  if (!RequireRoot()) return;
  HookDirs d;
  d.Hook("20-b");
  d.Hook("10-a");
  d.Hook("30-c");
  for (const char* skipped : {"05.sample", "06~", "07.bak", "08.orig", "09.dpkg-old", ".hidden"})
    d.Hook(skipped);
  WriteFile(d.hooks + "/01-not-executable", "#!/bin/sh\necho bad >> " + d.log + "\n", 0644);

  ScriptHooks hooks = ScriptHooks::Load(d.Options());
  auto pre = hooks.RunPre();
  CHECK(pre.any_configured);
  CHECK(pre.all_succeeded);
  CHECK(pre.continue_backup);
  CHECK(d.Log() == "10-a freeze\n20-b freeze\n30-c freeze\n");
  hooks.RunPost();
  CHECK(d.Log() == "10-a freeze\n20-b freeze\n30-c freeze\n30-c thaw\n20-b thaw\n10-a thaw\n");
  REQUIRE(hooks.records().size() == 6);
  CHECK(hooks.records()[0].name == "10-a");
  CHECK(hooks.records()[0].phase == "freeze");
  CHECK(hooks.records()[0].exit_code == 0);
  CHECK(hooks.records()[5].phase == "thaw");
  CHECK(agent::IsSkippedHookName("x.dpkg-new"));
  CHECK(agent::IsSkippedHookName("x.rpmsave"));
  CHECK_FALSE(agent::IsSkippedHookName("50-mysql"));
}

TEST_CASE("hooks: a failed freeze hook stops later ones; thaw runs for those that ran, reversed") {
  if (!RequireRoot()) return;
  HookDirs d;
  d.Hook("10-a");
  d.Hook("20-b", 3);
  d.Hook("30-c");
  HookOptions o = d.Options();
  o.native_continue_on_failure = false;
  ScriptHooks hooks = ScriptHooks::Load(o);
  auto pre = hooks.RunPre();
  CHECK_FALSE(pre.all_succeeded);
  CHECK_FALSE(pre.continue_backup);
  CHECK(pre.failure_summary.find("exit code 3") != std::string::npos);
  hooks.RunPost();
  CHECK(d.Log() == "10-a freeze\n20-b freeze\n20-b thaw\n10-a thaw\n");
  CHECK(d.Log().find("30-c") == std::string::npos);
  CHECK(hooks.records()[1].exit_code == 3);
  CHECK_FALSE(hooks.records()[1].ok);
}

TEST_CASE("hooks: continue on failure runs every hook and reports the failure") {
  if (!RequireRoot()) return;
  HookDirs d;
  d.Hook("10-a", 1);
  d.Hook("20-b");
  ScriptHooks hooks = ScriptHooks::Load(d.Options());
  auto pre = hooks.RunPre();
  CHECK_FALSE(pre.all_succeeded);
  CHECK(pre.continue_backup);
  hooks.RunPost();
  CHECK(d.Log() == "10-a freeze\n20-b freeze\n20-b thaw\n10-a thaw\n");
}

TEST_CASE("hooks: a timed-out script is killed with its whole process group") {
  if (!RequireRoot()) return;
  HookDirs d;
  std::string child_pid = d.dir / "child.pid", self_pid = d.dir / "self.pid";
  WriteFile(d.hooks + "/10-hang",
            "#!/bin/sh\nsleep 300 &\necho $! > " + child_pid + "\necho $$ > " + self_pid +
                "\necho started\nsleep 300\n",
            0755);
  HookOptions o = d.Options();
  o.native_timeout = std::chrono::seconds(1);
  ScriptHooks hooks = ScriptHooks::Load(o);
  auto pre = hooks.RunPre();
  CHECK_FALSE(pre.all_succeeded);
  REQUIRE(hooks.records().size() == 1);
  const auto& r = hooks.records()[0];
  CHECK(r.timed_out);
  CHECK(r.exit_code == -1);
  CHECK(r.output_tail.find("started") != std::string::npos);
  CHECK(r.duration_ms < 10000);
  pid_t child = std::atoi(ReadFileText(child_pid).c_str());
  pid_t self = std::atoi(ReadFileText(self_pid).c_str());
  REQUIRE(child > 0);
  REQUIRE(self > 0);
  CHECK(ProcessGone(self));
  CHECK(ProcessGone(child));  // the background child was in the group: killed too
  hooks.RunPost();
}

TEST_CASE("hooks: scripts and config with bad owner or mode are refused with the fix") {
  if (!RequireRoot()) return;
  HookDirs d;
  d.Hook("10-group-writable", 0, 0775);
  d.Hook("20-not-root");
  REQUIRE(::chown((d.hooks + "/20-not-root").c_str(), 65534, 65534) == 0);
  ScriptHooks hooks = ScriptHooks::Load(d.Options());
  auto pre = hooks.RunPre();
  CHECK_FALSE(pre.all_succeeded);
  REQUIRE(hooks.records().size() == 2);
  CHECK(hooks.records()[0].refused);
  CHECK(hooks.records()[0].error.find("chmod go-w " + d.hooks + "/10-group-writable") !=
        std::string::npos);
  CHECK(hooks.records()[1].refused);
  CHECK(hooks.records()[1].error.find("chown root:root " + d.hooks + "/20-not-root") !=
        std::string::npos);
  CHECK(d.Log().empty());  // neither ran
  hooks.RunPost();
  CHECK(d.Log().empty());  // refused freeze calls did not run, so no thaw either

  // The Azure config itself.
  WriteFile(d.azure, R"({"preScriptLocation": "/bin/true"})", 0666);
  ScriptHooks az = ScriptHooks::Load(d.Options());
  auto pre2 = az.RunPre();
  CHECK_FALSE(pre2.all_succeeded);
  bool config_refused = false;
  for (const auto& r : az.records())
    if (r.source == "azure" && r.refused && r.error.find(d.azure) != std::string::npos &&
        r.error.find("chmod go-w") != std::string::npos)
      config_refused = true;
  CHECK(config_refused);
}

TEST_CASE("hooks: Azure config honoured (params, retries re-run, continue, fsFreezeEnabled)") {
  if (!RequireRoot()) return;
  HookDirs d;
  std::string pre_script = d.dir / "pre.sh", post_script = d.dir / "post.sh";
  std::string counter = d.dir / "count";
  // Fails twice, then succeeds: three real runs with two retries.
  WriteFile(pre_script,
            "#!/bin/sh\necho \"pre $*\" >> " + d.log + "\nn=$(cat " + counter +
                " 2>/dev/null || echo 0)\nn=$((n+1))\necho $n > " + counter + "\n[ $n -ge 3 ]\n",
            0700);
  WriteFile(post_script, "#!/bin/sh\necho \"post $*\" >> " + d.log + "\n", 0700);
  WriteFile(d.azure,
            R"({"pluginName": "ScriptRunner", "preScriptLocation": ")" + pre_script +
                R"(", "postScriptLocation": ")" + post_script +
                R"(", "preScriptParams": ["a", "b c"], "postScriptParams": ["z"],
                "preScriptNoOfRetries": 2, "postScriptNoOfRetries": 0, "timeoutInSeconds": 5,
                "continueBackupOnFailure": false, "fsFreezeEnabled": false})",
            0600);
  {
    ScriptHooks hooks = ScriptHooks::Load(d.Options());
    CHECK_FALSE(hooks.fs_freeze_enabled());
    auto pre = hooks.RunPre();
    CHECK(pre.all_succeeded);
    CHECK_FALSE(pre.fs_freeze_enabled);
    REQUIRE(hooks.records().size() == 1);
    CHECK(hooks.records()[0].attempts == 3);
    CHECK(ReadFileText(counter) == "3\n");
    hooks.RunPost();
    CHECK(d.Log() == "pre a b c\npre a b c\npre a b c\npost z\n");
  }
  // Not enough retries and continueBackupOnFailure false: the backup must fail; post still runs.
  fs::remove(counter);
  fs::remove(d.log);
  WriteFile(d.azure,
            R"({"preScriptLocation": ")" + pre_script + R"(", "postScriptLocation": ")" +
                post_script + R"(", "preScriptNoOfRetries": 1, "continueBackupOnFailure": false})",
            0600);
  {
    ScriptHooks hooks = ScriptHooks::Load(d.Options());
    CHECK(hooks.fs_freeze_enabled());  // default true
    auto pre = hooks.RunPre();
    CHECK_FALSE(pre.all_succeeded);
    CHECK_FALSE(pre.continue_backup);
    CHECK(hooks.records()[0].attempts == 2);
    CHECK(hooks.records()[0].exit_code == 1);
    hooks.RunPost();
    CHECK(d.Log() == "pre \npre \npost \n");
  }
  // Default continueBackupOnFailure is true.
  fs::remove(counter);
  WriteFile(d.azure, R"({"preScriptLocation": ")" + pre_script + R"("})", 0600);
  {
    ScriptHooks hooks = ScriptHooks::Load(d.Options());
    auto pre = hooks.RunPre();
    CHECK_FALSE(pre.all_succeeded);
    CHECK(pre.continue_backup);
    hooks.RunPost();
  }
}

TEST_CASE("hooks: Azure timeout is honoured without a cap and kills the script") {
  if (!RequireRoot()) return;
  HookDirs d;
  std::string pre_script = d.dir / "pre.sh";
  WriteFile(pre_script, "#!/bin/sh\nsleep 2\necho done\n", 0700);
  WriteFile(d.azure, R"({"preScriptLocation": ")" + pre_script + R"(", "timeoutInSeconds": 1})",
            0600);
  {
    ScriptHooks hooks = ScriptHooks::Load(d.Options());
    hooks.RunPre();
    REQUIRE(hooks.records().size() == 1);
    CHECK(hooks.records()[0].timed_out);
  }
  WriteFile(d.azure, R"({"preScriptLocation": ")" + pre_script + R"(", "timeoutInSeconds": 5})",
            0600);
  {
    ScriptHooks hooks = ScriptHooks::Load(d.Options());
    auto pre = hooks.RunPre();
    CHECK(pre.all_succeeded);
    CHECK(hooks.records()[0].output_tail == "done\n");
  }
}

TEST_CASE("RunProcess: output tail keeps the last 4 KiB; stdout kept separately") {
  TempDir d;
  platform::ProcessSpec spec;
  spec.path = "/bin/sh";
  spec.args = {"-c", "head -c 10000 /dev/zero | tr '\\0' x; echo; echo err >&2; echo END"};
  auto r = platform::RunProcess(spec);
  REQUIRE(r.ok());
  CHECK(r->succeeded());
  CHECK(r->output_tail.size() == 4096);
  CHECK(r->output_tail.find("END\n") != std::string::npos);
  CHECK(r->output_tail.find(std::string(100, 'x')) != std::string::npos);
  CHECK(r->stdout_text.find("err") == std::string::npos);
  CHECK(r->stdout_text.size() == 10000 + 1 + 4);
  CHECK(r->stdout_text.substr(r->stdout_text.size() - 4) == "END\n");

  spec.args = {"-c", "echo err >&2"};
  auto s = platform::RunProcess(spec);
  REQUIRE(s.ok());
  CHECK(s->output_tail == "err\n");
  CHECK(s->stdout_text.empty());

  spec.args = {"-c", "exit 7"};
  auto e = platform::RunProcess(spec);
  REQUIRE(e.ok());
  CHECK(e->exit_code == 7);
  CHECK_FALSE(e->succeeded());

  spec.path = d / "missing";
  auto m = platform::RunProcess(spec);
  CHECK_FALSE(m.ok());
}

}  // namespace
}  // namespace vmsnap::test
