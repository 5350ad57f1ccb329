#include "vault/schedule.hpp"

#include <algorithm>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <mutex>
#include <sstream>

namespace vmsnap::vault {

namespace {

const char* kDays[] = {"sun", "mon", "tue", "wed", "thu", "fri", "sat"};

Status BadSchedule(const std::string& spec, const std::string& why) {
  return Status::InvalidArgument(
      "schedule '" + spec + "' is malformed: " + why,
      "use 'daily HH:MM' or 'weekly DAY[,DAY...] HH:MM' (days: sun mon tue wed thu fri sat)");
}

// The C library converts with the process-wide TZ; conversions are serialised here and TZ is
// restored afterwards.
std::mutex tz_mutex;

struct LocalDate {
  int year, month, day, weekday;
};

// Local calendar date of `t` in `zone`.
LocalDate LocalDateOf(std::time_t t, const std::string& zone) {
  std::lock_guard lock(tz_mutex);
  const char* old = std::getenv("TZ");
  std::string saved = old ? old : "";
  setenv("TZ", zone.c_str(), 1);
  tzset();
  std::tm tm{};
  localtime_r(&t, &tm);
  if (old)
    setenv("TZ", saved.c_str(), 1);
  else
    unsetenv("TZ");
  tzset();
  return {tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_wday};
}

// UTC time of local wall-clock (date, hh:mm) in `zone`.
std::time_t ToUtc(const LocalDate& d, int hour, int minute, const std::string& zone) {
  std::lock_guard lock(tz_mutex);
  const char* old = std::getenv("TZ");
  std::string saved = old ? old : "";
  setenv("TZ", zone.c_str(), 1);
  tzset();
  std::tm tm{};
  tm.tm_year = d.year - 1900;
  tm.tm_mon = d.month - 1;
  tm.tm_mday = d.day;
  tm.tm_hour = hour;
  tm.tm_min = minute;
  tm.tm_isdst = -1;
  std::time_t t = std::mktime(&tm);
  if (old)
    setenv("TZ", saved.c_str(), 1);
  else
    unsetenv("TZ");
  tzset();
  return t;
}

bool ValidZone(const std::string& zone) {
  if (zone == "UTC") return true;
  if (zone.empty() || zone[0] == '/' || zone.find("..") != std::string::npos) return false;
  std::error_code ec;
  return std::filesystem::is_regular_file("/usr/share/zoneinfo/" + zone, ec);
}

}  // namespace

Result<Schedule> Schedule::Parse(const std::string& spec, const std::string& time_zone) {
  std::istringstream in(spec);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  Schedule s;
  s.time_zone = time_zone.empty() ? "UTC" : time_zone;
  if (!ValidZone(s.time_zone))
    return Status::InvalidArgument(
        "time zone '" + s.time_zone + "' is unknown",
        "use an IANA name such as UTC, Europe/Rome or America/Sao_Paulo");
  std::string when;
  if (words.size() == 2 && words[0] == "daily") {
    when = words[1];
  } else if (words.size() == 3 && words[0] == "weekly") {
    s.weekly = true;
    std::stringstream days(words[1]);
    for (std::string d; std::getline(days, d, ',');) {
      std::transform(d.begin(), d.end(), d.begin(),
                     [](unsigned char c) { return std::tolower(c); });
      auto it = std::find_if(std::begin(kDays), std::end(kDays),
                             [&](const char* k) { return d.rfind(k, 0) == 0 && d.size() >= 3; });
      if (it == std::end(kDays)) return BadSchedule(spec, "unknown day '" + d + "'");
      s.weekdays.push_back(static_cast<int>(it - std::begin(kDays)));
    }
    std::sort(s.weekdays.begin(), s.weekdays.end());
    s.weekdays.erase(std::unique(s.weekdays.begin(), s.weekdays.end()), s.weekdays.end());
    if (s.weekdays.empty()) return BadSchedule(spec, "no day given");
    when = words[2];
  } else {
    return BadSchedule(spec, "expected 'daily HH:MM' or 'weekly DAYS HH:MM'");
  }
  int h = -1, m = -1;
  char colon = 0, extra = 0;
  std::istringstream t(when);
  if (!(t >> h >> colon >> m) || colon != ':' || (t >> extra) || h < 0 || h > 23 || m < 0 || m > 59)
    return BadSchedule(spec, "time '" + when + "' is not HH:MM (00:00 to 23:59)");
  s.hour = h;
  s.minute = m;
  return s;
}

Result<Schedule> Schedule::FromJson(const nlohmann::json& j) {
  try {
    Schedule s;
    s.weekly = j.at("kind") == "weekly";
    s.weekdays = j.value("weekdays", std::vector<int>{});
    s.hour = j.at("hour");
    s.minute = j.at("minute");
    s.time_zone = j.value("time_zone", "UTC");
    return s;
  } catch (const std::exception& e) {
    return Status::Corruption(std::string("stored schedule is invalid: ") + e.what());
  }
}

nlohmann::json Schedule::ToJson() const {
  return {{"kind", weekly ? "weekly" : "daily"},
          {"weekdays", weekdays},
          {"hour", hour},
          {"minute", minute},
          {"time_zone", time_zone},
          {"text", ToString()}};
}

std::string Schedule::ToString() const {
  char hm[8];
  std::snprintf(hm, sizeof hm, "%02d:%02d", hour, minute);
  std::string s = weekly ? "weekly " : "daily ";
  if (weekly) {
    for (size_t i = 0; i < weekdays.size(); ++i)
      s += std::string(i ? "," : "") + kDays[weekdays[i]];
    s += " ";
  }
  return s + hm + " " + time_zone;
}

int64_t Schedule::LastSlotAtOrBefore(int64_t now_ms) const {
  std::time_t now = static_cast<std::time_t>(now_ms / 1000);
  for (int back = 0; back <= 8; ++back) {
    LocalDate d = LocalDateOf(now - back * 86400, time_zone);
    if (weekly && std::find(weekdays.begin(), weekdays.end(), d.weekday) == weekdays.end())
      continue;
    std::time_t slot = ToUtc(d, hour, minute, time_zone);
    if (slot <= now) return static_cast<int64_t>(slot) * 1000;
  }
  return 0;
}

int64_t Schedule::NextSlotAfter(int64_t now_ms) const {
  std::time_t now = static_cast<std::time_t>(now_ms / 1000);
  for (int ahead = 0; ahead <= 8; ++ahead) {
    LocalDate d = LocalDateOf(now + ahead * 86400, time_zone);
    if (weekly && std::find(weekdays.begin(), weekdays.end(), d.weekday) == weekdays.end())
      continue;
    std::time_t slot = ToUtc(d, hour, minute, time_zone);
    if (static_cast<int64_t>(slot) * 1000 > now_ms) return static_cast<int64_t>(slot) * 1000;
  }
  return 0;
}

Result<Retention> Retention::FromJson(const nlohmann::json& j) {
  Retention r;
  if (!j.is_object()) return r;
  for (auto [key, field] : {std::pair{"daily", &r.daily}, std::pair{"weekly", &r.weekly},
                            std::pair{"monthly", &r.monthly}, std::pair{"yearly", &r.yearly}}) {
    if (!j.contains(key)) continue;
    if (!j[key].is_number_integer() || j[key].get<int>() < 0 || j[key].get<int>() > 10000)
      return Status::InvalidArgument(
          std::string("retention '") + key + "' must be a whole number from 0 to 10000",
          "e.g. --keep-daily 7 --keep-weekly 4");
    *field = j[key];
  }
  if (r.daily + r.weekly + r.monthly + r.yearly == 0)
    return Status::InvalidArgument("retention keeps nothing",
                                   "keep at least one daily, weekly, monthly or yearly point");
  return r;
}

nlohmann::json Retention::ToJson() const {
  return {{"daily", daily}, {"weekly", weekly}, {"monthly", monthly}, {"yearly", yearly}};
}

}  // namespace vmsnap::vault
