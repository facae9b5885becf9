// Host stand-in for the Arduino_OV767X camera library (>= 0.0.2 API:
// Camera.begin(resolution, format, fps, camera), width(), height(),
// bytesPerPixel(), readFrame()). readFrame() returns the QCIF grayscale
// frame in the file named by $KP_SHIM_FRAME (or -DKP_SHIM_FRAME_PATH; 176 * 144
// raw bytes, read with stdio: semihosting on bare metal), or a
// horizontal ramp when it is not set. Our own code.
#ifndef KERAS_PATCH_TESTS_ARDUINO_SHIM_ARDUINO_OV767X_H_
#define KERAS_PATCH_TESTS_ARDUINO_SHIM_ARDUINO_OV767X_H_

#include "Arduino.h"

enum { YUV422 = 0, RGB444 = 1, RGB565 = 2, GRAYSCALE = 4 };
enum { VGA = 0, CIF = 1, QVGA = 2, QCIF = 3, QQVGA = 4 };
enum { OV7670 = 0, OV7675 = 1 };

class OV767X {
 public:
  int begin(int resolution, int format, int fps, int camera = OV7670);
  int width() const { return width_; }
  int height() const { return height_; }
  int bytesPerPixel() const { return bytes_per_pixel_; }
  void readFrame(void* buffer);

 private:
  int width_ = 0;
  int height_ = 0;
  int bytes_per_pixel_ = 0;
};
extern OV767X Camera;

#endif  // KERAS_PATCH_TESTS_ARDUINO_SHIM_ARDUINO_OV767X_H_
