// Backup schedules and retention rules of a policy (seeds 001/002, MISSION S7).
//
// A schedule is "daily HH:MM" or "weekly DAY[,DAY...] HH:MM" in a named IANA time zone
// (e.g. Europe/Rome; default UTC). Slot times are computed with the system's zoneinfo
// (tzdata), so daylight-saving changes are honoured. Thread-safe.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/status.hpp"

namespace vmsnap::vault {

struct Schedule {
  bool weekly = false;
  std::vector<int> weekdays;  // 0 = Sunday ... 6 = Saturday (weekly only), sorted
  int hour = 0;
  int minute = 0;
  std::string time_zone = "UTC";

  // "daily 22:00", "weekly sun,wed 06:00"; kInvalidArgument with the accepted forms.
  static Result<Schedule> Parse(const std::string& spec, const std::string& time_zone);
  static Result<Schedule> FromJson(const nlohmann::json& j);
  nlohmann::json ToJson() const;
  std::string ToString() const;

  // The latest slot at or before `now_ms` (UTC milliseconds), or 0 if none in the last 8 days.
  int64_t LastSlotAtOrBefore(int64_t now_ms) const;
  // The first slot strictly after `now_ms`.
  int64_t NextSlotAfter(int64_t now_ms) const;
};

struct Retention {
  int daily = 7;
  int weekly = 4;
  int monthly = 12;
  int yearly = 0;
  static Result<Retention> FromJson(const nlohmann::json& j);
  nlohmann::json ToJson() const;
};

}  // namespace vmsnap::vault
