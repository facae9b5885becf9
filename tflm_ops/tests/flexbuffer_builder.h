/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

Test-only: a tiny FlexBuffer map writer (all fields 4 bytes wide) so the C++
tests can build options with missing keys, wrong types and odd widths.  It
writes only what the KP_PATCH_STAGE options use; golden_stage.h holds bytes
from the real (Python flatbuffers) encoder.
==============================================================================*/
#ifndef KERAS_PATCH_TFLM_OPS_TESTS_FLEXBUFFER_BUILDER_H_
#define KERAS_PATCH_TFLM_OPS_TESTS_FLEXBUFFER_BUILDER_H_

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <vector>

namespace kp_test {

class MapBuilder {
 public:
  enum Kind { kInt, kIntVector, kFloatVector, kString, kIndirectInt, kInt8Vector };
  struct Entry {
    std::string key;
    Kind kind;
    int64_t value;
    std::vector<int64_t> ints;
    std::vector<float> floats;
  };

  void Int(const std::string& key, int64_t v) { Add(key, kInt, v, {}, {}); }
  void IndirectInt(const std::string& key, int64_t v) { Add(key, kIndirectInt, v, {}, {}); }
  void Ints(const std::string& key, const std::vector<int64_t>& v) { Add(key, kIntVector, 0, v, {}); }
  // Int vector of 1-byte elements (values must fit int8).
  void Int8s(const std::string& key, const std::vector<int64_t>& v) { Add(key, kInt8Vector, 0, v, {}); }
  void Floats(const std::string& key, const std::vector<float>& v) { Add(key, kFloatVector, 0, {}, v); }
  void String(const std::string& key) { Add(key, kString, 0, {}, {}); }
  void Remove(const std::string& key) {
    for (size_t i = 0; i < entries_.size(); ++i) {
      if (entries_[i].key == key) {
        entries_.erase(entries_.begin() + i);
        return;
      }
    }
  }

  std::vector<uint8_t> Finish() const {
    std::vector<Entry> e = entries_;
    std::sort(e.begin(), e.end(), [](const Entry& a, const Entry& b) { return a.key < b.key; });
    std::vector<uint8_t> buf;
    std::vector<size_t> key_pos(e.size()), target(e.size());
    for (size_t i = 0; i < e.size(); ++i) {
      key_pos[i] = buf.size();
      buf.insert(buf.end(), e[i].key.begin(), e[i].key.end());
      buf.push_back(0);
    }
    for (size_t i = 0; i < e.size(); ++i) {
      const Entry& en = e[i];
      if (en.kind == kString) {
        Align(&buf, 4);
        Put32(&buf, 3);
        target[i] = buf.size();
        buf.push_back('a'), buf.push_back('b'), buf.push_back('c'), buf.push_back(0);
      } else if (en.kind == kIndirectInt) {
        Align(&buf, 4);
        target[i] = buf.size();
        Put32(&buf, static_cast<uint32_t>(en.value));
      } else if (en.kind == kIntVector || en.kind == kFloatVector) {
        Align(&buf, 4);
        const size_t n = en.kind == kIntVector ? en.ints.size() : en.floats.size();
        Put32(&buf, static_cast<uint32_t>(n));
        target[i] = buf.size();
        for (size_t k = 0; k < n; ++k) {
          uint32_t bits;
          if (en.kind == kIntVector) {
            bits = static_cast<uint32_t>(en.ints[k]);
          } else {
            memcpy(&bits, &en.floats[k], 4);
          }
          Put32(&buf, bits);
        }
      } else if (en.kind == kInt8Vector) {
        buf.push_back(static_cast<uint8_t>(en.ints.size()));
        target[i] = buf.size();
        for (size_t k = 0; k < en.ints.size(); ++k) buf.push_back(static_cast<uint8_t>(en.ints[k]));
      }
    }
    Align(&buf, 4);
    Put32(&buf, static_cast<uint32_t>(e.size()));
    const size_t keys = buf.size();
    for (size_t i = 0; i < e.size(); ++i) Put32(&buf, static_cast<uint32_t>(buf.size() - key_pos[i]));
    // Map prefix: keys offset, keys width, length; then values and types.
    Put32(&buf, static_cast<uint32_t>(buf.size() - keys));
    Put32(&buf, 4);
    Put32(&buf, static_cast<uint32_t>(e.size()));
    const size_t map = buf.size();
    for (size_t i = 0; i < e.size(); ++i) {
      if (e[i].kind == kInt) {
        Put32(&buf, static_cast<uint32_t>(e[i].value));
      } else {
        Put32(&buf, static_cast<uint32_t>(buf.size() - target[i]));
      }
    }
    for (size_t i = 0; i < e.size(); ++i) {
      static const uint8_t kTypes[] = {1, 11, 13, 5, 6, 11};
      const uint8_t width_code = e[i].kind == kInt8Vector ? 0 : 2;
      buf.push_back(static_cast<uint8_t>((kTypes[e[i].kind] << 2) | width_code));
    }
    const size_t root = buf.size();
    Put32(&buf, static_cast<uint32_t>(root - map));
    buf.push_back((9 << 2) | 2);  // MAP, 4-byte elements
    buf.push_back(4);
    return buf;
  }

 private:
  void Add(const std::string& key, Kind kind, int64_t v, const std::vector<int64_t>& ints,
           const std::vector<float>& floats) {
    Remove(key);
    Entry e;
    e.key = key;
    e.kind = kind;
    e.value = v;
    e.ints = ints;
    e.floats = floats;
    entries_.push_back(e);
  }
  static void Align(std::vector<uint8_t>* buf, size_t n) {
    while (buf->size() % n) buf->push_back(0);
  }
  static void Put32(std::vector<uint8_t>* buf, uint32_t v) {
    for (int i = 0; i < 4; ++i) buf->push_back(static_cast<uint8_t>(v >> (8 * i)));
  }
  std::vector<Entry> entries_;
};

}  // namespace kp_test

#endif  // KERAS_PATCH_TFLM_OPS_TESTS_FLEXBUFFER_BUILDER_H_
