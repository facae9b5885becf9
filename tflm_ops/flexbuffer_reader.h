/* Copyright 2026 The keras-patch Authors. Licensed under the Apache License 2.0.

A minimal, bounds-checked reader for the FlexBuffer subset KP_PATCH_STAGE
options use: a root map whose values are ints (inline or indirect) and typed
vectors of ints or floats.  Every read is checked against the buffer; garbage
bytes give "not found" / "wrong type", never an out-of-bounds access.

Portable C++11: no heap, no exceptions, no RTTI, no STL.
==============================================================================*/
#ifndef KERAS_PATCH_TFLM_OPS_FLEXBUFFER_READER_H_
#define KERAS_PATCH_TFLM_OPS_FLEXBUFFER_READER_H_

#include <stddef.h>
#include <stdint.h>

namespace keras_patch {
namespace flexbuffer {

// FlexBuffer value types (flexbuffers::Type) this reader distinguishes.
enum Type {
  kTypeNull = 0,
  kTypeInt = 1,
  kTypeUInt = 2,
  kTypeFloat = 3,
  kTypeKey = 4,
  kTypeString = 5,
  kTypeIndirectInt = 6,
  kTypeIndirectUInt = 7,
  kTypeIndirectFloat = 8,
  kTypeMap = 9,
  kTypeVector = 10,
  kTypeVectorInt = 11,
  kTypeVectorUInt = 12,
  kTypeVectorFloat = 13,
  kTypeVectorKey = 14,
};

// A value inside the buffer: where its bytes are and how to read them.
struct Ref {
  const uint8_t* buffer;  // whole buffer (for bounds checks)
  size_t size;
  size_t offset;       // position of the value's bytes (inline) or of its
                       // offset field (for offset types)
  uint8_t parent_width;  // width of the field at `offset`
  uint8_t type;          // flexbuffer::Type
  uint8_t child_width;   // byte width of the referenced data (offset types)
};

// A typed vector of ints or floats, validated to lie inside the buffer.
struct TypedVector {
  const uint8_t* data;  // first element (not necessarily aligned)
  uint32_t length;
  uint8_t width;     // element byte width: 1, 2, 4 or 8
  uint8_t is_float;  // 1: float elements, 0: signed int elements
};

// Root map of a FlexBuffer.
struct Map {
  const uint8_t* buffer;
  size_t size;
  size_t values;        // position of value 0
  size_t keys;          // position of key-offset 0
  uint32_t length;
  uint8_t value_width;  // width of each value slot
  uint8_t key_width;    // width of each key offset
};

// Result of looking a key up / reading a value.
enum Status {
  kOk = 0,
  kNotFound = 1,   // key absent
  kWrongType = 2,  // present, other type (or malformed in a way that makes
                   // the value unreadable)
};

// Reads the root of `data`; returns false unless it is a readable map.
bool GetRootMap(const uint8_t* data, size_t size, Map* map);

// Finds `key` (NUL-terminated) in `map` (the last entry if it repeats).
Status Find(const Map& map, const char* key, Ref* value);

// Reads a signed int (INT or INDIRECT_INT) into *out.
Status ReadInt(const Ref& ref, int64_t* out);

// Reads a typed vector of ints (want_float = false) or floats (true).
Status ReadTypedVector(const Ref& ref, bool want_float, TypedVector* out);

// Element access; `index` must be < v.length (checked in ReadTypedVector).
int64_t IntAt(const TypedVector& v, uint32_t index);
double FloatAt(const TypedVector& v, uint32_t index);

}  // namespace flexbuffer
}  // namespace keras_patch

#endif  // KERAS_PATCH_TFLM_OPS_FLEXBUFFER_READER_H_
