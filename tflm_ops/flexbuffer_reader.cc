/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.
==============================================================================*/
#include "flexbuffer_reader.h"

#include <string.h>

namespace keras_patch {
namespace flexbuffer {
namespace {

bool ValidWidth(uint64_t width) {
  return width == 1 || width == 2 || width == 4 || width == 8;
}

// True if [pos, pos + bytes) lies inside a buffer of `size` bytes.
bool InBounds(size_t size, size_t pos, uint64_t bytes) {
  return pos <= size && bytes <= static_cast<uint64_t>(size - pos);
}

// Little-endian unsigned read; the caller checked the bounds.
uint64_t LoadUInt(const uint8_t* p, uint8_t width) {
  uint64_t v = 0;
  for (uint8_t i = 0; i < width; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

int64_t LoadInt(const uint8_t* p, uint8_t width) {
  uint64_t v = LoadUInt(p, width);
  if (width < 8) {
    const uint64_t sign = static_cast<uint64_t>(1) << (8 * width - 1);
    if (v & sign) v |= ~((sign << 1) - 1);  // sign-extend
  }
  // Two's complement conversion without relying on implementation-defined casts.
  if (v > static_cast<uint64_t>(INT64_MAX)) {
    return -static_cast<int64_t>(~v) - 1;
  }
  return static_cast<int64_t>(v);
}

bool ReadUIntAt(const uint8_t* buffer, size_t size, size_t pos, uint8_t width,
                uint64_t* out) {
  if (!ValidWidth(width) || !InBounds(size, pos, width)) return false;
  *out = LoadUInt(buffer + pos, width);
  return true;
}

// Follows the offset field at `pos` (width `width`) backwards.
bool Indirect(const uint8_t* buffer, size_t size, size_t pos, uint8_t width,
              size_t* target) {
  uint64_t delta;
  if (!ReadUIntAt(buffer, size, pos, width, &delta)) return false;
  if (delta > pos) return false;
  *target = pos - static_cast<size_t>(delta);
  return true;
}

}  // namespace

bool GetRootMap(const uint8_t* data, size_t size, Map* map) {
  if (data == NULL || size < 3) return false;
  const uint8_t root_width = data[size - 1];
  const uint8_t packed = data[size - 2];
  if (!ValidWidth(root_width) || root_width > size - 2) return false;
  const size_t root = size - 2 - root_width;
  if ((packed >> 2) != kTypeMap) return false;
  const uint8_t width = static_cast<uint8_t>(1u << (packed & 3));
  size_t vec;
  if (!Indirect(data, size, root, root_width, &vec)) return false;
  // Map prefix: [keys offset][keys width][length] just before the values.
  if (vec < 3u * width) return false;
  uint64_t length, key_width;
  if (!ReadUIntAt(data, size, vec - width, width, &length)) return false;
  if (!ReadUIntAt(data, size, vec - 2 * width, width, &key_width)) return false;
  if (!ValidWidth(key_width)) return false;
  size_t keys;
  if (!Indirect(data, size, vec - 3 * width, width, &keys)) return false;
  // Values, then one type byte per value; keys: one offset per key.
  if (length > 0xFFFFFFFFu) return false;
  if (!InBounds(size, vec, length * (width + 1u))) return false;
  if (!InBounds(size, keys, length * key_width)) return false;
  map->buffer = data;
  map->size = size;
  map->values = vec;
  map->keys = keys;
  map->length = static_cast<uint32_t>(length);
  map->value_width = width;
  map->key_width = static_cast<uint8_t>(key_width);
  return true;
}

Status Find(const Map& map, const char* key, Ref* value) {
  const size_t key_length = strlen(key);
  // Scans from the end: with duplicate keys the last one counts, as in the
  // Python reader (keras_patch.stage.options.decode_options).
  for (uint32_t j = map.length; j > 0; --j) {
    const uint32_t i = j - 1;
    size_t str;
    if (!Indirect(map.buffer, map.size, map.keys + static_cast<size_t>(i) * map.key_width,
                  map.key_width, &str)) {
      continue;  // unreadable key: cannot be the one we look for
    }
    // The key must be `key` followed by its NUL, all inside the buffer.
    if (!InBounds(map.size, str, key_length + 1)) continue;
    if (memcmp(map.buffer + str, key, key_length) != 0 || map.buffer[str + key_length] != 0) {
      continue;
    }
    const uint8_t packed =
        map.buffer[map.values + static_cast<size_t>(map.length) * map.value_width + i];
    value->buffer = map.buffer;
    value->size = map.size;
    value->offset = map.values + static_cast<size_t>(i) * map.value_width;
    value->parent_width = map.value_width;
    value->type = static_cast<uint8_t>(packed >> 2);
    value->child_width = static_cast<uint8_t>(1u << (packed & 3));
    return kOk;
  }
  return kNotFound;
}

Status ReadInt(const Ref& ref, int64_t* out) {
  if (ref.type == kTypeInt) {
    if (!InBounds(ref.size, ref.offset, ref.parent_width)) return kWrongType;
    *out = LoadInt(ref.buffer + ref.offset, ref.parent_width);
    return kOk;
  }
  if (ref.type == kTypeIndirectInt) {
    size_t target;
    if (!Indirect(ref.buffer, ref.size, ref.offset, ref.parent_width, &target)) return kWrongType;
    if (!InBounds(ref.size, target, ref.child_width)) return kWrongType;
    *out = LoadInt(ref.buffer + target, ref.child_width);
    return kOk;
  }
  return kWrongType;
}

Status ReadTypedVector(const Ref& ref, bool want_float, TypedVector* out) {
  if (ref.type != (want_float ? kTypeVectorFloat : kTypeVectorInt)) return kWrongType;
  const uint8_t width = ref.child_width;
  if (want_float && width != 4 && width != 8) return kWrongType;
  size_t vec;
  if (!Indirect(ref.buffer, ref.size, ref.offset, ref.parent_width, &vec)) return kWrongType;
  if (vec < width) return kWrongType;
  uint64_t length;
  if (!ReadUIntAt(ref.buffer, ref.size, vec - width, width, &length)) return kWrongType;
  if (length > 0xFFFFFFFFu || !InBounds(ref.size, vec, length * width)) return kWrongType;
  out->data = ref.buffer + vec;
  out->length = static_cast<uint32_t>(length);
  out->width = width;
  out->is_float = want_float ? 1 : 0;
  return kOk;
}

int64_t IntAt(const TypedVector& v, uint32_t index) {
  return LoadInt(v.data + static_cast<size_t>(index) * v.width, v.width);
}

double FloatAt(const TypedVector& v, uint32_t index) {
  const uint8_t* p = v.data + static_cast<size_t>(index) * v.width;
  if (v.width == 4) {
    const uint32_t bits = static_cast<uint32_t>(LoadUInt(p, 4));
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
  }
  const uint64_t bits = LoadUInt(p, 8);
  double d;
  memcpy(&d, &bits, sizeof(d));
  return d;
}

}  // namespace flexbuffer
}  // namespace keras_patch
