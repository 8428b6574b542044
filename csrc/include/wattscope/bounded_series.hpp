// A time series with a hard capacity: when full, the oldest point is dropped and counted (never grow without
// limit, never lose data silently).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <vector>

namespace wattscope {

template <typename Value>
class BoundedSeries {
 public:
  explicit BoundedSeries(std::size_t capacity) : capacity_(capacity == 0 ? 1 : capacity) {}

  void push(int64_t t_ns, Value value) {
    if (t_ns_.size() == capacity_) {
      t_ns_.pop_front();
      values_.pop_front();
      ++dropped_;
    }
    t_ns_.push_back(t_ns);
    values_.push_back(value);
  }

  std::size_t size() const { return t_ns_.size(); }
  uint64_t dropped() const { return dropped_; }
  bool empty() const { return t_ns_.empty(); }
  int64_t last_t_ns() const { return t_ns_.empty() ? INT64_MIN : t_ns_.back(); }

  // Copies the points stamped in [from_ns, to_ns], widened by `pad` points on each side: the estimator needs the
  // sample just before the window (its interval may reach into it) and those just after (they cover its end).
  void copy_range(int64_t from_ns, int64_t to_ns, std::size_t pad, std::vector<int64_t>& t_out,
                  std::vector<Value>& v_out) const {
    auto lo = std::lower_bound(t_ns_.begin(), t_ns_.end(), from_ns);
    auto hi = std::upper_bound(t_ns_.begin(), t_ns_.end(), to_ns);
    std::size_t first = static_cast<std::size_t>(lo - t_ns_.begin());
    std::size_t last = static_cast<std::size_t>(hi - t_ns_.begin());
    first = first > pad ? first - pad : 0;
    last = std::min(t_ns_.size(), last + pad);
    t_out.assign(t_ns_.begin() + static_cast<std::ptrdiff_t>(first), t_ns_.begin() + static_cast<std::ptrdiff_t>(last));
    v_out.assign(values_.begin() + static_cast<std::ptrdiff_t>(first), values_.begin() + static_cast<std::ptrdiff_t>(last));
  }

 private:
  std::size_t capacity_;
  uint64_t dropped_ = 0;
  std::deque<int64_t> t_ns_;
  std::deque<Value> values_;
};

}  // namespace wattscope
